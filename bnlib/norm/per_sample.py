r"""Normalization layers whose statistics are per sample: layer, group, instance and RMS normalization.

Same constructor arguments, parameter names, buffers and outputs as torch.nn's; float16 and
bfloat16 input is normalized with float32 statistics and comes out in its own dtype. Which axes
each one reduces is set out in :mod:`bnlib.norm.taxonomy`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bnlib.norm.channels import affine, in_compute_precision, to_input_precision, update_running_stats
from bnlib.norm.modules import NormBase, normalize_with_running_stats
from bnlib.norm.taxonomy import mean_var, normalize, standardize

__all__ = ["GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNormBase", "LayerNorm", "RMSNorm"]


def _normalized_shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    """The trailing shape a layer or RMS norm normalizes over, as a tuple; ValueError if empty or not positive."""
    shape = (int(shape),) if isinstance(shape, numbers.Integral) else tuple(int(s) for s in shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"normalized_shape must be non-empty and positive, got {shape}")
    return shape


def _factory(device, dtype) -> dict:
    return {"device": device, "dtype": dtype}



def _reset_affine_(weight: Tensor | None, bias: Tensor | None) -> None:
    """The elementwise affine at its start: gamma = 1, beta = 0 (either may be absent)."""
    if weight is not None:
        nn.init.ones_(weight)
    if bias is not None:
        nn.init.zeros_(bias)

class LayerNorm(nn.Module):
    r"""Layer normalization (Ba et al. 2016): statistics per sample over the last dimensions.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    with the mean and biased variance over the trailing ``normalized_shape`` dimensions; the same
    computation in training and evaluation (no running statistics).

    Args:
        normalized_shape: the trailing shape to normalize over (an int for the last dimension).
        eps: added to the variance. Default: 1e-5.
        elementwise_affine: learn ``weight`` (gamma, ones) and ``bias`` (beta, zeros) of
            ``normalized_shape``. Default: True.
        bias: with ``elementwise_affine``, also learn beta. Default: True.
        device: where the parameters are created. Default: the default device.
        dtype: their floating dtype. Default: the default dtype.

    Shape:
        Input: ``(N, *, normalized_shape)``. Output: same shape.
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.normalized_shape = _normalized_shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        kw = _factory(device, dtype)
        self.weight = nn.Parameter(torch.ones(self.normalized_shape, **kw)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(self.normalized_shape, **kw)) if elementwise_affine and bias else None

    def reset_parameters(self) -> None:
        """gamma = 1 and beta = 0, as at construction (as torch.nn's)."""
        _reset_affine_(self.weight, getattr(self, "bias", None))

    def forward(self, input: Tensor) -> Tensor:
        k = len(self.normalized_shape)
        if tuple(input.shape[-k:]) != self.normalized_shape:
            raise ValueError(f"expected input ending in {self.normalized_shape}, got shape {tuple(input.shape)}")
        out = standardize(in_compute_precision(input), range(-k, 0), self.eps)
        if self.weight is not None:
            out = out * self.weight
        if self.bias is not None:
            out = out + self.bias
        return to_input_precision(out, input)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
            f"bias={self.bias is not None}"
        )


