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

from bnlib.norm import functional, reference
from bnlib.norm.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from bnlib.norm.sync import SyncBatchNorm
from bnlib.present.setup import full_scale, pick_device, setup

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
