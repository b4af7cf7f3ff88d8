r"""Batch normalization for padded sequences: statistics over the real tokens only.

A batch of sequences of different lengths is padded to one length T and stored as ``(N, T, C)``
(batch first, as in Transformers). Batch normalization applied naively to the ``N * T`` token
vectors takes its per-channel mean and variance over the padding too, so the statistics change
with how much padding a batch happens to hold. :class:`MaskedBatchNorm1d` takes them over the
real tokens alone,

.. math::
    \mu = \frac{1}{m} \sum_{(n, t)\ \mathrm{real}} x_{nt}, \qquad
    \sigma^2 = \frac{1}{m} \sum_{(n, t)\ \mathrm{real}} (x_{nt} - \mu)^2, \qquad
    y_{nt} = \gamma \frac{x_{nt} - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta,

with m the number of real tokens, and updates the running averages with the same convention as
every layer in :mod:`bnlib.norm` (:func:`bnlib.norm.channels.update_running_stats`). Without
padding it *is* ``BatchNorm1d`` on the ``(N * T, C)`` tokens. What it does not change: the
statistics still mix sentences and positions, and eval mode still uses running averages.

Padding positions are normalized with the same statistics (their outputs are defined but carry
no information; mask them downstream, as attention and the loss do).

The input is channels-last, ``(N, T, C)``, unlike ``torch.nn.BatchNorm1d``'s ``(N, C, L)``. An
``(N, C, L)`` tensor whose C happens to equal T is accepted silently and normalized over the wrong
axis; no check can tell the two layouts apart in general, so transpose before calling.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnlib.norm.channels import affine, in_compute_precision, to_input_precision, update_running_stats
from bnlib.norm.modules import NormBase, normalize_with_running_stats

__all__ = ["MaskedBatchNorm1d", "real_tokens"]


def real_tokens(x: Tensor, padding_mask: Tensor | None) -> Tensor:
    """The token vectors of ``x`` that are not padding, as ``(m, C)``.

    Args:
        x: padded sequences, ``(N, T, C)``.
        padding_mask: ``(N, T)`` booleans, True at padding (the convention of
            ``torch.nn.MultiheadAttention``'s ``key_padding_mask``); None: no padding.
    """
    if x.dim() != 3:
        raise ValueError(f"expected (N, T, C) input, got {x.dim()}D input of shape {tuple(x.shape)}")
    if padding_mask is None:
        return x.reshape(-1, x.shape[-1])
    if padding_mask.shape != x.shape[:2]:
        raise ValueError(f"padding_mask must have shape (N, T) = {tuple(x.shape[:2])}, got {tuple(padding_mask.shape)}")
    if padding_mask.dtype != torch.bool:
        raise ValueError(f"padding_mask must be boolean (True at padding), got {padding_mask.dtype}")
    return x[~padding_mask]


class MaskedBatchNorm1d(NormBase):
    r"""Batch normalization of padded sequences with statistics over the real tokens only.

    In training mode the per-channel mean and biased variance of the real tokens normalize every
    token, and the running averages receive that mean and the unbiased variance (m real tokens:
    factor m / (m - 1)); in eval mode the running averages are used, as in ``BatchNorm1d``.
    Parameters, buffers, ``momentum`` (PyTorch's convention: the weight of the new batch; None
    for a cumulative average) and ``track_running_stats`` behave as in ``torch.nn.BatchNorm1d``.

    Args:
        num_features: channels C (the last dimension of the input).
        eps: added to the variance for numerical stability (> 0). Default: 1e-5.
        momentum: weight of the new batch in the running averages; None: cumulative average.
            Default: 0.1.
        affine: learn a per-channel scale gamma and shift beta. Default: True.
        track_running_stats: keep running averages (eval mode uses them). Default: True.
        device: where the parameters and buffers are created. Default: the default device.
        dtype: their floating dtype. Default: the default dtype.

    Shape:
        Input: ``(N, T, C)``, C = ``num_features``, and an optional ``padding_mask`` ``(N, T)``
        of booleans, True at padding. Channels come LAST, unlike ``torch.nn.BatchNorm1d``'s
        ``(N, C, L)``: an ``(N, C, L)`` tensor with L == ``num_features`` is accepted without
        error and normalized over the wrong axis (the layouts cannot be told apart in general).
        Output: ``(N, T, C)``, same shape as the input.

    Raises:
        ValueError: if the input is not 3-D, its last dimension is not ``num_features``, the
            mask is not a boolean ``(N, T)`` tensor, or batch statistics are needed (training
            mode, or eval mode without running statistics) and fewer than 2 tokens are real.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Normalize ``x`` with the statistics of its real tokens (training) or the running ones.

        Args:
            x: padded sequences, ``(N, T, C)``.
            padding_mask: ``(N, T)`` booleans, True at padding; None: every token is real.

        Raises:
            ValueError: on a wrong shape or mask, or when batch statistics are needed and fewer
                than 2 tokens are real (the variance would be undefined or NaN).
        """
        real = real_tokens(x, padding_mask)  # checks the shapes
        if x.shape[-1] != self.num_features:
            raise ValueError(f"expected {self.num_features} channels in the last dimension, got {x.shape[-1]}")
        tokens = x.reshape(-1, x.shape[-1])
        use_batch_stats = self.training or self.running_mean is None
        if use_batch_stats:
            count = real.shape[0]
            if count < 2:  # training, or eval without running statistics
                raise ValueError(f"need more than 1 real token per channel for batch statistics, got {count}")
            real32 = in_compute_precision(real)
            mean = real32.mean(0)
            var = (real32 - mean).square().mean(0)
            if self.training and self.track_running_stats and self.running_mean is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    factor = 1.0 / float(self.num_batches_tracked)
                else:
                    factor = self.momentum
                update_running_stats(self.running_mean, self.running_var, mean, var, count, factor)
            out = (in_compute_precision(tokens) - mean) * torch.rsqrt(var + self.eps)
        else:
            x32 = in_compute_precision(tokens)
            out = normalize_with_running_stats(x32, self.running_mean, self.running_var, self.eps)
        out = affine(out, self.weight, self.bias)
        return to_input_precision(out, x).reshape(x.shape)