class GroupNorm(nn.Module):
    r"""Group normalization (Wu & He 2018): per sample, over groups of C/G channels and all positions.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    statistics over (C/G, H, W) (:func:`~bnlib.norm.taxonomy.normalize` with ``"group"``); gamma and beta per channel.
    G = 1 is layer normalization over (C, H, W), G = C instance normalization.

    Args:
        num_groups: G, dividing ``num_channels``.
        num_channels: C.
        eps: added to the variance. Default: 1e-5.
        affine: learn per-channel ``weight`` (ones) and ``bias`` (zeros). Default: True.
        device: where the parameters are created. Default: the default device.
        dtype: their floating dtype. Default: the default dtype.
        bias: with ``affine``, also learn beta (keyword only). Default: True.

    Shape:
        Input: ``(N, C, *)``. Output: same shape.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if num_groups < 1 or num_channels % num_groups != 0:
            raise ValueError(f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})")
        self.num_groups, self.num_channels, self.eps, self.affine = num_groups, num_channels, eps, affine
        kw = _factory(device, dtype)
        self.weight = nn.Parameter(torch.ones(num_channels, **kw)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_channels, **kw)) if affine and bias else None

    def reset_parameters(self) -> None:
        """gamma = 1 and beta = 0, as at construction (as torch.nn's)."""
        _reset_affine_(self.weight, getattr(self, "bias", None))

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 2 or input.shape[1] != self.num_channels:
            raise ValueError(f"expected input (N, {self.num_channels}, *), got shape {tuple(input.shape)}")
        x = in_compute_precision(input)
        out = affine(normalize(x, "group", self.num_groups, self.eps), self.weight, self.bias)
        return to_input_precision(out, input)

    def extra_repr(self) -> str:
        return (
            f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
            f"bias={self.bias is not None}"
        )


class InstanceNormBase(NormBase):
    r"""Instance normalization (Ulyanov et al. 2016): per sample and channel, over positions only.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    statistics over (H, W) (:func:`~bnlib.norm.taxonomy.normalize` with ``"instance"``). As in torch.nn, ``affine`` and
    ``track_running_stats`` default to False; with running statistics, training updates them with
    the batch average of the per-instance mean and unbiased variance (``num_batches_tracked`` is
    not advanced, and ``momentum=None`` freezes them), and evaluation uses them.

    Unbatched input ``(C, *)`` is accepted. Normalizing with the input's own statistics (training,
    or evaluation without running statistics) needs more than one position per instance: one
    position would always give zero (plus beta), so it raises ValueError, as torch.nn does.
    An empty batch gives an empty output and leaves the running statistics as they are.

    Args:
        num_features: number of channels C.
        eps: added to the variance (> 0). Default: 1e-5.
        momentum: weight of the new batch in the running averages (with ``track_running_stats``);
            ``None`` freezes them. Default: 0.1.
        affine: learn a per-channel scale (``weight``, ones) and shift (``bias``, zeros). Default: False.
        track_running_stats: keep running averages of the per-instance mean and unbiased variance,
            update them in training and normalize with them in evaluation. Default: False.
        device: where the parameters and buffers are created. Default: the default device.
        dtype: their floating dtype. Default: the default dtype.
        bias: with ``affine``, also learn the shift beta (keyword only). Default: True.

    Shape:
        Input: ``(N, C, *)`` or unbatched ``(C, *)``; each subclass fixes the number of dimensions.
        Output: same shape as the input.
    """

    _dims: tuple[int, ...] = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() not in self._dims:
            expected = " or ".join(f"{d}D" for d in self._dims)
            raise ValueError(f"expected {expected} input (got {input.dim()}D input)")
        unbatched = input.dim() == self._dims[0]
        x = input.unsqueeze(0) if unbatched else input
        if x.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} channels in dimension 1, got shape {tuple(x.shape)}")
        use_input_stats = self.training or not self.track_running_stats
        if use_input_stats and math.prod(x.shape[2:]) == 1:
            raise ValueError(
                "expected more than 1 spatial element per instance when normalizing with the input's own "
                f"statistics (training, or track_running_stats=False), got input size {tuple(input.shape)}"
            )
        x = in_compute_precision(x)
        if use_input_stats:
            out = normalize(x, "instance", eps=self.eps)
            if self.training and self.track_running_stats and x.numel() > 0:
                flat = x.detach().reshape(x.shape[0], x.shape[1], -1)
                mean, var = mean_var(flat, (2,))
                momentum = 0.0 if self.momentum is None else self.momentum
                update_running_stats(
                    self.running_mean, self.running_var, mean.mean((0, 2)), var.mean((0, 2)), flat.shape[2], momentum
                )
        else:
            out = normalize_with_running_stats(x, self.running_mean, self.running_var, self.eps)
        out = to_input_precision(affine(out, self.weight, self.bias), input)
        return out.squeeze(0) if unbatched else out


