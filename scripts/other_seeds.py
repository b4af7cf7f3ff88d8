"""Run chapters on other seeds and list every check that fails there.

Usage: python scripts/other_seeds.py [--first-seed N ...] [--keep DIR] [NOTEBOOK ...]
       (default: first seeds 3 and 6, every chapter in book/ that trains)

A claim about training is a claim about batch normalization, not about seeds 0-2. This executes
each notebook in a fresh kernel with ``BNBOOK_FIRST_SEED=N`` (so every experiment runs on seeds
N, N+1, N+2), keeps going past errors, and prints each cell that raised: its index and the last
line of the error, usually the message of the failed ``assert``. Nothing is written back; the
stored outputs stay those of seeds 0-2 (``--keep DIR`` saves each executed notebook in DIR, as
``chapter.seedN.ipynb``, to read its tables). Exit status 1 when any check failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

BOOK = Path(__file__).resolve().parent.parent / "book"


def trains(path: Path) -> bool:
    """Whether a notebook runs experiments over seeds (it calls ``over_seeds``)."""
    return "over_seeds(" in path.read_text(encoding="utf-8")


def failing_cells(
    path: Path, first_seed: int, keep: Path | None = None
) -> tuple[list[tuple[int, str]], float]:
    """Execute ``path`` with the seeds moved; the (cell index, last error line) of each failure."""
    notebook = nbformat.read(path, as_version=4)
    os.environ["BNBOOK_FIRST_SEED"] = str(first_seed)
    started = time.perf_counter()
    client = NotebookClient(
        notebook, timeout=1800, kernel_name="python3", allow_errors=True, resources={"metadata": {"path": str(BOOK)}}
    )
    client.execute()
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook, keep / f"{path.stem}.seed{first_seed}.ipynb")
    failures = []
    for index, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                failures.append((index, f"{output['ename']}: {output['evalue']}".strip()))
    return failures, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first-seed", type=int, action="append", help="first seed of a run (repeatable)")
    parser.add_argument("--keep", type=Path, help="save the executed notebooks in this folder")
    parser.add_argument("notebooks", nargs="*", type=Path)
    args = parser.parse_args()
    firsts = args.first_seed or [3, 6]
    if any(first < 0 for first in firsts):
        parser.error("a first seed must be a non-negative integer")
    notebooks = args.notebooks or [p for p in sorted(BOOK.glob("*.ipynb")) if trains(p)]
    failed = False
    for path in notebooks:
        for first in firsts:
            failures, seconds = failing_cells(path, first, args.keep)
            print(f"{path.name}, from seed {first}: {len(failures)} failing cell(s), {seconds:.0f} s", flush=True)
            for index, message in failures:
                print(f"    cell {index}: {message}", flush=True)
            failed = failed or bool(failures)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
