"""Execute notebooks in place, top to bottom in a fresh kernel, so their stored outputs are current.

Usage: python scripts/execute_notebooks.py [--json FILE] [NOTEBOOK ...]   (default: every notebook in book/)

Prints each notebook's execution time. Each notebook also records how its outputs were made in its own
metadata (``metadata.bnbook.execution``: seconds, slowest cell, peak memory of the kernel, device,
library versions, date, scale); the book's status page (book/status.md) renders it. With ``--json``
the same records are also written to FILE.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import nbformat
from nbclient import NotebookClient

BOOK = Path(__file__).resolve().parent.parent / "book"
METADATA_KEY = "bnbook"
LIBRARIES = ("bnlib", "torch", "numpy", "scikit-learn", "matplotlib", "ipywidgets")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """The device the kernel computes on (as ``bnlib.setup`` picks it) and the library versions."""
    import torch  # only needed here: keeps --help fast

    if torch.cuda.is_available():
        device, name = "cuda", torch.cuda.get_device_name(0)
    else:
        device, name = "cpu", f"{_cpu_name()} ({os.cpu_count()} cores)"
    return {
        "device": device,
        "device_name": name,
        "python": platform.python_version(),
        "versions": {lib: _version(lib) for lib in LIBRARIES},
        "scale": os.environ.get("BNBOOK_SCALE", "quick"),
    }


def _peak_rss_mb(pid: int | None) -> float | None:
    """High-water mark of a process's resident memory (Linux: VmHWM), in MB; None where unknown."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


SEEDS_PROBE = """import json, sys
_seeds = sys.modules.get("bnlib.lab.seeds")
print(json.dumps(_seeds.seeds_used() if _seeds else {"experiments": 0, "seeds": [], "fewest_seeds": 0}))"""


def _probe_result(cell) -> dict | None:
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream" and output.get("name") == "stdout":
            return json.loads(output["text"].strip().splitlines()[-1])
    return None


def execute(path: Path, timeout: int = 600, env: dict | None = None) -> float:
    """Execute ``path`` in place; return the seconds it took and record them in its metadata."""
    nb = nbformat.read(path, as_version=4)
    cells: dict[int, float] = {}
    started: dict[int, float] = {}
    peak: list[float] = []

    def on_cell_execute(cell, cell_index):
        started[cell_index] = time.perf_counter()

    def on_cell_executed(cell, cell_index, execute_reply):
        cells[cell_index] = time.perf_counter() - started.pop(cell_index, time.perf_counter())
        provisioner = getattr(client.km, "provisioner", None)
        rss = _peak_rss_mb(getattr(getattr(provisioner, "process", None), "pid", None))
        if rss is not None:
            peak.append(rss)

    # One extra cell, removed again before saving: what bnlib.lab.seeds.over_seeds ran in this kernel.
    probe = nbformat.v4.new_code_cell(SEEDS_PROBE)
    nb.cells.append(probe)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
        record_timing=False,
        store_widget_state=True,
        on_cell_execute=on_cell_execute,
        on_cell_executed=on_cell_executed,
    )
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    nb.cells.pop()
    cells.pop(len(nb.cells), None)
    slowest = max(cells, key=cells.get) if cells else None
    record = {
        "seconds": round(elapsed, 2),
        "slowest_cell": None if slowest is None else {"index": slowest, "seconds": round(cells[slowest], 2)},
        "peak_memory_mb": round(max(peak), 1) if peak else None,
        "seeds": _probe_result(probe),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        **(env if env is not None else environment()),
    }
    nb.metadata.setdefault(METADATA_KEY, {})["execution"] = record
    nbformat.write(nb, path)
    return elapsed


#: pages that read the verdicts stored in the other chapters (bnlib.present.claims): executed last
READS_OTHER_CHAPTERS = ("claims.ipynb",)


def execution_order(paths: list[Path]) -> list[Path]:
    """The notebooks in the given order, except that pages reading other chapters come last."""
    return sorted(paths, key=lambda p: p.name in READS_OTHER_CHAPTERS)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebook in book/")
    parser.add_argument("--json", type=Path, help="also write the execution records to this file")
    args = parser.parse_args(argv)
    paths = execution_order(args.notebooks or sorted(BOOK.glob("*.ipynb")))
    env = environment()
    records = {}
    for path in paths:
        elapsed = execute(path, env=env)
        records[path.name] = nbformat.read(path, as_version=4).metadata[METADATA_KEY]["execution"]
        print(f"{path.name}: {elapsed:.1f} s", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
