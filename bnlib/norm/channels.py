r"""What every per-channel normalization in bnlib shares, written once.

- the broadcasting shape of a per-channel vector and the dimensions statistics run over;
- the precision statistics are computed in (float32 for float16 and bfloat16 input);
- the running-average update and its convention.

The running-average convention is PyTorch's: ``momentum`` is the weight of the *new* batch,

.. math::
    \text{running} \leftarrow (1 - \text{momentum})\,\text{running} + \text{momentum}\cdot\text{batch},

with the *unbiased* batch variance :math:`\frac{m}{m-1}\sigma_B^2` (m values per channel), while
normalization itself uses the biased one. Keras and TensorFlow call ``1 - momentum`` the momentum
(0.99 there is 0.01 here); :func:`bnlib.norm.population.convert_momentum` translates.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "LOW_PRECISION",
    "running_average_",
    "affine",
    "channel_shape",
    "in_compute_precision",
    "reduce_dims",
    "to_input_precision",
    "update_running_stats",
]

#: input dtypes whose statistics are computed in float32 (the output keeps the input's dtype)
LOW_PRECISION = (torch.float16, torch.bfloat16)


def channel_shape(x: Tensor) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector against ``x`` ``(N, C, *)``: (1, C, 1, ...).

    Args:
        x: a tensor with channels in dimension 1.
    """
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


def reduce_dims(x: Tensor) -> list[int]:
    """The dimensions batch statistics run over: every one except the channel dimension 1.

    Args:
        x: a tensor with channels in dimension 1.
    """
    return [0] + list(range(2, x.dim()))


def in_compute_precision(x: Tensor) -> Tensor:
    """``x`` in the dtype its statistics are computed in: float32 for float16/bfloat16, else itself.

    Args:
        x: any floating tensor.
    """
    return x.float() if x.dtype in LOW_PRECISION else x


def to_input_precision(out: Tensor, input: Tensor) -> Tensor:
    """A result back in a low-precision input's dtype (float32 parameters would otherwise promote
    it), as torch.nn's layers return it; other dtypes are left as computed.

    Args:
        out: the result, computed in float32 for a low-precision input.
        input: the input it was computed from.
    """
    return out.to(input.dtype) if input.dtype in LOW_PRECISION else out


def affine(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """``x * weight + bias`` per channel of an ``(N, C, *)`` tensor; either may be None.

    Args:
        x: the normalized tensor, ``(N, C, *)``.
        weight: the scale gamma, (C,), or None.
        bias: the shift beta, (C,), or None.
    """
    shape = channel_shape(x)
    if weight is not None:
        x = x * weight.view(shape)
    if bias is not None:
        x = x + bias.view(shape)
    return x


@torch.no_grad()
def running_average_(running: Tensor, value: Tensor, momentum: float) -> Tensor:
    """``running <- (1 - momentum) * running + momentum * value``, in place; returns ``running``.

    Args:
        running: the buffer that holds the running average.
        value: this batch's value, broadcastable to ``running`` (cast to its dtype).
        momentum: weight of the new value (PyTorch's convention, see the module docstring).
    """
    return running.mul_(1 - momentum).add_(value.to(running.dtype), alpha=momentum)


@torch.no_grad()
def update_running_stats(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: int | float,
    momentum: float,
) -> None:
    """Fold one batch's statistics into the running buffers, in place (either may be None).

    ``mean`` and ``var`` are the batch mean and *biased* variance over ``count`` values per
    channel; the running variance receives the unbiased ``var * count / (count - 1)``. See the
    module docstring for the convention.

    Args:
        running_mean: the (C,) running mean, or None.
        running_var: the (C,) running variance, or None.
        mean: the batch mean, (C,).
        var: the biased batch variance, (C,).
        count: values per channel in the batch, m.
        momentum: weight of the new batch.
    """
    if running_mean is not None:
        running_average_(running_mean, mean, momentum)
    if running_var is not None:
        running_average_(running_var, var * (count / (count - 1)), momentum)
