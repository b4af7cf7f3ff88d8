"""Sphinx extension behind the book's status page (book/status.md): the ``{book-status}`` directive.

It renders, at build time, what this build of the book was made from:

- the date of the build and the versions of the build tools;
- for every chapter notebook in ``_toc.yml``, the record that ``scripts/execute_notebooks.py`` (``make
  refresh``) stored in the notebook's metadata when it last executed it: execution time, slowest cell,
  peak memory of the kernel, device, date, scale;
- the library versions the stored outputs were computed with.

Loaded through ``sphinx.local_extensions`` in ``_config.yml``. The page is re-read on every build
(its content changes with the clock and with every notebook).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from importlib import metadata
from pathlib import Path

import yaml
from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective

METADATA_KEY = "bnbook"
CHAPTER_BUDGET_S = 60  # each chapter at its default scale, on two CPU cores
BOOK_BUDGET_S = 240  # the whole book
BUILD_TOOLS = ("jupyter-book", "sphinx", "myst-nb", "sphinx-book-theme")
STATUS_DOCNAMES: set[str] = set()


def toc_files(root: Path) -> list[str]:
    """The ``file:`` entries of ``_toc.yml`` (and its root), in reading order."""
    toc = yaml.safe_load((root / "_toc.yml").read_text(encoding="utf-8"))
    found: list[str] = [toc["root"]] if "root" in toc else []

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                found.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk({k: v for k, v in toc.items() if k != "root"})
    return found


def notebook_title(nb: dict, fallback: str) -> str:
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "markdown":
            for line in "".join(cell.get("source", "")).splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return fallback


def execution_records(root: Path) -> list[tuple[str, str, dict | None]]:
    """(docname, title, record or None) for every chapter notebook in the table of contents."""
    rows = []
    for name in toc_files(root):
        path = root / f"{name}.ipynb"
        if path.exists():
            nb = json.loads(path.read_text(encoding="utf-8"))
            record = nb.get("metadata", {}).get(METADATA_KEY, {}).get("execution")
            rows.append((name, notebook_title(nb, Path(name).name), record))
    return rows


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def build_date() -> str:
    """The build's date (UTC), or ``SOURCE_DATE_EPOCH``'s for reproducible builds."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = dt.datetime.fromtimestamp(int(epoch), dt.timezone.utc) if epoch else dt.datetime.now(dt.timezone.utc)
    return when.strftime("%Y-%m-%d %H:%M UTC")


def _cell(value) -> str:
    return "–" if value is None else str(value).replace("|", "\\|")


def build_markdown(root: Path) -> list[str]:
    tools = ", ".join(f"{tool} {_version(tool)}" for tool in BUILD_TOOLS)
    return [f"This build was made on **{build_date()}** with Python {platform.python_version()}, {tools}."]


def seeds_text(seeds: dict | None) -> str | None:
    """"3 experiments on seeds 0, 1, 2 (at least 3 each)", or "no training experiments"."""
    if seeds is None:
        return None
    if not seeds.get("experiments"):
        return "no training experiments"
    listed = ", ".join(str(s) for s in seeds["seeds"])
    return f"{seeds['experiments']} experiments on seeds {listed} (at least {seeds['fewest_seeds']} each)"


