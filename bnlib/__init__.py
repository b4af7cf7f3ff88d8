"""bnlib: batch normalization, implemented and measured, for the executable textbook."""

from bnlib import functional, reference
from bnlib.device import pick_device, setup
from bnlib.distributed import SyncBatchNorm
from bnlib.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "SyncBatchNorm",
    "functional",
    "pick_device",
    "reference",
    "setup",
]
__version__ = "0.1.0"
