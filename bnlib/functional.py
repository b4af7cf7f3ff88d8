"""Batch normalization for PyTorch tensors, with the compact backward pass.

``batch_norm`` has the signature and semantics of ``torch.nn.functional.batch_norm``. In
training mode it runs a custom autograd Function whose backward is the compact formula

    dx = (inv_std / m) * (m * dx_hat - sum(dx_hat) - x_hat * sum(dx_hat * x_hat)),  dx_hat = weight * dy

and which saves only what that formula needs: x_hat (one input-sized tensor), inv_std and the
weight. Statistics of float16/bfloat16 inputs are accumulated in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["batch_norm", "check_batch_norm_input"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _channel_shape(x: Tensor) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector against x: (1, C, 1, ...)."""
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


def _reduce_dims(x: Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def check_batch_norm_input(x: Tensor, num_features: int | None = None, training: bool = False) -> None:
    """Raise ValueError for input batch normalization cannot handle, saying what was expected."""
    if x.dim() < 2:
        raise ValueError(f"expected input of shape (N, C, ...) with at least 2 dimensions, got {x.dim()}D input")
    if not x.is_floating_point():
        raise ValueError(f"expected a floating-point input, got {x.dtype}")
    if num_features is not None and x.shape[1] != num_features:
        raise ValueError(
            f"expected {num_features} channels (num_features) in dimension 1, got input of shape {tuple(x.shape)}"
        )
    if training and x.numel() // max(x.shape[1], 1) <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")


class _BatchNormTrain(torch.autograd.Function):
    """Training-mode normalization with batch statistics; backward by the compact formula."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        dims, shape = _reduce_dims(x), _channel_shape(x)
        xf = x.float() if x.dtype in _LOW_PRECISION else x
        var, mean = torch.var_mean(xf, dim=dims, correction=0)
        inv_std = torch.rsqrt(var + eps)
        x_hat = (xf - mean.view(shape)) * inv_std.view(shape)
        out = x_hat
        if weight is not None:
            out = out * weight.view(shape).to(out.dtype)
        if bias is not None:
            out = out + bias.view(shape).to(out.dtype)
        ctx.save_for_backward(x_hat, inv_std, weight)
        ctx.input_dtype = x.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        # mean and biased variance leave as non-differentiable outputs for the running averages
        ctx.mark_non_differentiable(mean, var)
        return out.to(x.dtype), mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor, _grad_mean, _grad_var):
        x_hat, inv_std, weight = ctx.saved_tensors
        dims, shape = _reduce_dims(x_hat), _channel_shape(x_hat)
        dy = grad_out.to(x_hat.dtype)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[2]:
            grad_bias = dy.sum(dims).to(ctx.bias_dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (dy * x_hat).sum(dims).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            m = x_hat.numel() // x_hat.shape[1]
            dx_hat = dy if weight is None else dy * weight.view(shape).to(dy.dtype)
            sum_dx_hat = dx_hat.sum(dims).view(shape)
            sum_dx_hat_x_hat = (dx_hat * x_hat).sum(dims).view(shape)
            grad_x = (inv_std.view(shape) / m) * (m * dx_hat - sum_dx_hat - x_hat * sum_dx_hat_x_hat)
            grad_x = grad_x.to(ctx.input_dtype)
        return grad_x, grad_weight, grad_bias, None


def _check_param(name: str, p: Tensor | None, num_channels: int) -> None:
    if p is not None and p.shape != (num_channels,):
        raise ValueError(f"{name} must have shape ({num_channels},), one value per channel, got {tuple(p.shape)}")


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Batch normalization over dimension 1 of ``input`` (N, C), (N, C, L) or (N, C, H, W).

    Training (``training=True``): normalize with the batch mean and biased variance over every
    dimension except 1, and, when running buffers are given, update them in place:
    ``running = (1 - momentum) * running + momentum * batch`` with the *unbiased* variance.
    Evaluation: normalize with ``running_mean`` and ``running_var`` (both required).

    Args:
        input: tensor with channels in dimension 1.
        running_mean, running_var: (C,) buffers or None.
        weight, bias: optional (C,) scale gamma and shift beta.
        training: use batch statistics (and update running ones) instead of running ones.
        momentum: weight of the new batch in the running averages (PyTorch's convention).
        eps: added to the variance before the square root.
    """
    check_batch_norm_input(input, training=training)
    c = input.shape[1]
    for name, p in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        _check_param(name, p, c)
    if eps < 0:
        raise ValueError(f"eps must be non-negative, got {eps}")

    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var must be given in evaluation mode (training=False)")
        shape = _channel_shape(input)
        scale = torch.rsqrt(running_var.float() + eps)
        if weight is not None:
            scale = scale * weight
        shift = -running_mean.float() * scale
        if bias is not None:
            shift = shift + bias
        compute = torch.float32 if input.dtype in _LOW_PRECISION else input.dtype
        out = input.to(compute) * scale.view(shape).to(compute) + shift.view(shape).to(compute)
        return out.to(input.dtype)

    out, mean, var = _BatchNormTrain.apply(input, weight, bias, eps)
    if running_mean is not None or running_var is not None:
        m = input.numel() // c
        with torch.no_grad():
            if running_mean is not None:
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            if running_var is not None:
                unbiased = var * (m / (m - 1))
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    return out
