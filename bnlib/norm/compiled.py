"""The training-mode batch-norm formulas through ``torch.compile``: fused kernels, same results.

Eager PyTorch runs one kernel per operation, each reading and writing whole tensors; a compiler
can fuse the forward into two passes over the input (statistics, then normalize) and the compact
backward into two more (the two per-channel sums, then dx), the minimum for these formulas. On a
CPU, inductor generates C++ and compiles it with the machine's C++ compiler; on a GPU, Triton.

The formulas are the ones of :mod:`bnlib.norm.functional`::

    x_hat = (x - mean) / sqrt(var + eps),  y = weight * x_hat + bias
    dx = (inv_std / m) * (m * dx_hat - sum(dx_hat) - x_hat * sum(dx_hat * x_hat)),  dx_hat = weight * dy

Here the forward saves the input itself (plus per-channel statistics) and the fused backward
recomputes x_hat on the fly, so nothing input-sized is written for backward alone.

Use it through ``bnlib.norm.functional.batch_norm(..., backend="compiled")``. The first call for a
new input shape pays a one-time compile (tens of seconds on a small CPU). Where compiling is not
possible (no C++ compiler, an unsupported Python, any compiler error) it warns once, says why, and
runs the eager implementation instead.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from bnlib.norm.channels import channel_shape, in_compute_precision, reduce_dims

__all__ = ["available", "reset", "train_forward"]

_state: dict[str, object] = {"kernels": None, "failed": None}


def _forward_kernel(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
    """Batch statistics (two-pass, float32 for half inputs) and y = weight * x_hat + bias.

    As in :mod:`bnlib.norm.functional`, the input is centred on the rounded mean (exact when
    |mean| >> std) and the remainder ``d`` corrects it, so large means keep float32 accuracy.
    """
    dims, shape = reduce_dims(x), channel_shape(x)
    xf = in_compute_precision(x)
    shift = xf.mean(dims, keepdim=True)
    x_c = xf - shift
    d = x_c.mean(dims)
    var = ((x_c * x_c).mean(dims) - d * d).clamp(min=0)
    inv_std = torch.rsqrt(var + eps)
    out = (x_c - d.view(shape)) * inv_std.view(shape)
    if weight is not None:
        out = out * weight.view(shape).to(out.dtype)
    if bias is not None:
        out = out + bias.view(shape).to(out.dtype)
    shift = shift.view(-1)
    mean = torch.where(shift.isfinite(), shift + d, shift)
    return out.to(x.dtype), mean, var, shift, d, inv_std


def _backward_kernel(dy: Tensor, x: Tensor, shift: Tensor, d: Tensor, inv_std: Tensor, weight: Tensor | None):
    """(dx, dweight, dbias) by the compact formula, x_hat recomputed from the saved input."""
    dims, shape = reduce_dims(x), channel_shape(x)
    m = x.numel() // x.shape[1]
    compute = inv_std.dtype
    x_hat = ((x.to(compute) - shift.view(shape)) - d.view(shape)) * inv_std.view(shape)
    dy = dy.to(compute)
    sum_dy = dy.sum(dims)
    sum_dy_x_hat = (dy * x_hat).sum(dims)
    a = inv_std if weight is None else inv_std * weight.to(compute)
    dx = a.view(shape) * (dy - sum_dy.view(shape) / m - x_hat * (sum_dy_x_hat.view(shape) / m))
    return dx.to(x.dtype), sum_dy_x_hat, sum_dy


def _kernels():
    if _state["kernels"] is None:
        _state["kernels"] = (torch.compile(_forward_kernel), torch.compile(_backward_kernel))
    return _state["kernels"]


def _fall_back(error: BaseException) -> None:
    reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    _state["failed"] = reason
    warnings.warn(
        f"bnlib: torch.compile could not compile batch norm here ({reason}); "
        "using the eager implementation instead (same results, slower).",
        RuntimeWarning,
        stacklevel=4,
    )


class _CompiledBatchNormTrain(torch.autograd.Function):
    """Training-mode batch norm whose forward and compact backward are compiled kernels."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        forward_kernel, _ = _kernels()
        out, mean, var, shift, d, inv_std = forward_kernel(x, weight, bias, eps)
        ctx.save_for_backward(x, shift, d, inv_std, weight)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor, _grad_mean, _grad_var):
        x, shift, d, inv_std, weight = ctx.saved_tensors
        args = (grad_out, x, shift, d, inv_std, weight)
        if _state["failed"] is None:
            try:
                dx, dweight, dbias = _kernels()[1](*args)
            except Exception as error:  # noqa: BLE001 - the backward compiles at its first call
                _fall_back(error)
        if _state["failed"] is not None:
            dx, dweight, dbias = _backward_kernel(*args)  # the same formulas, run eagerly
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        return (
            dx if need_x else None,
            dweight.to(weight.dtype) if need_w else None,
            dbias.to(ctx.bias_dtype) if need_b else None,
            None,
        )


def available() -> tuple[bool, str]:
    """Whether the compiled path is in use: ``(True, "")``, or ``(False, reason)`` after a fallback."""
    failed = _state["failed"]
    return (failed is None, "" if failed is None else str(failed))


def reset() -> None:
    """Forget compiled kernels and any earlier failure (the next call compiles again)."""
    _state["kernels"] = None
    _state["failed"] = None


def train_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
    """``(out, mean, biased var)`` of training-mode batch norm through the compiled kernels, or
    None where compiling is not possible here (the caller then runs its eager implementation).

    The backward pass is compiled too. Any error while compiling (which happens at the first
    call for a shape) switches this process to the eager formulas with one warning.

    Args:
        x: the input, ``(N, C, *)``.
        weight: the scale gamma, (C,), or None.
        bias: the shift beta, (C,), or None.
        eps: added to the variance before the square root.
    """
    if _state["failed"] is None:
        try:
            return _CompiledBatchNormTrain.apply(x, weight, bias, eps)
        except Exception as error:  # noqa: BLE001 - any compiler failure means: run eagerly
            _fall_back(error)
    return None
