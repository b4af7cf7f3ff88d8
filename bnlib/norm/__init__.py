"""The batch-normalization library: what a user imports.

- :mod:`~bnlib.norm.reference`: the NumPy reading copy of the equations, forward and backward;
- :mod:`~bnlib.norm.functional`: Algorithm 1 for torch tensors as written (``algorithm_1``), and
  ``batch_norm``, the same made fast, with the compact backward and a compiled backend
  (:mod:`~bnlib.norm.compiled`);
- :mod:`~bnlib.norm.modules`: ``BatchNorm1d/2d/3d``, drop-in replacements for torch.nn's;
- :mod:`~bnlib.norm.taxonomy`, :mod:`~bnlib.norm.per_sample`, :mod:`~bnlib.norm.renorm`,
  :mod:`~bnlib.norm.factory`: the alternatives (layer, group, instance, RMS norm, batch renorm,
  ghost batches) and the axes they normalize over;
- :mod:`~bnlib.norm.sync`: synchronized batch norm across processes;
- :mod:`~bnlib.norm.sequence`: batch norm of padded sequences, over the real tokens only;
- :mod:`~bnlib.norm.normalizer_free`: training without normalization (weight standardization,
  adaptive gradient clipping, Fixup, normalizer-free residual blocks);
- :mod:`~bnlib.norm.fusion`: folding BN into the preceding layer for inference;
- :mod:`~bnlib.norm.population`: running averages and recomputed population statistics;
- :mod:`~bnlib.norm.channels`: what all of them share (shapes, precision, the running-average update).

The alternatives' names are re-exported here (``bnlib.norm.GroupNorm``, ``bnlib.norm.factory(...)``);
each is documented in the module that defines it.
"""

from bnlib.norm.factory import factory
from bnlib.norm.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from bnlib.norm.per_sample import GroupNorm, InstanceNorm1d, InstanceNorm2d, LayerNorm, RMSNorm
from bnlib.norm.renorm import BatchRenorm, GhostBatchNorm
from bnlib.norm.sync import SyncBatchNorm
from bnlib.norm.taxonomy import AXES, GROUPED_DIMS, METHODS, normalize, plan, shares_statistics

__all__ = [
    "AXES",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "SyncBatchNorm",
    "GROUPED_DIMS",
    "METHODS",
    "BatchRenorm",
    "GhostBatchNorm",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "LayerNorm",
    "RMSNorm",
    "factory",
    "normalize",
    "plan",
    "shares_statistics",
]
