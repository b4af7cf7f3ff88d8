r"""Alternatives to batch normalization, and the one idea they share: which axes the statistics run over.

Every method here standardizes,

.. math::
    \hat x = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}, \qquad y = \gamma \hat x + \beta,

and they differ only in the set of values :math:`\mu` and :math:`\sigma^2` are taken over. For an
(N, C, H, W) tensor (Wu & He 2018, Fig. 2):

========== ====================== =========================================
method     statistics over        one pair (mu, sigma) per
========== ====================== =========================================
batch      N, H, W                channel
layer      C, H, W                sample
instance   H, W                   sample and channel
group      C/G, H, W              sample and group of C/G channels
========== ====================== =========================================

In code all four are one reshape: view (N, C, *) as (N, G, C/G, S) with S the spatial size, then
reduce over :data:`GROUPED_DIMS` (batch norm also over dimension 0). :func:`normalize` does exactly
that, the layers below call it, and :func:`shares_statistics` draws the picture from the same plan,
so the taxonomy figure and the implementation cannot disagree.

Layers (same constructor arguments, parameter names, buffers and outputs as torch.nn's; float16 and
bfloat16 input is normalized with float32 statistics and comes out in its own dtype):
:class:`LayerNorm`, :class:`GroupNorm`, :class:`InstanceNorm1d`, :class:`InstanceNorm2d`,
:class:`RMSNorm`. Beyond torch.nn: :class:`BatchRenorm` (Ioffe 2017) with its rmax/dmax schedule,
and :class:`GhostBatchNorm` (batch statistics over groups of ``ghost_size`` samples, which is what
one device sees in data-parallel training).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from bnlib.modules import _NormBase

__all__ = [
    "METHODS",
    "AXES",
    "plan",
    "normalize",
    "shares_statistics",
    "LayerNorm",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "RMSNorm",
    "BatchRenorm",
    "GhostBatchNorm",
    "factory",
]

METHODS = ("batch", "layer", "instance", "group")
#: the axes of an (N, C, H, W) tensor each method takes its statistics over
AXES: dict[str, tuple[str, ...]] = {
    "batch": ("N", "H", "W"),
    "layer": ("C", "H", "W"),
    "instance": ("H", "W"),
    "group": ("C/G", "H", "W"),
}
#: dimensions of the grouped view (N, G, C/G, S) that are reduced; batch norm adds dimension 0
GROUPED_DIMS = (2, 3)
#: input dtypes whose statistics are computed in float32 (the output keeps the input's dtype)
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def plan(method: str, num_channels: int, num_groups: int | None = None) -> tuple[int, tuple[int, ...]]:
    """How ``method`` groups an (N, C, *) tensor: the number of groups G and the dimensions of the
    grouped view (N, G, C/G, S) its statistics run over.

    >>> plan("group", 32, 8)
    (8, (2, 3))
    >>> plan("batch", 32)
    (32, (0, 2, 3))
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if method == "group":
        if num_groups is None or num_groups < 1 or num_channels % num_groups:
            raise ValueError(
                f"group normalization needs num_groups dividing num_channels ({num_channels}), got {num_groups}"
            )
        return num_groups, GROUPED_DIMS
    groups = {"batch": num_channels, "layer": 1, "instance": num_channels}[method]
    return groups, ((0,) + GROUPED_DIMS if method == "batch" else GROUPED_DIMS)


