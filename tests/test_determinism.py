"""Determinism of the book: every chapter, executed twice from a fresh kernel, gives the same outputs.

Slow (every chapter runs twice), so it runs only when asked: ``make determinism`` (which sets
``BNBOOK_DETERMINISM=1``). Each chapter in ``_toc.yml`` is executed twice in memory (the stored
notebook is not touched), in its own folder, and the two runs' outputs are compared cell by cell:
text, HTML, images and errors, after the same sanitizing nbval applies (``tests/nbval_sanitize.cfg``)
and with widget model ids masked. Cells tagged ``nbval-ignore-output`` (timings, device names) are
left out, exactly as nbval leaves them out.

Each run's execution time and the kernel's peak memory are recorded too; after the last chapter a
table compares them with the book's budget (each chapter under 60 s, the book under 4 minutes, peak
memory under 2 GB) and they are written to ``_build/determinism.json`` (:func:`budget_report`). The
budget is reported, not asserted: timings depend on the machine and its load.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from book_status import toc_files  # noqa: E402  (the status page reads the same table of contents)

CHAPTER_BUDGET_S, BOOK_BUDGET_S, MEMORY_BUDGET_MB = 60, 240, 2048
IGNORE_TAGS = {"nbval-ignore-output", "nbval-skip"}
IGNORE_MARKERS = ("# NBVAL_IGNORE_OUTPUT", "# NBVAL_SKIP")
RECORDS: dict[str, list[dict]] = {}

pytestmark = pytest.mark.skipif(
    os.environ.get("BNBOOK_DETERMINISM") != "1",
    reason="slow (every chapter twice): run with `make determinism` (BNBOOK_DETERMINISM=1)",
)


def chapters() -> list[str]:
    """The notebooks listed in ``_toc.yml``, in reading order."""
    return [f + ".ipynb" for f in toc_files(ROOT) if (ROOT / (f + ".ipynb")).exists()]


def _sanitizers() -> list[tuple[re.Pattern, str]]:
    lines = [ln.strip() for ln in (ROOT / "tests" / "nbval_sanitize.cfg").read_text().splitlines()]
    pairs, regex = [], None
    for line in lines:
        if line.startswith("regex:"):
            regex = re.compile(line.split(":", 1)[1].strip())
        elif line.startswith("replace:") and regex is not None:
            pairs.append((regex, line.split(":", 1)[1].strip()))
            regex = None
    # widget views name a model by a random id
    pairs.append((re.compile(r'"model_id":\s*"[0-9a-f]+"'), '"model_id": "MODEL"'))
    return pairs


SANITIZE = _sanitizers()


def _clean(text: str) -> str:
    for regex, replacement in SANITIZE:
        text = regex.sub(replacement, text)
    return text


def comparable_outputs(nb) -> dict[int, str]:
    """Per code cell (by position), its outputs as sanitized JSON; volatile cells left out."""
    result = {}
    for index, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        tags = set(cell.metadata.get("tags", []))
        if tags & IGNORE_TAGS or any(marker in cell.source for marker in IGNORE_MARKERS):
            continue
        outputs = []
        for out in cell.get("outputs", []):
            out = dict(out)
            out.pop("execution_count", None)
            if "metadata" in out:
                out["metadata"] = {}
            outputs.append(out)
        result[index] = _clean(json.dumps(outputs, sort_keys=True))
    return result


def _peak_rss_mb(pid: int | None) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError, TypeError):
        pass
    return None


def execute(path: Path, source: str) -> tuple[nbformat.NotebookNode, float, float | None]:
    """Execute the notebook ``source`` (read from ``path``) in a fresh kernel, in the notebook's folder;
    no file is written."""
    nb = nbformat.reads(source, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    peak: list[float] = []

    def on_cell_executed(cell, cell_index, execute_reply):
        rss = _peak_rss_mb(getattr(getattr(getattr(client.km, "provisioner", None), "process", None), "pid", None))
        if rss is not None:
            peak.append(rss)

    client = NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
        store_widget_state=True,
        on_cell_executed=on_cell_executed,
    )
    start = time.perf_counter()
    client.execute()
    return nb, time.perf_counter() - start, (max(peak) if peak else None)


@pytest.mark.parametrize("chapter", chapters())
def test_two_runs_give_the_same_outputs(chapter):
    path = ROOT / chapter
    source = path.read_text(encoding="utf-8")  # read once: both runs execute the same cells
    runs = [execute(path, source) for _ in range(2)]
    RECORDS[chapter] = [{"seconds": round(s, 1), "peak_memory_mb": m and round(m)} for _, s, m in runs]
    first, second = (comparable_outputs(nb) for nb, _, _ in runs)
    differing = [i for i in first if first[i] != second.get(i)]
    detail = ""
    if differing:
        a, b = first[differing[0]], second.get(differing[0], "")
        at = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
        window = slice(max(at - 60, 0), at + 60)
        detail = f"; first difference in cell {differing[0]}: {a[window]!r} vs {b[window]!r}"
    assert not differing, f"{chapter}: code cells {differing} (0-based) differ between two runs{detail}"


@pytest.fixture(scope="module", autouse=True)
def budget_report():
    """After the chapters ran, print (and save) each one's execution time and peak memory against the budget.

    A report, not a test: timings depend on the machine and its load."""
    yield
    if not RECORDS:
        return
    lines = [
        "",
        "chapter                          run 1 s  run 2 s  peak MB  budget",
        "-------------------------------  -------  -------  -------  ------",
    ]
    total = 0.0
    for chapter, (r1, r2) in RECORDS.items():
        over = []
        if max(r1["seconds"], r2["seconds"]) > CHAPTER_BUDGET_S:
            over.append(f"> {CHAPTER_BUDGET_S} s")
        peak = max(r1["peak_memory_mb"] or 0, r2["peak_memory_mb"] or 0)
        if peak > MEMORY_BUDGET_MB:
            over.append(f"> {MEMORY_BUDGET_MB} MB")
        total += r1["seconds"]
        name = Path(chapter).name
        lines.append(f"{name:31s}  {r1['seconds']:7.1f}  {r2['seconds']:7.1f}  {peak:7.0f}  {', '.join(over) or 'ok'}")
    verdict = "ok" if total <= BOOK_BUDGET_S else f"over the {BOOK_BUDGET_S} s budget"
    lines.append(f"whole book (run 1): {total:.1f} s ({verdict}); machine load affects every timing")
    print("\n".join(lines))
    out = ROOT / "_build" / "determinism.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"chapters": RECORDS, "book_seconds": round(total, 1)}, indent=1) + "\n")
