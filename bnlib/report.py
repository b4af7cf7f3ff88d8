"""Tables and rounding for what chapters print, so that stored outputs are stable and readable.

A chapter's printed numbers are compared by nbval on every test run, so they are rounded to what
is stable across runs (:func:`upper_decade` for tiny differences, fixed digits elsewhere).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

__all__ = ["GLUE_DIGITS", "Table", "bound", "glue", "upper_decade"]

GLUE_DIGITS = 6  # significant digits of a glued float


def upper_decade(x: float) -> float:
    """Smallest power of ten at or above |x| (0 for 0): a bound that last-bit noise does not move.

    >>> upper_decade(2.4e-7)
    1e-06
    """
    x = abs(float(x))
    if math.isnan(x):
        raise ValueError("upper_decade of NaN is undefined")
    if x == 0.0:
        return 0.0
    return 10.0 ** math.ceil(math.log10(x))


def bound(x: float) -> str:
    """Text for a small non-negative quantity: "0" when exactly zero, else "< 1e-06"-style (its upper decade)."""
    d = upper_decade(x)
    return "0" if d == 0 else f"< {d:.0e}"


class Table:
    """A small table that renders as HTML in the book and as aligned text elsewhere.

    Cells are formatted with ``str`` (format numbers before adding them).
    """

    def __init__(self, headers: Sequence[str], rows: Sequence[Sequence[object]], caption: str = "") -> None:
        width = len(headers)
        for row in rows:
            if len(row) != width:
                raise ValueError(f"every row needs {width} cells (one per header), got {len(row)}: {row!r}")
        self.headers = [str(h) for h in headers]
        self.rows = [[str(c) for c in row] for row in rows]
        self.caption = caption

    def __repr__(self) -> str:
        widths = [max(len(r[i]) for r in [self.headers, *self.rows]) for i in range(len(self.headers))]
        lines = [self.caption] if self.caption else []
        for k, row in enumerate([self.headers, *self.rows]):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        esc = html.escape
        head = "".join(f"<th>{esc(h)}</th>" for h in self.headers)
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in self.rows)
        caption = f"<caption>{esc(self.caption)}</caption>" if self.caption else ""
        return f'<table class="bnlib-table">{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def glue(name: str, value: object, display: bool = False) -> None:
    """Store ``value`` under ``name`` for the book's text (``{glue:text}`name```) via myst-nb.

    NumPy and torch scalars are stored as plain Python numbers (NumPy 2 would otherwise store
    ``np.float64(...)``, which the text formats cannot read), and floats are rounded to
    :data:`GLUE_DIGITS` significant digits: the text shows fewer, and the stored value (which the
    notebook tests compare) then does not depend on last-bit rounding. Where myst-nb is not
    installed (Colab, a bare kernel) this does nothing, so chapters run anywhere.
    """
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()
    if isinstance(value, float) and math.isfinite(value):
        value = float(f"{value:.{GLUE_DIGITS}g}")
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        return
    myst_glue(name, value, display=display)