def _grouped(x: Tensor, groups: int) -> Tensor:
    # S spelled out rather than -1: an empty batch has no size to infer it from
    return x.reshape(x.shape[0], groups, x.shape[1] // groups, math.prod(x.shape[2:]))


def _compute(x: Tensor) -> Tensor:
    """``x`` in the dtype its statistics are computed in: float32 for float16/bfloat16, else itself."""
    return x.float() if x.dtype in _LOW_PRECISION else x


def _as_input(out: Tensor, input: Tensor) -> Tensor:
    """The result in a low-precision input's dtype (float32 parameters would otherwise promote it),
    as torch.nn's layers return it; other dtypes are left as computed."""
    return out.to(input.dtype) if input.dtype in _LOW_PRECISION else out


def mean_var(x: Tensor, dims: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Mean and biased variance over ``dims`` (kept), by the two-pass formula mean((x - mean)^2).

    Two passes are numerically safe and, on the CPU, many times faster than ``torch.var_mean``
    for the small reductions of these layers.
    """
    dims = tuple(dims)
    mean = x.mean(dims, keepdim=True)
    return mean, (x - mean).pow(2).mean(dims, keepdim=True)


def standardize(x: Tensor, dims: Sequence[int], eps: float) -> Tensor:
    """(x - mean) / sqrt(var + eps) with the mean and biased variance over ``dims`` (kept)."""
    mean, var = mean_var(x, dims)
    return (x - mean) * torch.rsqrt(var + eps)


def normalize(x: Tensor, method: str, num_groups: int | None = None, eps: float = 1e-5) -> Tensor:
    r"""Standardize an (N, C, *) tensor with the statistics ``method`` uses (no scale or shift).

    .. math:: \hat x = (x - \mu) / \sqrt{\sigma^2 + \epsilon}, statistics over :data:`AXES` [method].
    """
    if x.dim() < 2:
        raise ValueError(f"expected input of shape (N, C, ...), got {x.dim()}D input")
    groups, dims = plan(method, x.shape[1], num_groups)
    out = standardize(_grouped(_compute(x), groups), dims, eps)
    return out.reshape(x.shape).to(x.dtype)


def shares_statistics(
    method: str, shape: Sequence[int], index: Sequence[int] | None = None, num_groups: int | None = None
) -> Tensor:
    """Boolean mask over ``shape`` (N, C, *): the values normalized with the same mean and variance
    as the value at ``index`` (default: the first), following :func:`plan`, the code path of :func:`normalize`.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f"shape needs at least (N, C), got {shape}")
    index = (0,) * len(shape) if index is None else tuple(index)
    groups, dims = plan(method, shape[1], num_groups)
    ids = _grouped(torch.arange(math.prod(shape)).reshape(shape), groups)
    where = (ids == int(torch.arange(math.prod(shape)).reshape(shape)[index])).nonzero()[0]
    mask = torch.ones_like(ids, dtype=torch.bool)
    for d in range(4):
        if d not in dims:  # a kept dimension: same statistics only at the same coordinate
            keep = torch.zeros(ids.shape[d], dtype=torch.bool)
            keep[where[d]] = True
            mask &= keep.view([-1 if k == d else 1 for k in range(4)])
    return mask.reshape(shape)


def _normalized_shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    """The trailing shape a layer or RMS norm normalizes over, as a tuple; ValueError if empty or not positive."""
    shape = (int(shape),) if isinstance(shape, numbers.Integral) else tuple(int(s) for s in shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"normalized_shape must be non-empty and positive, got {shape}")
    return shape


def _factory(device, dtype) -> dict:
    return {"device": device, "dtype": dtype}


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

    Shape:
        Input: (N, *, normalized_shape). Output: same shape.
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

    def forward(self, input: Tensor) -> Tensor:
        k = len(self.normalized_shape)
        if tuple(input.shape[-k:]) != self.normalized_shape:
            raise ValueError(f"expected input ending in {self.normalized_shape}, got shape {tuple(input.shape)}")
        out = standardize(_compute(input), range(-k, 0), self.eps)
        if self.weight is not None:
            out = out * self.weight
        if self.bias is not None:
            out = out + self.bias
        return _as_input(out, input)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
            f"bias={self.bias is not None}"
        )