def chapters_markdown(root: Path) -> list[str]:
    rows = execution_records(root)
    lines = [
        "Every chapter is stored with the outputs of a clean top-to-bottom run in a fresh kernel "
        "(`make refresh`), and the site shows those outputs. The table gives what that run measured: "
        "wall-clock time, the slowest cell (numbered from 0, markdown cells included), the kernel's peak "
        "resident memory, the device it computed on, and the seeds its training experiments ran on "
        "(`bnlib.lab.seeds.over_seeds`: how many experiments, which seeds, the fewest seeds behind one "
        "experiment).",
        "",
        "| chapter | execution time (s) | slowest cell (s) | peak memory (MB) | device | scale | seeds | executed |",
        "|---|---:|---:|---:|---|---|---|---|",
    ]
    total, missing = 0.0, []
    for docname, title, record in rows:
        link = f"{{doc}}`{title} </{docname}>`"
        if record is None:
            missing.append(title)
            lines.append(f"| {link} | not recorded | | | | | | |")
            continue
        total += record.get("seconds", 0.0)
        slow = record.get("slowest_cell") or {}
        slow_text = f"{slow['seconds']:.1f} (cell {slow['index']})" if slow else None
        device = record.get("device")
        if record.get("device_name"):
            device = f"{device}: {record['device_name']}"
        lines.append(
            f"| {link} | {record.get('seconds', 0.0):.1f} | {_cell(slow_text)} "
            f"| {_cell(record.get('peak_memory_mb'))} | {_cell(device)} | {_cell(record.get('scale'))} "
            f"| {_cell(seeds_text(record.get('seeds')))} | {_cell(record.get('date'))} |"
        )
    lines.append(f"| **all chapters** | **{total:.1f}** | | | | | | |")
    lines.append("")
    recorded = [(title, record) for _, title, record in rows if record is not None]
    if recorded:
        over = [
            f"{title} ({record['seconds']:.0f} s)"
            for title, record in recorded
            if record.get("seconds", 0) > CHAPTER_BUDGET_S
        ]
        lines += [
            f"The budget is {CHAPTER_BUDGET_S} s per chapter at the default scale and {BOOK_BUDGET_S} s for "
            "the whole book, on two CPU cores. "
            + (f"Over the chapter budget: {', '.join(over)}. " if over else "Every recorded chapter is within it. ")
            + f"All recorded chapters together: {total:.0f} s"
            + (", over the book's budget." if total > BOOK_BUDGET_S else ", within the book's budget."),
            "",
        ]
    if missing:
        lines += [
            "Not recorded: " + ", ".join(missing) + " (stored before execution records were kept; "
            "`make refresh NB=book/<chapter>.ipynb` records it).",
            "",
        ]
    return lines


def versions_markdown(root: Path) -> list[str]:
    rows = execution_records(root)
    lines = [
        "The versions the stored outputs were computed with (from the execution records); the tests "
        "re-execute every chapter with the pinned versions in `requirements-lock.txt`.",
        "",
        "| library | version |",
        "|---|---|",
    ]
    versions: dict[str, set[str]] = {}
    pythons: set[str] = set()
    for _, _, record in rows:
        if record:
            pythons.add(record.get("python") or "–")
            for lib, version in (record.get("versions") or {}).items():
                versions.setdefault(lib, set()).add(version or "not installed")
    if pythons:
        lines.append(f"| Python | {', '.join(sorted(pythons))} |")
    for lib in sorted(versions):
        lines.append(f"| {lib} | {', '.join(sorted(versions[lib]))} |")
    if not pythons:
        lines.append("| (no chapter has an execution record yet) | |")
    return lines


SECTIONS = {"build": build_markdown, "chapters": chapters_markdown, "versions": versions_markdown}


class BookStatus(SphinxDirective):
    """``{book-status} build|chapters|versions``: the build date and tools, the chapters' execution
    records, or the library versions the outputs were computed with."""

    has_content = False
    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        root = Path(self.env.srcdir)
        STATUS_DOCNAMES.add(self.env.docname)
        for name in toc_files(root):
            path = root / f"{name}.ipynb"
            if path.exists():
                self.env.note_dependency(str(path))
        container = nodes.container(classes=["book-status"])
        section = self.arguments[0].strip()
        if section not in SECTIONS:
            raise self.error(f"book-status: unknown section {section!r}; one of {', '.join(SECTIONS)}")
        self.state.nested_parse(StringList(SECTIONS[section](root)), self.content_offset, container)
        return [container]


def _always_reread(app, env, added, changed, removed):
    return sorted(STATUS_DOCNAMES & set(env.found_docs))


def setup(app):
    app.add_directive("book-status", BookStatus)
    app.connect("env-get-outdated", _always_reread)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
