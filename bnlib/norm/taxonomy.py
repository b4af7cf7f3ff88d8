r"""The one idea batch normalization and its alternatives share: which axes the statistics run over.

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

In code all four are one reshape: view ``(N, C, *)`` as (N, G, C/G, S) with S the spatial size, then
reduce over :data:`GROUPED_DIMS` (batch norm also over dimension 0). :func:`normalize` does exactly
that, the layers in :mod:`bnlib.norm.per_sample` call it, and :func:`shares_statistics` draws the
picture from the same plan, so the taxonomy figure and the implementation cannot disagree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from bnlib.norm.channels import in_compute_precision

__all__ = [
    "AXES",
    "GROUPED_DIMS",
    "METHODS",
    "grouped_view",
    "mean_var",
    "normalize",
    "plan",
    "shares_statistics",
    "standardize",
]

#: the four methods, by the name :func:`normalize` and :func:`plan` take
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


def plan(method: str, num_channels: int, num_groups: int | None = None) -> tuple[int, tuple[int, ...]]:
    """How ``method`` groups an ``(N, C, *)`` tensor: the number of groups G and the dimensions of the
    grouped view (N, G, C/G, S) its statistics run over.

    >>> plan("group", 32, 8)
    (8, (2, 3))
    >>> plan("batch", 32)
    (32, (0, 2, 3))

    Args:
        method: one of :data:`METHODS`.
        num_channels: C.
        num_groups: G, for ``"group"`` only.
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


def grouped_view(x: Tensor, groups: int) -> Tensor:
    """View ``(N, C, *)`` as (N, groups, C/groups, S), S the spatial size: the view every method reduces.

    Args:
        x: the tensor, ``(N, C, *)``.
        groups: G, dividing C.
    """
    # S spelled out rather than -1: an empty batch has no size to infer it from
    return x.reshape(x.shape[0], groups, x.shape[1] // groups, math.prod(x.shape[2:]))


def mean_var(x: Tensor, dims: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Mean and biased variance over ``dims`` (kept), by the two-pass formula mean((x - mean)^2).

    Two passes are numerically safe and, on the CPU, many times faster than ``torch.var_mean``
    for the small reductions of these layers.

    Args:
        x: any tensor.
        dims: the dimensions to reduce.
    """
    dims = tuple(dims)
    mean = x.mean(dims, keepdim=True)
    return mean, (x - mean).pow(2).mean(dims, keepdim=True)


def standardize(x: Tensor, dims: Sequence[int], eps: float) -> Tensor:
    """(x - mean) / sqrt(var + eps) with the mean and biased variance over ``dims`` (kept).

    Args:
        x: any tensor.
        dims: the dimensions the statistics run over.
        eps: added to the variance.
    """
    mean, var = mean_var(x, dims)
    return (x - mean) * torch.rsqrt(var + eps)


def normalize(x: Tensor, method: str, num_groups: int | None = None, eps: float = 1e-5) -> Tensor:
    r"""Standardize an ``(N, C, *)`` tensor with the statistics ``method`` uses (no scale or shift).

    .. math:: \hat x = (x - \mu) / \sqrt{\sigma^2 + \epsilon}, statistics over :data:`AXES` [method].

    Args:
        x: the tensor, ``(N, C, *)``.
        method: one of :data:`METHODS`.
        num_groups: G, for ``"group"`` only.
        eps: added to the variance.
    """
    if x.dim() < 2:
        raise ValueError(f"expected input of shape (N, C, ...), got {x.dim()}D input")
    groups, dims = plan(method, x.shape[1], num_groups)
    out = standardize(grouped_view(in_compute_precision(x), groups), dims, eps)
    return out.reshape(x.shape).to(x.dtype)


def shares_statistics(
    method: str, shape: Sequence[int], index: Sequence[int] | None = None, num_groups: int | None = None
) -> Tensor:
    """Boolean mask over ``shape`` ``(N, C, *)``: the values normalized with the same mean and variance
    as the value at ``index`` (default: the first), following :func:`plan`, the code path of :func:`normalize`.

    Args:
        method: one of :data:`METHODS`.
        shape: the tensor's shape, ``(N, C, *)``.
        index: the value to start from; default the first.
        num_groups: G, for ``"group"`` only.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f"shape needs at least (N, C), got {shape}")
    index = (0,) * len(shape) if index is None else tuple(index)
    groups, dims = plan(method, shape[1], num_groups)
    ids = grouped_view(torch.arange(math.prod(shape)).reshape(shape), groups)
    where = (ids == int(torch.arange(math.prod(shape)).reshape(shape)[index])).nonzero()[0]
    mask = torch.ones_like(ids, dtype=torch.bool)
    for d in range(4):
        if d not in dims:  # a kept dimension: same statistics only at the same coordinate
            keep = torch.zeros(ids.shape[d], dtype=torch.bool)
            keep[where[d]] = True
            mask &= keep.view([-1 if k == d else 1 for k in range(4)])
    return mask.reshape(shape)