class GroupNorm(nn.Module):
    r"""Group normalization (Wu & He 2018): per sample, over groups of C/G channels and all positions.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    statistics over (C/G, H, W) (:func:`normalize` with ``"group"``); gamma and beta per channel.
    G = 1 is layer normalization over (C, H, W), G = C instance normalization.

    Args:
        num_groups: G, dividing ``num_channels``.
        num_channels: C.
        eps: added to the variance. Default: 1e-5.
        affine: learn per-channel ``weight`` (ones) and ``bias`` (zeros). Default: True.
        bias: with ``affine``, also learn beta (keyword only). Default: True.

    Shape:
        Input: (N, C, *). Output: same shape.
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

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 2 or input.shape[1] != self.num_channels:
            raise ValueError(f"expected input (N, {self.num_channels}, *), got shape {tuple(input.shape)}")
        x = _compute(input)
        return _as_input(_affine(normalize(x, "group", self.num_groups, self.eps), self.weight, self.bias), input)

    def extra_repr(self) -> str:
        return (
            f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
            f"bias={self.bias is not None}"
        )


def _affine(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    if weight is not None:
        x = x * weight.view(shape)
    if bias is not None:
        x = x + bias.view(shape)
    return x


class _ChannelNorm(_NormBase):
    """Per-channel parameters and optional running statistics (:class:`bnlib.modules._NormBase`)."""

    def _update(self, mean: Tensor, unbiased_var: Tensor, factor: float) -> None:
        with torch.no_grad():
            self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
            self.running_var.mul_(1 - factor).add_(unbiased_var.to(self.running_var.dtype), alpha=factor)

    def _eval(self, x: Tensor) -> Tensor:
        shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        return (x - self.running_mean.view(shape)) * torch.rsqrt(self.running_var.view(shape) + self.eps)


class _InstanceNorm(_ChannelNorm):
    r"""Instance normalization (Ulyanov et al. 2016): per sample and channel, over positions only.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    statistics over (H, W) (:func:`normalize` with ``"instance"``). As in torch.nn, ``affine`` and
    ``track_running_stats`` default to False; with running statistics, training updates them with
    the batch average of the per-instance mean and unbiased variance (``num_batches_tracked`` is
    not advanced, and ``momentum=None`` freezes them), and evaluation uses them.

    Unbatched input (C, *) is accepted. Normalizing with the input's own statistics (training,
    or evaluation without running statistics) needs more than one position per instance: one
    position would always give zero (plus beta), so it raises ValueError, as torch.nn does.
    An empty batch gives an empty output and leaves the running statistics as they are.
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
        x = _compute(x)
        if use_input_stats:
            out = normalize(x, "instance", eps=self.eps)
            if self.training and self.track_running_stats and x.numel() > 0:
                flat = x.detach().reshape(x.shape[0], x.shape[1], -1)
                mean, var = mean_var(flat, (2,))
                m = flat.shape[2]
                unbiased = var * m / max(m - 1, 1)
                self._update(mean.mean((0, 2)), unbiased.mean((0, 2)), 0.0 if self.momentum is None else self.momentum)
        else:
            out = self._eval(x)
        out = _as_input(_affine(out, self.weight, self.bias), input)
        return out.squeeze(0) if unbatched else out


class InstanceNorm1d(_InstanceNorm):
    """Instance normalization over (N, C, L) or unbatched (C, L) input; see :class:`_InstanceNorm`."""

    _dims = (2, 3)


class InstanceNorm2d(_InstanceNorm):
    """Instance normalization over (N, C, H, W) or unbatched (C, H, W) input; see :class:`_InstanceNorm`."""

    _dims = (3, 4)


