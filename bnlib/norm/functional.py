r"""Batch normalization for PyTorch tensors: Ioffe & Szegedy's Algorithm 1, then the same made fast.

Algorithm 1 (training mode) takes, for every channel, the m values of that channel in a mini-batch
(every example, every position). Each line of the paper is one line of :func:`algorithm_1`
(``dims``: every dimension except the channel dimension 1)::

    step                  Algorithm 1                                     algorithm_1
    mini-batch mean       mu_B = 1/m sum_i x_i                            mean = x.mean(dims)
    mini-batch variance   sigma2_B = 1/m sum_i (x_i - mu_B)^2             var = ((x - mean) ** 2).mean(dims)
    normalize             x_hat_i = (x_i - mu_B) / sqrt(sigma2_B + eps)   x_hat = (x - mean) / torch.sqrt(var + eps)
    scale and shift       y_i = gamma * x_hat_i + beta                    y = gamma * x_hat + beta

gamma and beta are the layer's ``weight`` and ``bias``; the variance is the biased one (divided by
m). :func:`algorithm_1` is exactly these four lines, with autograd for the backward: read it first.

:func:`batch_norm` computes the same (to rounding) and is what the layers call. It has the signature
and semantics of ``torch.nn.functional.batch_norm``: evaluation mode (Algorithm 2) is one fixed
multiply-add per channel with the running statistics, and training mode updates them. Its training
mode runs a custom autograd Function, built for speed and memory:

- The backward is the compact formula instead of autograd's graph of small operations::

      dx = (inv_std / m) * (m * dx_hat - sum(dx_hat) - x_hat * sum(dx_hat * x_hat)),  dx_hat = gamma * dy

  and the forward saves only what it needs: the centred input (one input-sized tensor; x_hat is
  that times inv_std), inv_std and the weight. x_hat is never stored.
- Eager PyTorch runs one kernel per operation and every kernel reads and writes whole tensors, so
  the code counts passes over memory. The statistics are two-pass, as above: the mean, then sums of
  the centred input (on a CPU, torch's Welford ``var_mean`` over several dimensions took four to six
  times as long in interleaved measurements; the benchmarks appendix times it on the machine that
  builds the book). The output is one multiply-add of the centred input, and the backward regroups the compact
  formula per channel as ``dx = a * dy + b * x_hat + c``, two fused multiply-adds.
- The centred input also carries the digits a float32 mean loses when ``|mean| >> std``: the input is
  centred on the rounded mean (exactly) and the mean of the remainder, ``d``, corrects mean and
  variance (as :func:`bnlib.norm.reference.batch_mean_var_shifted` does in NumPy), so large-mean
  inputs keep float32 accuracy relative to their spread.
- Statistics of float16/bfloat16 inputs are accumulated in float32.

``backend="compiled"`` sends the same formulas through ``torch.compile`` (see
:mod:`bnlib.norm.compiled`), which fuses them into a few generated kernels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from bnlib.norm import compiled
from bnlib.norm.channels import LOW_PRECISION, channel_shape, reduce_dims, update_running_stats

__all__ = ["BACKENDS", "algorithm_1", "batch_norm", "check_batch_norm_input"]

#: the values of :func:`batch_norm`'s ``backend`` argument
BACKENDS = ("eager", "compiled")


def algorithm_1(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Training-mode batch normalization, one line per step of Algorithm 1 (the reading copy).

    Autograd differentiates it. :func:`batch_norm` with ``training=True`` computes the same output
    (to rounding) with fewer passes over memory, a hand-written backward, float32 statistics for
    half-precision input, and the running averages.

    Args:
        x: the mini-batch, channels in dimension 1: (N, C), (N, C, L), (N, C, H, W), ...
        weight: gamma, the scale, (C,); None for 1.
        bias: beta, the shift, (C,); None for 0.
        eps: added to the variance before the square root.

    Shape:
        Input: ``(N, C, *)``. Output: same shape as the input.
    """
    dims = reduce_dims(x)  # every dimension except the channels: m = N * (positions) values per channel
    mean = x.mean(dims, keepdim=True)  # mini-batch mean mu_B
    var = ((x - mean) ** 2).mean(dims, keepdim=True)  # mini-batch variance sigma_B^2 (biased)
    x_hat = (x - mean) / torch.sqrt(var + eps)  # normalize
    gamma = 1.0 if weight is None else weight.view(channel_shape(x))
    beta = 0.0 if bias is None else bias.view(channel_shape(x))
    return gamma * x_hat + beta  # scale and shift