class InstanceNorm1d(InstanceNormBase):
    """Instance normalization over (N, C, L) or unbatched (C, L) input, per sample and channel over L values.

    A drop-in replacement for ``torch.nn.InstanceNorm1d``; the behaviour is that of
    :class:`~bnlib.norm.per_sample.InstanceNormBase`.

    Args:
        num_features: number of channels C.
        eps: added to the variance (> 0). Default: 1e-5.
        momentum: weight of the new batch in the running averages (with ``track_running_stats``);
            ``None`` freezes them. Default: 0.1.
        affine: learn a per-channel scale (``weight``, ones) and shift (``bias``, zeros). Default: False.
        track_running_stats: keep running averages of the per-instance mean and unbiased variance,
            update them in training and normalize with them in evaluation. Default: False.
        device: where the parameters and buffers are created. Default: the default device.
        dtype: their floating dtype. Default: the default dtype.
        bias: with ``affine``, also learn the shift beta (keyword only). Default: True.

    Shape:
        Input: (N, C, L) or (C, L). Output: same shape as the input.
    """

    _dims = (2, 3)


class InstanceNorm2d(InstanceNormBase):
    """Instance normalization over (N, C, H, W) or unbatched (C, H, W) input, per sample and channel
    over ``H*W`` values.

    A drop-in replacement for ``torch.nn.InstanceNorm2d``; the behaviour is that of
    :class:`~bnlib.norm.per_sample.InstanceNormBase`.

    Args:
        num_features: number of channels C.
        eps: added to the variance (> 0). Default: 1e-5.
        momentum: weight of the new batch in the running averages (with ``track_running_stats``);
            ``None`` freezes them. Default: 0.1.
        affine: learn a per-channel scale (``weight``, ones) and shift (``bias``, zeros). Default: False.
        track_running_stats: keep running averages of the per-instance mean and unbiased variance,
            update them in training and normalize with them in evaluation. Default: False.
        device: where the parameters and buffers are created. Default: the default device.
        dtype: their floating dtype. Default: the default dtype.
        bias: with ``affine``, also learn the shift beta (keyword only). Default: True.

    Shape:
        Input: (N, C, H, W) or (C, H, W). Output: same shape as the input.
    """

    _dims = (3, 4)


class RMSNorm(nn.Module):
    r"""Root-mean-square normalization (Zhang & Sennrich 2019): rescale only, no centering.

    .. math:: y = \frac{x}{\sqrt{\mathrm{mean}(x^2) + \epsilon}} \cdot \gamma

    with the mean over the trailing ``normalized_shape`` dimensions. ``eps=None`` uses the machine
    epsilon of the input's dtype, as torch.nn.RMSNorm does.

    Args:
        normalized_shape: the trailing shape to normalize over (an int for the last dimension).
        eps: added to the mean square; None for the machine epsilon of the input's dtype. Default: None.
        elementwise_affine: learn ``weight`` (gamma, ones) of ``normalized_shape``; there is no
            shift. Default: True.
        device: where the parameter is created. Default: the default device.
        dtype: its floating dtype. Default: the default dtype.

    Shape:
        Input: ``(N, *, normalized_shape)``. Output: same shape.
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float | None = None,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.normalized_shape = _normalized_shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        kw = _factory(device, dtype)
        self.weight = nn.Parameter(torch.ones(self.normalized_shape, **kw)) if elementwise_affine else None

    def reset_parameters(self) -> None:
        """gamma = 1 and beta = 0, as at construction (as torch.nn's)."""
        _reset_affine_(self.weight, getattr(self, "bias", None))

    def forward(self, input: Tensor) -> Tensor:
        k = len(self.normalized_shape)
        if tuple(input.shape[-k:]) != self.normalized_shape:
            raise ValueError(f"expected input ending in {self.normalized_shape}, got shape {tuple(input.shape)}")
        eps = torch.finfo(input.dtype).eps if self.eps is None else self.eps
        x = in_compute_precision(input)
        out = x * torch.rsqrt(x.pow(2).mean(dim=tuple(range(-k, 0)), keepdim=True) + eps)
        return to_input_precision(out * self.weight if self.weight is not None else out, input)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