class RMSNorm(nn.Module):
    r"""Root-mean-square normalization (Zhang & Sennrich 2019): rescale only, no centering.

    .. math:: y = \frac{x}{\sqrt{\mathrm{mean}(x^2) + \epsilon}} \cdot \gamma

    with the mean over the trailing ``normalized_shape`` dimensions. ``eps=None`` uses the machine
    epsilon of the input's dtype, as torch.nn.RMSNorm does.
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

    def forward(self, input: Tensor) -> Tensor:
        k = len(self.normalized_shape)
        if tuple(input.shape[-k:]) != self.normalized_shape:
            raise ValueError(f"expected input ending in {self.normalized_shape}, got shape {tuple(input.shape)}")
        eps = torch.finfo(input.dtype).eps if self.eps is None else self.eps
        x = _compute(input)
        out = x * torch.rsqrt(x.pow(2).mean(dim=tuple(range(-k, 0)), keepdim=True) + eps)
        return _as_input(out * self.weight if self.weight is not None else out, input)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class BatchRenorm(_ChannelNorm):
    r"""Batch renormalization (Ioffe 2017) over (N, C, *) input, optionally in ghost batches.

    Training, with batch statistics :math:`\mu_B, \sigma_B = \sqrt{\mathrm{Var}_B + \epsilon}` and
    running ones :math:`\mu, \sigma = \sqrt{\text{running\_var} + \epsilon}`:

    .. math::
        r = \mathrm{clip}_{[1/r_{max}, r_{max}]}\Big(\frac{\sigma_B}{\sigma}\Big),\quad
        d = \mathrm{clip}_{[-d_{max}, d_{max}]}\Big(\frac{\mu_B - \mu}{\sigma}\Big),\quad
        \hat x = \frac{x - \mu_B}{\sigma_B}\, r + d,\quad y = \gamma \hat x + \beta,

    with no gradient through r and d. Unclipped, :math:`\hat x = (x - \mu)/\sigma`: the output
    no longer depends on the batch companions, and training computes what evaluation computes.
    With r_max = 1 and d_max = 0 it is batch normalization. The limits follow a schedule in
    updates: (1, 0) for ``warmup_steps``, then a linear ramp over ``ramp_steps`` to
    (``rmax``, ``dmax``). The running averages (PyTorch's convention: unbiased variance, weight
    ``momentum`` for the new batch; the paper averages sigma instead) are updated once per update.
    Evaluation: :math:`(x - \mu)/\sigma`, as batch normalization's.

    Args:
        num_features: number of channels C.
        eps, momentum, affine: as in batch normalization; momentum defaults to 0.01 here (long
            averages, as the paper recommends, since the running statistics enter training).
        rmax, dmax: final clipping limits (>= 1 and >= 0). Defaults 3 and 5 (the paper's).
        warmup_steps: updates with plain batch normalization (r = 1, d = 0).
        ramp_steps: updates over which the limits grow linearly to (rmax, dmax).
        ghost_size: if given, the batch is split into consecutive groups of this many samples and
            each group is normalized with its own statistics (the running averages use their
            average): what each device computes in data-parallel training without synchronization.

    As with ``torch.nn.BatchNorm2d``, an empty batch gives an empty output and leaves the running
    statistics as they are, though it counts as an update (``num_batches_tracked``).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.01,
        affine: bool = True,
        rmax: float = 3.0,
        dmax: float = 5.0,
        warmup_steps: int = 0,
        ramp_steps: int = 0,
        ghost_size: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, True, device, dtype)
        if momentum is None:
            raise ValueError("momentum must be a number for batch renormalization")
        if rmax < 1 or dmax < 0:
            raise ValueError(f"need rmax >= 1 and dmax >= 0, got rmax={rmax}, dmax={dmax}")
        if warmup_steps < 0 or ramp_steps < 0:
            raise ValueError(f"warmup_steps and ramp_steps must be non-negative, got {warmup_steps}, {ramp_steps}")
        if ghost_size is not None and ghost_size < 2:
            raise ValueError(f"ghost_size must be at least 2 (or None), got {ghost_size}")
        self.rmax, self.dmax = float(rmax), float(dmax)
        self.warmup_steps, self.ramp_steps, self.ghost_size = warmup_steps, ramp_steps, ghost_size

    def limits(self, step: int | None = None) -> tuple[float, float]:
        """The clipping limits (r_max, d_max) in force at update ``step`` (default: the next one)."""
        t = int(self.num_batches_tracked) if step is None else step
        if t < self.warmup_steps:
            frac = 0.0
        elif self.ramp_steps == 0:
            frac = 1.0
        else:
            frac = min(1.0, (t - self.warmup_steps) / self.ramp_steps)
        return 1.0 + (self.rmax - 1.0) * frac, self.dmax * frac

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 2 or input.shape[1] != self.num_features:
            raise ValueError(f"expected input (N, {self.num_features}, *), got shape {tuple(input.shape)}")
        if not self.training:
            return _as_input(_affine(self._eval(_compute(input)), self.weight, self.bias), input)
        n, c = input.shape[:2]
        if input.numel() == 0:  # as torch.nn.BatchNorm: an empty output, the update counted, no statistics
            self.num_batches_tracked.add_(1)
            return _as_input(_affine(_compute(input), self.weight, self.bias), input)
        g = self.ghost_size or n
        if n % g:
            raise ValueError(f"batch size {n} is not a multiple of ghost_size {g}")
        if g * input[0, 0].numel() < 2:
            raise ValueError(f"expected more than 1 value per channel when training, got input size {input.shape}")
        x = _compute(input).reshape(n // g, g, c, -1)  # (groups, samples, C, positions)
        mean, var = mean_var(x, (1, 3))
        std_b = torch.sqrt(var + self.eps)
        x_hat = (x - mean) / std_b
        rmax, dmax = self.limits()
        if rmax > 1.0 or dmax > 0.0:
            shape = (1, 1, c, 1)
            std = torch.sqrt(self.running_var + self.eps).view(shape)
            r = (std_b.detach() / std).clamp(1.0 / rmax, rmax)
            d = ((mean.detach() - self.running_mean.view(shape)) / std).clamp(-dmax, dmax)
            x_hat = x_hat * r + d
        m = g * x.shape[3]
        self._update(mean.detach().mean((0, 1, 3)), var.detach().mean((0, 1, 3)) * m / max(m - 1, 1), self.momentum)
        self.num_batches_tracked.add_(1)
        return _as_input(_affine(x_hat.reshape(input.shape), self.weight, self.bias), input)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, rmax={self.rmax}, dmax={self.dmax}, "
            f"warmup_steps={self.warmup_steps}, ramp_steps={self.ramp_steps}, ghost_size={self.ghost_size}"
        )


