"""Tables, rounding and glue for what chapters print, so that stored outputs are portable and readable.

The notebook tests re-execute every chapter and compare its outputs with the stored ones, on any
CPU (and on CUDA). So what a chapter prints is one of two kinds:

- **exact**: deterministic mathematics, printed at a precision that does not depend on the last
  bit; a quantity at round-off level is printed as a fixed bound (:func:`bound`), which cannot flip;
- **measured**: a result of training runs, glued with the tolerance it is compared by
  (:func:`glue` with ``tol=``, or a :class:`~bnlib.lab.seeds.Spread`, whose tolerance is its seed-to-seed
  range). Cells that print such results are tagged ``bnbook-measured``: their text is for the
  reader, and the tests compare their glued values within the declared tolerance.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from bnlib.lab.seeds import Spread

__all__ = ["GLUE_DIGITS", "TOLERANCE_KEY", "Table", "bound", "glue", "upper_decade"]

#: significant digits of a glued float
GLUE_DIGITS = 6
#: the output metadata key of a glued measured value's tolerance, ``{"bnbook": {"tolerance": t}}``
TOLERANCE_KEY = "bnbook"
GLUE_PREFIX = "application/papermill.record/"  # myst-nb's mime prefix for glued (not displayed) values


def upper_decade(x: float) -> float:
    """Smallest power of ten at or above ``|x|`` (0 for 0): a bound that last-bit noise does not move.

    Args:
        x: any finite number (NaN raises ValueError).

    >>> upper_decade(2.4e-7)
    1e-06
    """
    x = abs(float(x))
    if math.isnan(x):
        raise ValueError("upper_decade of NaN is undefined")
    if x == 0.0:
        return 0.0
    return 10.0 ** math.ceil(math.log10(x))


def bound(x: float, below: float) -> str:
    """Text for a quantity at round-off level: ``"< 1e-12"`` for ``below=1e-12``, the same on every machine.

    The text depends only on ``below``, never on the last bits of ``x``, so it cannot flip between
    CPUs; and it is a check: a value at or above ``below`` (or NaN) raises instead of printing.

    Args:
        x: the quantity, e.g. a relative error.
        below: the bound it must stay under, chosen from the precision (float64: 1e-12 for relative
            errors; float32: 1e-5), never from the value seen.

    >>> bound(3e-16, below=1e-12)
    '< 1e-12'
    """
    if not below > 0:
        raise ValueError(f"below must be positive, got {below}")
    x = abs(float(x))
    if not x < below:  # also catches NaN
        raise ValueError(f"{x:.3g} is not below {below:.0e}: not at round-off level")
    return f"< {below:.0e}"


class Table:
    """A small table that renders as HTML in the book and as aligned text elsewhere.

    Cells are formatted with ``str`` (format numbers before adding them). The last expression of a
    cell shows it: Jupyter uses the HTML, a plain console the text.

    Args:
        headers: one title per column.
        rows: the rows, each with one cell per header (ValueError otherwise).
        caption: a line above the table; empty for none.
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


def _plain(value: object) -> object:
    """NumPy and torch scalars as Python numbers; floats rounded to GLUE_DIGITS significant digits."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()
    if isinstance(value, float) and math.isfinite(value):
        value = float(f"{value:.{GLUE_DIGITS}g}")
    return value


def glue(name: str, value: object, display: bool = False, tol: float | None = None, resolution: float = 0.0) -> None:
    """Store ``value`` under ``name`` for the book's text (``{glue:text}`name```) via myst-nb.

    NumPy and torch scalars are stored as plain Python numbers (NumPy 2 would otherwise store
    ``np.float64(...)``, which the text formats cannot read), and floats are rounded to
    :data:`GLUE_DIGITS` significant digits. Where myst-nb is not installed (Colab, a bare kernel)
    this does nothing, so chapters run anywhere.

    Measured values (results of training) carry the tolerance the notebook tests compare them by:

    - ``tol``: an absolute tolerance, declared with the value;
    - a :class:`~bnlib.lab.seeds.Spread` as ``value``: ``name`` gets the mean, ``name-min`` and
      ``name-max`` the range, each with tolerance ``max(range, resolution)``, where ``resolution``
      is the smallest change the measurement can show (the recording interval of a step count,
      one test example of an accuracy).

    Without a tolerance the value is compared exactly.

    Args:
        name: the key the text refers to.
        value: a number, a string, a figure, or a :class:`~bnlib.lab.seeds.Spread`.
        display: also show the value in the cell's output (not with ``tol``).
        tol: the absolute tolerance a measured value is compared by; None for exact.
        resolution: for a Spread, the smallest change the measurement can show (widens the tolerance).
    """
    if isinstance(value, Spread):
        if tol is not None:
            raise ValueError("a Spread carries its own tolerance (its range); pass resolution= to widen it")
        width = max(value.range, float(resolution))
        for key, part in ((name, value.mean), (f"{name}-min", value.min), (f"{name}-max", value.max)):
            glue(key, part, tol=width)
        return
    if tol is not None and not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be finite and non-negative, got {tol}")
    value = _plain(value)
    try:
        import IPython
        from myst_nb import glue as myst_glue
    except ImportError:
        return
    if tol is None or display:
        if tol is not None:
            raise ValueError("a displayed glue cannot carry a tolerance")
        myst_glue(name, value, display=display)
        return
    # myst-nb's glue record, with the tolerance beside it in the output's metadata.
    bundle, metadata = IPython.core.formatters.format_display_data(value)
    metadata["scrapbook"] = {"name": name, "mime_prefix": GLUE_PREFIX}
    metadata[TOLERANCE_KEY] = {"tolerance": float(tol)}
    IPython.display.display({GLUE_PREFIX + k: v for k, v in bundle.items()}, raw=True, metadata=metadata)
