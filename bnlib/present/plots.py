"""One figure style for the whole book: colour-blind-safe colours (Okabe & Ito), light PNGs.

Every chapter calls :func:`use_book_style` once; "without BN" and "with BN" always get the same
colours (:data:`PLAIN`, :data:`BN`) so that figures can be compared across chapters.
"""

from __future__ import annotations

import matplotlib as mpl
from cycler import cycler

__all__ = ["OKABE_ITO", "PLAIN", "BN", "use_book_style"]

#: Okabe & Ito's eight colours, distinguishable with every common kind of colour blindness
OKABE_ITO = {
    "orange": "#E69F00",
    "sky blue": "#56B4E9",
    "bluish green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish purple": "#CC79A7",
    "black": "#000000",
}
#: the colour of networks without batch normalization
PLAIN = OKABE_ITO["vermillion"]
#: the colour of networks with batch normalization
BN = OKABE_ITO["blue"]


def use_book_style() -> None:
    """Set matplotlib's defaults to the book's style (small, light, readable figures)."""
    order = ["blue", "vermillion", "bluish green", "orange", "reddish purple", "sky blue", "black"]
    mpl.rcParams.update(
        {
            "figure.figsize": (6.4, 3.6),
            "figure.dpi": 80,
            "savefig.dpi": 80,
            "figure.constrained_layout.use": True,
            "axes.prop_cycle": cycler(color=[OKABE_ITO[name] for name in order]),
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "font.size": 10,
            "legend.frameon": False,
            "image.cmap": "viridis",
        }
    )