def check_batch_norm_input(x: Tensor, num_features: int | None = None, training: bool = False) -> None:
    """Raise ValueError for input batch normalization cannot handle, saying what was expected.

    Args:
        x: the input, channels in dimension 1.
        num_features: the number of channels expected; None to accept any.
        training: whether batch statistics will be taken (then one value per channel is too few).
    """
    if x.dim() < 2:
        raise ValueError(f"expected input of shape (N, C, ...) with at least 2 dimensions, got {x.dim()}D input")
    if not x.is_floating_point():
        raise ValueError(f"expected a floating-point input, got {x.dtype}")
    if num_features is not None and x.shape[1] != num_features:
        raise ValueError(
            f"expected {num_features} channels (num_features) in dimension 1, got input of shape {tuple(x.shape)}"
        )
    # values per channel: N * (spatial size). Exactly one cannot give a variance; none (an empty
    # batch) is allowed, as in torch: the output is empty and the running statistics are left alone
    if training and math.prod(x.shape[:1] + x.shape[2:]) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")


class _BatchNormTrain(torch.autograd.Function):
    """Training-mode normalization with batch statistics; backward by the compact formula.

    The four steps of :func:`algorithm_1`, rearranged to pass over memory as few times as possible
    (see the module docstring): the comments name each step.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        dims, shape = reduce_dims(x), channel_shape(x)
        m = x.numel() // x.shape[1]
        low = x.dtype in LOW_PRECISION
        shift = x.mean(dims, keepdim=True, dtype=torch.float32 if low else None)  # mini-batch mean, rounded
        # centre on the (rounded) mean: x - shift is exact when |mean| >> std, and the small
        # remainder d = mean(x - shift) recovers the digits the rounded mean lost
        x_c = x.float().sub_(shift) if low else x - shift
        d = x_c.sum(dims) / m
        # mini-batch variance (biased): mean((x_c - d)^2), the mean being shift + d
        var = (torch.mul(x_c, x_c).sum(dims) / m - d * d).clamp_(min=0)
        inv_std = torch.rsqrt(var + eps)  # normalize: x_hat = (x_c - d) * inv_std
        # scale and shift: y = weight * x_hat + bias = scale * x_c + (bias - scale * d), one pass,
        # x_hat never stored
        scale = inv_std if weight is None else inv_std * weight.to(inv_std.dtype)
        offset = -scale * d if bias is None else bias.to(scale.dtype) - scale * d
        out = torch.addcmul(offset.view(shape), x_c, scale.view(shape))
        ctx.save_for_backward(x_c, d, inv_std, weight)
        ctx.input_dtype = x.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        shift = shift.view(-1)
        mean = torch.where(shift.isfinite(), shift + d, shift)  # an infinite mean stays infinite, as in torch
        # mean and biased variance leave as non-differentiable outputs for the running averages
        ctx.mark_non_differentiable(mean, var)
        return out.to(x.dtype), mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor, _grad_mean, _grad_var):
        x_c, d, inv_std, weight = ctx.saved_tensors
        dims, shape = reduce_dims(x_c), channel_shape(x_c)
        m = x_c.numel() // x_c.shape[1]
        dy = grad_out.to(x_c.dtype)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_weight = grad_bias = None
        sum_dy = dy.sum(dims)
        prod = dy * x_c if (need_x or need_w) else None
        # x_hat = (x_c - d) * inv_std, so sum(dy * x_hat) = inv_std * (sum(dy * x_c) - d * sum(dy))
        sum_dy_x_hat = (prod.sum(dims) - d * sum_dy) * inv_std if prod is not None else None
        if need_b:
            grad_bias = sum_dy.to(ctx.bias_dtype)
        if need_w:
            grad_weight = sum_dy_x_hat.to(weight.dtype)
        if need_x:
            # sum(dx_hat) = weight * sum(dy) and sum(dx_hat * x_hat) = weight * sum(dy * x_hat), so
            # dx = (inv_std / m) (m dx_hat - sum(dx_hat) - x_hat sum(dx_hat x_hat)) = a dy + B x_hat + C
            # with a = weight inv_std, B = -a sum(dy x_hat) / m, C = -a sum(dy) / m; in terms of x_c:
            # dx = a dy + b x_c + c with b = B inv_std, c = C - b d
            a = inv_std if weight is None else inv_std * weight.to(inv_std.dtype)
            b = -a * sum_dy_x_hat / m * inv_std
            c = -a * sum_dy / m - b * d
            grad_x = torch.addcmul(c.view(shape), x_c, b.view(shape), out=prod)  # reuse the memory of dy * x_c
            grad_x.addcmul_(dy, a.view(shape))
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
    *,
    backend: str = "eager",
) -> Tensor:
    """Batch normalization over dimension 1 of ``input`` (N, C), (N, C, L) or (N, C, H, W).

    Training (``training=True``): normalize with the batch mean and biased variance over every
    dimension except 1 (:func:`algorithm_1`, computed faster; see the module docstring), and,
    when running buffers are given, update them in place:
    ``running = (1 - momentum) * running + momentum * batch`` with the *unbiased* variance.
    Evaluation: normalize with ``running_mean`` and ``running_var`` (both required).

    Args:
        input: tensor with channels in dimension 1.
        running_mean: (C,) buffer, or None.
        running_var: (C,) buffer, or None.
        weight: the scale gamma, (C,), or None for 1.
        bias: the shift beta, (C,), or None for 0.
        training: use batch statistics (and update running ones) instead of running ones.
        momentum: weight of the new batch in the running averages (PyTorch's convention).
        eps: added to the variance before the square root.
        backend: ``"eager"`` (default) or ``"compiled"``: the training-mode formulas through
            ``torch.compile``, falling back to eager with a warning where compiling fails.
            Evaluation mode is one multiply-add per element and always runs eagerly.
    """
    check_batch_norm_input(input, training=training)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    c = input.shape[1]
    for name, p in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        _check_param(name, p, c)
    if eps < 0:
        raise ValueError(f"eps must be non-negative, got {eps}")

    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var must be given in evaluation mode (training=False)")
        shape = channel_shape(input)
        # one affine map per channel (Algorithm 2): y = scale * x + shift, one pass over the input,
        # in the input's precision (float32 for half inputs)
        compute = torch.float32 if input.dtype in LOW_PRECISION else input.dtype
        scale = torch.rsqrt(running_var.to(compute) + eps)
        if weight is not None:
            scale = scale * weight.to(compute)
        shift = -running_mean.to(compute) * scale
        if bias is not None:
            shift = shift + bias.to(compute)
        out = torch.addcmul(shift.view(shape), input.to(compute), scale.view(shape))
        return out.to(input.dtype)

    if input.numel() == 0:
        # as torch: an empty output that stays connected to weight and bias (their gradients are 0)
        shape = channel_shape(input)
        out = input.clone()
        if weight is not None:
            out = out * weight.view(shape).to(out.dtype)
        if bias is not None:
            out = out + bias.view(shape).to(out.dtype)
        return out

    result = compiled.train_forward(input, weight, bias, eps) if backend == "compiled" else None
    if result is None:  # eager, or compiling was not possible here
        result = _BatchNormTrain.apply(input, weight, bias, eps)
    out, mean, var = result
    update_running_stats(running_mean, running_var, mean, var, input.numel() // c, momentum)
    return out
