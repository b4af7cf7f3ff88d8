"""One figure style for the whole book: colour-blind-safe colours (Okabe & Ito), light PNGs.

Every chapter calls :func:`use_book_style` once; "without BN" and "with BN" always get the same
colours (:data:`PLAIN`, :data:`BN`) so that figures can be compared across chapters.
"""

from __future__ import annotations

import matplotlib as mpl
import numpy as np
from cycler import cycler
from matplotlib.axes import Axes
from matplotlib.collections import PolyCollection

__all__ = ["OKABE_ITO", "PLAIN", "BN", "draw_statistics_cube", "use_book_style"]

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


def draw_statistics_cube(ax: Axes, mask: np.ndarray, color: str, dx: float = 0.55, dy: float = 0.45) -> None:
    """Draw an oblique view of a boolean ``(N, C, S)`` mask as a cube of cells on ``ax``.

    C runs to the right, S = H * W up and N into the page; the visible faces are the first
    example (front), the last position (top) and the last channel (right). Cells where the mask
    is True are filled with ``color``, the others light grey. Used for the picture of which values
    share one mean and variance (:func:`~bnlib.norm.taxonomy.shares_statistics`).

    Args:
        ax: the axes to draw on (its limits, aspect and axis labels are set).
        mask: boolean array of shape (N, C, S).
        color: fill colour of the True cells.
        dx: horizontal offset of one step into the page.
        dy: vertical offset of one step into the page.

    Raises:
        ValueError: ``mask`` is not 3-D, or has an empty axis.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3 or 0 in mask.shape:
        raise ValueError(f"mask must have shape (N, C, S), all positive, got {mask.shape}")
    n_, c_, s_ = mask.shape

    def corner(c: float, s: float, n: float) -> tuple[float, float]:
        return (c + n * dx, s + n * dy)

    polys, shaded = [], []
    for c in range(c_):
        for s in range(s_):  # front face: the first example
            polys.append([corner(c, s, 0), corner(c + 1, s, 0), corner(c + 1, s + 1, 0), corner(c, s + 1, 0)])
            shaded.append(mask[0, c, s])
        for n in range(n_):  # top face: the last position
            polys.append([corner(c, s_, n), corner(c + 1, s_, n), corner(c + 1, s_, n + 1), corner(c, s_, n + 1)])
            shaded.append(mask[n, c, s_ - 1])
    for n in range(n_):
        for s in range(s_):  # right face: the last channel
            polys.append([corner(c_, s, n), corner(c_, s, n + 1), corner(c_, s + 1, n + 1), corner(c_, s + 1, n)])
            shaded.append(mask[n, c_ - 1, s])
    faces = [color if f else "#f2f2f2" for f in shaded]
    ax.add_collection(PolyCollection(polys, facecolors=faces, edgecolors="#888888", linewidths=0.4))
    ax.set_xlim(-0.6, c_ + n_ * dx + 0.6)
    ax.set_ylim(-1.2, s_ + n_ * dy + 0.3)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.annotate("", xy=(c_, -0.5), xytext=(0, -0.5), arrowprops={"arrowstyle": "->", "lw": 0.8})
    ax.text(c_ / 2, -1.15, "C", ha="center", fontsize=9)
    ax.text(-0.45, s_ / 2, "H, W", ha="right", va="center", fontsize=9, rotation=90)
    ax.text(c_ + n_ * dx + 0.15, s_ + n_ * dy * 0.5, "N", fontsize=9)
