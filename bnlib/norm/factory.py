"""Build a normalization layer by name: the ``norm`` argument of :mod:`bnlib.lab.models`."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from bnlib.norm.modules import BatchNorm1d, BatchNorm2d
from bnlib.norm.per_sample import GroupNorm, InstanceNorm2d, LayerNorm, RMSNorm
from bnlib.norm.renorm import BatchRenorm, GhostBatchNorm

__all__ = ["factory"]


def factory(method: str, spatial: bool = False, **kwargs) -> Callable[[int], nn.Module]:
    """A ``norm`` factory for :mod:`bnlib.lab.models`: called with a channel count, returns the layer.

    Args:
        method: which normalization:

            - ``"batch"``: :class:`~bnlib.norm.modules.BatchNorm1d` (``BatchNorm2d`` when ``spatial``);
            - ``"ghost"``: :class:`~bnlib.norm.renorm.GhostBatchNorm` (needs ``ghost_size``);
            - ``"renorm"``: :class:`~bnlib.norm.renorm.BatchRenorm`;
            - ``"group"``: :class:`~bnlib.norm.per_sample.GroupNorm` (``num_groups`` default 8);
            - ``"layer"``: :class:`~bnlib.norm.per_sample.LayerNorm` for fc features, ``GroupNorm(1, C)``
              (the same statistics) for conv features;
            - ``"instance"``: :class:`~bnlib.norm.per_sample.InstanceNorm2d` (conv features only);
            - ``"rms"``: :class:`~bnlib.norm.per_sample.RMSNorm` (fc features only).
        spatial: the features are (N, C, H, W) rather than (N, C).
        **kwargs: passed on to the layer.
    """
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
