"""Portable notebook comparison: nbval's exact comparison, plus tolerances for measured values.

nbval compares every stored output of a notebook exactly. That is right for deterministic
mathematics and wrong for results of training, whose last bits (and, through chaotic training,
more than the last bits) depend on the CPU's kernels. This plugin changes two things:

- **glued values** (myst-nb glue records) are matched by name. A value stored with a tolerance
  (output metadata ``{"bnbook": {"tolerance": t}}``, written by ``bnlib.present.report.glue``) passes when
  it is within ``t`` of the stored one; any other glued text is compared exactly. A glued figure is
  only required to exist: its bytes differ from CPU to CPU and are never compared.
- **cells tagged** ``bnbook-measured`` (they print results of training runs for the reader) have
  their printed text and displays left uncompared; their glued values, and anything they write to
  stderr, still are.

Everything else (untagged cells, stdout, HTML, error names) keeps nbval's exact comparison.
"""

from __future__ import annotations

import math

from nbval.plugin import IPyNbCell

MEASURED_TAG = "bnbook-measured"
GLUE_PREFIX = "application/papermill.record/"
TOLERANCE_KEY = "bnbook"

_exact_compare = IPyNbCell.compare_outputs


def _glue_name(output) -> str | None:
    scrapbook = (output.get("metadata") or {}).get("scrapbook")
    return scrapbook.get("name") if isinstance(scrapbook, dict) else None


def _split(outputs) -> tuple[dict, list]:
    """Glue records by name, and every other output."""
    glued, rest = {}, []
    for output in outputs:
        name = _glue_name(output)
        if name is None:
            rest.append(output)
        else:
            glued[name] = output
    return glued, rest


def _as_number(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def compare_glued(name: str, stored, fresh, sanitize=lambda s: s) -> str | None:
    """Why a freshly glued value does not match the stored one, or None when it does."""
    stored_data, fresh_data = stored.get("data", {}), fresh.get("data", {})
    if set(stored_data) != set(fresh_data):
        return f"glue {name!r}: stored as {sorted(stored_data)}, now {sorted(fresh_data)}"
    if any(key.startswith(GLUE_PREFIX + "image/") for key in stored_data):
        return None  # a figure: it exists, and its pixels are not compared
    key = GLUE_PREFIX + "text/plain"
    old, new = sanitize(stored_data.get(key)), sanitize(fresh_data.get(key))
    tol = ((stored.get("metadata") or {}).get(TOLERANCE_KEY) or {}).get("tolerance")
    if tol is None:
        return None if old == new else f"glue {name!r}: stored {old}, now {new} (compared exactly)"
    a, b = _as_number(old), _as_number(new)
    if a is None or b is None:
        return f"glue {name!r}: a value with a tolerance must be a number, got {old!r} and {new!r}"
    if math.isnan(a) or math.isnan(b):
        return None if math.isnan(a) and math.isnan(b) else f"glue {name!r}: stored {a}, now {b}"
    slack = 1e-6 * max(abs(a), abs(b))  # glued floats carry 6 significant digits
    if abs(a - b) <= tol + slack:
        return None
    return f"glue {name!r}: stored {a:g}, now {b:g}, differs by {abs(a - b):.3g} > tolerance {tol:g}"


def portable_compare(self: IPyNbCell, test, ref, skip_compare=None) -> bool:
    """nbval's ``compare_outputs`` with glued values and measured cells compared as described above."""
    test_glued, test_rest = _split(test)
    ref_glued, ref_rest = _split(ref)
    problems = []
    for name in sorted(set(ref_glued) | set(test_glued)):
        if name not in test_glued:
            problems.append(f"glue {name!r} is no longer produced")
        elif name not in ref_glued:
            problems.append(f"glue {name!r} is new (re-execute the notebook to store it)")
        else:
            problem = compare_glued(name, ref_glued[name], test_glued[name], self.sanitize)
            if problem:
                problems.append(problem)
    if MEASURED_TAG in self.cell.metadata.get("tags", []):
        # Printed text of a measured cell is for the reader; stderr (a new warning) still counts.
        test_rest = [o for o in test_rest if o.get("output_type") == "stream" and o.get("name") == "stderr"]
        ref_rest = [o for o in ref_rest if o.get("output_type") == "stream" and o.get("name") == "stderr"]
    same = _exact_compare(self, test_rest, ref_rest, skip_compare)
    if problems:
        if same:
            self.comparison_traceback = []
        self.comparison_traceback.extend(problems)
        return False
    return same


def install() -> None:
    """Make every nbval cell compare portably (called once from the root conftest)."""
    IPyNbCell.compare_outputs = portable_compare
