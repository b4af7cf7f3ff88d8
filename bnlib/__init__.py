"""bnlib: batch normalization, implemented and measured, for the executable textbook."""

from bnlib import functional, reference
from bnlib.device import pick_device, setup
from bnlib.modules import BatchNorm1d, BatchNorm2d

__all__ = ["BatchNorm1d", "BatchNorm2d", "functional", "pick_device", "reference", "setup"]
__version__ = "0.1.0"
