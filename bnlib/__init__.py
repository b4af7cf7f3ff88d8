"""bnlib: batch normalization, implemented and measured, for the executable textbook.

Four layers, each importing only from those below it (``make test`` checks this):

- :mod:`bnlib.norm`: the library a user imports: the NumPy reading copy, the functional form and
  its compiled backend, the torch.nn-compatible layers, the alternatives, synchronized batch norm,
  folding and population statistics;
- :mod:`bnlib.lab`: the laboratory the chapters run: data, models, the training loop, measurements,
  seeds, and each chapter's own experiments in :mod:`bnlib.lab.experiments`;
- :mod:`bnlib.present`: what a chapter page shows: tables, glued values, plots, widgets, setup;
- :mod:`bnlib.bench`: kernel benchmarks.

No private name (leading underscore) crosses a module boundary. The book's appendix "The bnlib
API" (``book/api.md``) documents every public name, generated from the docstrings.
"""

import importlib
from typing import Any

from bnlib.norm import functional, reference
from bnlib.norm.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from bnlib.norm.sync import SyncBatchNorm

_CHAPTER_SETUP = ("full_scale", "pick_device", "setup")  # from bnlib.present.setup, loaded on first use


def __getattr__(name: str) -> Any:
    # A chapter's set-up belongs to the presentation layer: importing the library (bnlib.norm) must
    # not load it, so these names are looked up only when used.
    if name in _CHAPTER_SETUP:
        return getattr(importlib.import_module("bnlib.present.setup"), name)
    raise AttributeError(f"module 'bnlib' has no attribute {name!r}")

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "SyncBatchNorm",
    "full_scale",
    "functional",
    "pick_device",
    "reference",
    "setup",
]
__version__ = "0.2.0"