class GhostBatchNorm(BatchRenorm):
    """Batch normalization with statistics over groups of ``ghost_size`` samples (Hoffer et al. 2017).

    It is :class:`BatchRenorm` with r_max = 1 and d_max = 0; with ``ghost_size=None`` it computes
    what ``torch.nn.BatchNorm1d/2d`` computes. Momentum defaults to 0.1, as in batch normalization.
    """

    def __init__(
        self,
        num_features: int,
        ghost_size: int | None = None,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, 1.0, 0.0, ghost_size=ghost_size, device=device, dtype=dtype
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, ghost_size={self.ghost_size}, eps={self.eps}, momentum={self.momentum}"


def factory(method: str, spatial: bool = False, **kwargs) -> Callable[[int], nn.Module]:
    """A ``norm`` factory for :mod:`bnlib.models`: called with a channel count, returns the layer.

    ``method``: "batch" (``bnlib.BatchNorm1d``/``2d``), "ghost" (:class:`GhostBatchNorm`, needs
    ``ghost_size``), "renorm" (:class:`BatchRenorm`), "group" (:class:`GroupNorm`, ``num_groups``
    default 8), "layer" (fc features: :class:`LayerNorm`; conv features: ``GroupNorm(1, C)``, the
    same statistics), "instance" (conv features only), "rms" (fc features only).
    ``spatial``: the features are (N, C, H, W) rather than (N, C). Other keyword arguments go to the layer.
    """
    from bnlib.modules import BatchNorm1d, BatchNorm2d

    allowed = {"batch", "ghost", "renorm", "group", "layer"} | ({"instance"} if spatial else {"rms"})
    if method not in allowed:
        raise ValueError(f"no {method!r} normalization for {'conv' if spatial else 'fully connected'} features")

    def make(c: int) -> nn.Module:
        kw = dict(kwargs)
        if method == "batch":
            return (BatchNorm2d if spatial else BatchNorm1d)(c, **kw)
        if method == "ghost":
            return GhostBatchNorm(c, **kw)
        if method == "renorm":
            return BatchRenorm(c, **kw)
        if method == "group":
            return GroupNorm(kw.pop("num_groups", 8), c, **kw)
        if method == "layer":
            return GroupNorm(1, c, **kw) if spatial else LayerNorm(c, **kw)
        if method == "instance":
            return InstanceNorm2d(c, **{"affine": True, **kw})
        return RMSNorm(c, **kw)

    return make
