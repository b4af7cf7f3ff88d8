"""The built site (``make book`` builds it into _build/html before ``make test`` runs this)."""

import base64
import datetime as dt
import io
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "_build" / "html"


class _Resources(HTMLParser):
    """Collects the URLs a page loads by itself: scripts, stylesheets, images, frames, fonts."""

    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("script", "img", "iframe", "audio", "video", "source") and a.get("src"):
            self.urls.append(a["src"])
        if (
            tag == "link"
            and a.get("href")
            and (a.get("rel") or "") in ("stylesheet", "preload", "icon", "modulepreload")
        ):
            self.urls.append(a["href"])


def _pages():
    if not (SITE / "index.html").exists():
        pytest.fail("no built site in _build/html: run `make book` first (`make test` does)")
    return sorted(p for p in SITE.rglob("*.html") if "_static" not in p.parts)


def test_every_chapter_in_the_toc_is_built():
    toc = (ROOT / "_toc.yml").read_text()
    built = {p.relative_to(SITE).with_suffix("").as_posix() for p in _pages()}
    for line in toc.splitlines():
        line = line.strip()
        if line.startswith(("- file:", "root:")):
            page = line.split(":", 1)[1].strip()
            assert page in built, f"{page} is in _toc.yml but was not built"


def test_no_page_loads_anything_from_another_host():
    offenders = []
    for page in _pages():
        parser = _Resources()
        parser.feed(page.read_text(encoding="utf-8"))
        for url in parser.urls:
            if url.startswith(("http:", "https:", "//")):
                offenders.append(f"{page.relative_to(SITE)}: {url}")
    assert not offenders, "pages load third-party resources:\n" + "\n".join(offenders)


def test_mathjax_is_served_from_the_site():
    page = (SITE / "book" / "formulas.html").read_text(encoding="utf-8")
    assert "_static/vendor/mathjax/tex-chtml.js" in page
    assert (SITE / "_static" / "vendor" / "mathjax" / "tex-chtml.js").exists()
    assert (SITE / "_static" / "vendor" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").is_dir()


# --------------------------------------------------------------------------------------------------
# offline assets


def test_widget_manager_pulls_no_fonts_from_another_host():
    """embed-amd.js bundles CSS that imports a Google Fonts stylesheet; scripts/vendor_assets.sh strips it."""
    for path in (
        ROOT / "book" / "_assets" / "vendor" / "widgets" / "embed-amd.js",
        SITE / "_static" / "vendor" / "widgets" / "embed-amd.js",
    ):
        text = path.read_text(encoding="utf-8")
        assert "fonts.googleapis.com" not in text, f"{path.relative_to(ROOT)} still names Google Fonts"
        assert not re.search(r"@import\s+url\(\s*['\"]?(https?:)?//", text), f"{path.relative_to(ROOT)}: remote @import"


# --------------------------------------------------------------------------------------------------
# launch buttons


def _config():
    return yaml.safe_load((ROOT / "_config.yml").read_text())


def _chapter_notebooks():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = re.findall(r"file: (\S+)", yaml.safe_dump(toc))
    return [f for f in files if (ROOT / f"{f}.ipynb").exists()]


def test_every_chapter_has_binder_colab_and_live_code():
    config = _config()
    repo = config["repository"]["url"].rstrip("/").removeprefix("https://github.com/")
    branch = config["repository"]["branch"]
    launch = config["launch_buttons"]
    assert launch.get("thebe") is True
    chapters = _chapter_notebooks()
    assert chapters, "no chapter notebook in _toc.yml"
    for chapter in chapters:
        html = (SITE / f"{chapter}.html").read_text(encoding="utf-8")
        binder = f"{launch['binderhub_url']}/v2/gh/{repo}/{branch}?urlpath=lab/tree/{chapter}.ipynb"
        colab = f"{launch['colab_url']}/github/{repo}/blob/{branch}/{chapter}.ipynb"
        assert f'href="{binder}"' in html, f"{chapter}: no Binder button for {binder}"
        assert f'href="{colab}"' in html, f"{chapter}: no Colab button for {colab}"
        assert "initThebeSBT()" in html, f"{chapter}: no Live Code (Thebe) button"
        assert f'repo: "{repo}"' in html and f'ref: "{branch}"' in html, f"{chapter}: Thebe not pointed at {repo}"
        assert html.count("const THEBE_JS_URL") == 1, f"{chapter}: Thebe's inline configuration is duplicated"


# --------------------------------------------------------------------------------------------------
# the glossary

HANGUL = re.compile(r"[\uac00-\ud7a3]")
GLOSSARY = ROOT / "book" / "glossary.md"


def _glossary_entries() -> list[list[str]]:
    """The terms of each entry of the {glossary} block (term lines are the unindented ones)."""
    text = GLOSSARY.read_text(encoding="utf-8")
    block = text.split("```{glossary}", 1)[1].split("\n```", 1)[0]
    entries, current = [], []
    for line in block.splitlines():
        if not line.strip() or line.startswith(":"):
            continue
        if line[0].isspace():
            if current:
                entries.append(current)
                current = []
        else:
            current.append(line.strip())
    return entries


def _korean_table() -> list[tuple[str, bool, str]]:
    """(Korean term, marked † as the usual term rather than the sources', the {term} target) per row."""
    text = GLOSSARY.read_text(encoding="utf-8").split("## 한국어 → English", 1)[1]
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and HANGUL.search(cells[0]) and cells[0] != "한국어":
            target = re.search(r"\{term\}`[^`<]*<([^>]+)>`", cells[1])
            rows.append((cells[0].removesuffix("†").strip(), cells[0].endswith("†"), target and target.group(1)))
    return rows


def test_glossary_pairs_every_english_term_with_korean():
    entries = _glossary_entries()
    assert len(entries) >= 40
    for terms in entries:
        assert any(HANGUL.search(t) for t in terms), f"glossary entry {terms[0]!r} has no Korean term"
        assert any(not HANGUL.search(t) for t in terms), f"glossary entry {terms[0]!r} has no English term"


def test_korean_index_lists_every_korean_term_once_in_order():
    korean_terms = {t for terms in _glossary_entries() for t in terms if HANGUL.search(t)}
    rows = _korean_table()
    listed = [k for k, _, _ in rows]
    assert listed == sorted(listed), "the 한국어 → English table is not in Korean alphabetical order"
    assert len(listed) == len(set(listed)), "a Korean term is listed twice"
    assert set(listed) == korean_terms, (
        f"missing from the table: {sorted(korean_terms - set(listed))}; "
        f"not a glossary term: {sorted(set(listed) - korean_terms)}"
    )
    for korean, _, target in rows:
        assert target == korean, f"row {korean!r} links to {target!r}"


def _source_texts() -> str | None:
    candidates = [os.environ.get("BNBOOK_SOURCES"), ROOT.parent / "shared" / "seeds", ROOT / "shared" / "seeds"]
    for folder in candidates:
        if folder and Path(folder).is_dir() and list(Path(folder).glob("*.txt")):
            return "\n".join(p.read_text(encoding="utf-8") for p in sorted(Path(folder).glob("*.txt")))
    return None


def _squeeze(text: str) -> str:
    """Drop spaces and parenthesized Latin glosses: '립시츠(Lipschitz) 상수' -> '립시츠상수'."""
    return re.sub(r"\s+", "", re.sub(r"\([A-Za-z .,/&-]+\)", "", text))


def test_korean_terms_are_the_sources_own():
    """Every Korean term not marked † occurs in the Korean source texts the book started from."""
    sources = _source_texts()
    if sources is None:
        pytest.skip("the Korean source texts are not beside this checkout (set BNBOOK_SOURCES to their folder)")
    # "기울기 소실/폭주" (vanishing/exploding gradient) also spells out "기울기 폭주"
    expanded = sources + "\n" + "\n".join(f"{a} {c}" for a, _, c in re.findall(r"(\S+) (\S+)/(\S+)", sources))
    squeezed = _squeeze(expanded)
    missing = [k for k, usual, _ in _korean_table() if not usual and _squeeze(k) not in squeezed]
    assert not missing, f"not found in the sources (mark them † if they are the usual term instead): {missing}"


def test_glossary_is_built_with_an_anchor_per_term():
    html = (SITE / "book" / "glossary.html").read_text(encoding="utf-8")
    for terms in _glossary_entries():
        for term in terms:
            assert f">{term}<" in html, f"glossary term {term!r} is not on the built page"


# --------------------------------------------------------------------------------------------------
# the status page


def test_status_page_lists_every_chapter_with_its_execution_record():
    html = (SITE / "book" / "status.html").read_text(encoding="utf-8")
    assert "This build was made on" in html
    today = dt.datetime.now(dt.timezone.utc)
    days = {(today - dt.timedelta(days=d)).strftime("%Y-%m-%d") for d in (0, 1)}
    assert any(f"<strong>{d}" in html for d in days) or os.environ.get("SOURCE_DATE_EPOCH"), "build date missing"
    for chapter in _chapter_notebooks():
        nb = json.loads((ROOT / f"{chapter}.ipynb").read_text(encoding="utf-8"))
        assert f'href="{Path(chapter).name}.html"' in html, f"{chapter} is not on the status page"
        record = nb.get("metadata", {}).get("bnbook", {}).get("execution")
        if record:
            assert f"{record['seconds']:.1f}" in html, f"{chapter}: execution time not shown"
    assert "Library versions" in html


# --------------------------------------------------------------------------------------------------
# figures: one style, light PNGs, alt text

MATPLOTLIB_DEFAULT_COLOURS = {  # tab10 without its grey: figures made without the book style
    (0x1F, 0x77, 0xB4),
    (0xFF, 0x7F, 0x0E),
    (0x2C, 0xA0, 0x2C),
    (0xD6, 0x27, 0x28),
    (0x94, 0x67, 0xBD),
    (0x8C, 0x56, 0x4B),
    (0xE3, 0x77, 0xC2),
    (0xBC, 0xBD, 0x22),
    (0x17, 0xBE, 0xCF),
}
MAX_PNG_BYTES = 200_000
BOOK_DPI = 80


def _notebook_pngs(path: Path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    for index, cell in enumerate(nb["cells"]):
        for output in cell.get("outputs", []) if cell["cell_type"] == "code" else []:
            data = output.get("data", {})
            for mime in ("image/png", "application/papermill.record/image/png"):  # shown or glued
                if mime in data:
                    yield index, base64.b64decode(data[mime])


#: widest figure, in inches: the text column's 6.5 in plus what a tight bounding box adds
MAX_FIGURE_INCHES = 7.0


@pytest.mark.parametrize("notebook", sorted(p.name for p in (ROOT / "book").glob("*.ipynb")))
def test_figures_follow_the_book_style(notebook):
    from PIL import Image

    problems = []
    for index, png in _notebook_pngs(ROOT / "book" / notebook):
        where = f"{notebook} cell {index}"
        image = Image.open(io.BytesIO(png))
        if len(png) > MAX_PNG_BYTES:
            problems.append(f"{where}: {len(png) // 1000} kB PNG (light PNGs: at most {MAX_PNG_BYTES // 1000} kB)")
        dpi = image.info.get("dpi", (0, 0))[0]
        if round(dpi) != BOOK_DPI:
            problems.append(f"{where}: {dpi:.0f} dpi, not the book's {BOOK_DPI} (bnlib.present.plots.use_book_style())")
        elif image.width / dpi > MAX_FIGURE_INCHES:  # drawn wider than the column, its labels shrink on the page
            problems.append(f"{where}: {image.width / dpi:.1f} in wide (the column takes 6.5 in)")
        rgba = image.convert("RGBA")
        w, h = rgba.size
        corners = [rgba.getpixel(p) for p in ((0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1))]
        if not all(a < 16 or min(r, g, b) >= 235 for r, g, b, a in corners):
            problems.append(f"{where}: not on a light background (corners {corners})")
        counts = {colour: n for n, colour in rgba.convert("RGB").getcolors(maxcolors=1 << 24)}
        defaults = {f"#{r:02X}{g:02X}{b:02X}": counts.get((r, g, b), 0) for r, g, b in MATPLOTLIB_DEFAULT_COLOURS}
        defaults = {c: n for c, n in defaults.items() if n >= 100}
        if defaults:
            problems.append(f"{where}: matplotlib's default colours {defaults} (use bnlib.present.plots.PLAIN / BN)")
    assert not problems, "\n".join(problems)


def test_every_figure_on_the_site_has_alt_text():
    """An image from a code cell gets its file path as alt text unless the cell says otherwise."""
    missing = []
    for page in _pages():
        parser = _Images()
        parser.feed(page.read_text(encoding="utf-8"))
        for src, alt in parser.images:
            if "_images/" in src and (not alt or alt == src or alt.endswith((".png", ".jpg", ".svg"))):
                missing.append(f"{page.relative_to(SITE)}: {src}")
    assert not missing, (
        "figures without alt text (give the code cell the metadata "
        '{"mystnb": {"image": {"alt": "..."}}}, or glue the figure and use {glue:figure} with :alt:):\n'
        + "\n".join(missing)
    )


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            a = dict(attrs)
            self.images.append((a.get("src") or "", (a.get("alt") or "").strip()))


def _srgb_to_linear(c: float) -> float:
    return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4


def _linear_to_lab(rgb) -> tuple[float, float, float]:
    r, g, b = rgb
    x = (0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047
    y = 0.2126 * r + 0.7152 * g + 0.0722 * b
    z = (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883

    def f(t):
        return t ** (1 / 3) if t > 0.008856 else 7.787 * t + 16 / 116

    return 116 * f(y) - 16, 500 * (f(x) - f(y)), 200 * (f(y) - f(z))


# Machado, Oliveira & Fernandes (2009), severity 1.0, on linear RGB.
COLOUR_BLINDNESS = {
    "protanopia": ((0.152286, 1.052583, -0.204868), (0.114503, 0.786281, 0.099216), (-0.003882, -0.048116, 1.051998)),
    "deuteranopia": ((0.367322, 0.860646, -0.227968), (0.280085, 0.672501, 0.047413), (-0.011820, 0.042940, 0.968881)),
    "tritanopia": ((1.255528, -0.076749, -0.178779), (-0.078411, 0.930809, 0.147602), (0.004733, 0.691367, 0.303900)),
}


def _seen_as(hex_colour: str, kind: str | None):
    rgb = [_srgb_to_linear(int(hex_colour[i : i + 2], 16) / 255) for i in (1, 3, 5)]
    if kind is not None:
        rgb = [min(max(sum(m * c for m, c in zip(row, rgb)), 0.0), 1.0) for row in COLOUR_BLINDNESS[kind]]
    return _linear_to_lab(rgb)


@pytest.mark.parametrize("kind", [None, *COLOUR_BLINDNESS])
def test_with_and_without_bn_colours_stay_apart_for_colour_blind_readers(kind):
    from bnlib.present import plots

    a, b = _seen_as(plots.PLAIN, kind), _seen_as(plots.BN, kind)
    delta_e = sum((p - q) ** 2 for p, q in zip(a, b)) ** 0.5
    assert delta_e > 20, f"PLAIN and BN are {delta_e:.1f} apart (CIELAB) for {kind or 'normal vision'}"


def test_execution_records_feed_the_status_page(tmp_path):
    """scripts/execute_notebooks.py stores what the status page (scripts/book_status.py) renders."""
    import importlib.util

    import nbformat

    def load(name):
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    execute_notebooks, book_status = load("execute_notebooks"), load("book_status")
    (tmp_path / "book").mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# A chapter"),
        nbformat.v4.new_code_cell("x = sum(range(10))\nx"),
        nbformat.v4.new_code_cell(
            "from bnlib.lab.seeds import over_seeds\nruns = over_seeds(lambda s: s)\n"
            "_ = over_seeds(lambda s: s, [4, 5])"
        ),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "book" / "chapter.ipynb")
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: book/intro\nchapters:\n  - file: book/chapter\n")

    seconds = execute_notebooks.execute(tmp_path / "book" / "chapter.ipynb")
    record = json.loads((tmp_path / "book" / "chapter.ipynb").read_text())["metadata"]["bnbook"]["execution"]
    assert record["seconds"] == pytest.approx(seconds, abs=0.01)
    assert record["device"] in ("cpu", "cuda") and record["versions"]["torch"] and record["date"]
    assert record["slowest_cell"]["index"] in (1, 2)
    assert record["seeds"] == {"experiments": 2, "seeds": [0, 1, 2, 4, 5], "fewest_seeds": 2}
    stored = json.loads((tmp_path / "book" / "chapter.ipynb").read_text())
    assert len(stored["cells"]) == 3, "the seeds probe is not stored in the notebook"
    assert [(name, title) for name, title, _ in book_status.execution_records(tmp_path)] == [
        ("book/chapter", "A chapter")
    ]
    table = "\n".join(book_status.chapters_markdown(tmp_path))
    assert f"| {{doc}}`A chapter </book/chapter>` | {record['seconds']:.1f} |" in table
    assert "Every recorded chapter is within it." in table
    assert "| 2 experiments on seeds 0, 1, 2, 4, 5 (at least 2 each) |" in table


# --------------------------------------------------------------------------------------------------
# exercises


#: pages listed among the chapters that are not chapters themselves
NOT_CHAPTERS = {"book/claims"}


def _chapters_outside_the_appendices():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    found = []
    for part in toc.get("parts", []):
        if part.get("caption") != "Appendices":
            found += [c["file"] for c in part.get("chapters", []) if (ROOT / f"{c['file']}.ipynb").exists()]
    return [f for f in found if f not in NOT_CHAPTERS]


def test_every_chapter_ends_with_exercises_and_folded_solutions():
    chapters = _chapters_outside_the_appendices()
    assert chapters
    for chapter in chapters:
        nb = json.loads((ROOT / f"{chapter}.ipynb").read_text(encoding="utf-8"))
        text = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
        labels = re.findall(r"```\{exercise\}[^\n]*\n(?::[^\n]*\n)*?:label: *(\S+)", text)
        assert labels, f"{chapter}: no exercise with a :label:"
        for label in labels:
            solution = re.search(r"```\{solution\} *" + re.escape(label) + r"\n((?::[^\n]*\n)*)", text)
            assert solution, f"{chapter}: exercise {label} has no solution"
            assert ":class: dropdown" in solution.group(1), f"{chapter}: the solution of {label} is not folded"


def test_chapters_are_stored_with_a_clean_top_to_bottom_run():
    """nbval compares only cells with a stored execution count, and the site shows what is stored."""
    import json

    problems = []
    for nb_path in sorted((ROOT / "book").glob("*.ipynb")):
        cells = json.loads(nb_path.read_text(encoding="utf-8"))["cells"]
        counts = [c.get("execution_count") for c in cells if c["cell_type"] == "code"]
        if counts != list(range(1, len(counts) + 1)):
            problems.append(f"{nb_path.name}: execution counts {counts[:6]}... are not 1..n (run `make refresh`)")
        errors = [o.get("ename") for c in cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
        if errors:
            problems.append(f"{nb_path.name}: stored error outputs {errors}")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------------------------------
# the API appendix (book/api.md): autodoc of every public name, from docstrings in napoleon's Google style

LAYERS = ["norm", "lab", "present", "bench"]


def _modules(layer: str) -> list:
    """bnlib.<layer> and every module below it."""
    import importlib
    import pkgutil

    package = importlib.import_module(f"bnlib.{layer}")
    found = [package]
    for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
        found.append(importlib.import_module(info.name))
    return found


def _all_bnlib_modules() -> list:
    return [m for layer in LAYERS for m in _modules(layer)]


@pytest.mark.parametrize("layer", LAYERS)
def test_api_appendix_documents_every_public_name(layer):
    """Every name in a module's __all__ has an entry on the page: under that module, or, for a name
    the module re-exports, under the module that defines it."""
    html = (SITE / "book" / "api.html").read_text(encoding="utf-8")
    ids = set(re.findall(r'id="(bnlib\.[^"]+)"', html))
    everywhere = _all_bnlib_modules()
    missing = []
    for module in _modules(layer):
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            homes = [module] + [m for m in everywhere if getattr(m, name, None) is obj]
            if not any(f"{home.__name__}.{name}" in ids for home in homes):
                missing.append(f"{module.__name__}.{name}")
    assert not missing, (
        "public names without an entry in the API appendix (a constant needs a `#:` comment above it; "
        "a module needs an automodule block in book/api.md):\n" + "\n".join(missing)
    )


@pytest.mark.parametrize("layer", LAYERS)
def test_every_public_class_documents_its_arguments_and_a_layer_its_shapes(layer):
    """Each class says what its arguments are in its own docstring (no "see the base class"), and a
    layer (an nn.Module with a forward) what shapes it takes and returns."""
    import inspect

    from torch import nn

    problems = []
    for module in _modules(layer):
        for name in getattr(module, "__all__", []):
            cls = getattr(module, name)
            if not inspect.isclass(cls) or cls.__module__ != module.__name__:
                continue
            doc = cls.__dict__.get("__doc__") or ""
            forward_in_bnlib = any("forward" in c.__dict__ for c in cls.__mro__ if c.__module__.startswith("bnlib."))
            is_layer = issubclass(cls, nn.Module) and forward_in_bnlib
            takes_arguments = bool(inspect.signature(cls).parameters)
            for section, needed in (("Args:", takes_arguments), ("Shape:", is_layer)):
                if needed and section not in doc:
                    problems.append(f"{module.__name__}.{name}: no {section} section")
    assert not problems, "\n".join(problems)


def test_front_page_links_to_the_api_appendix():
    html = (SITE / "book" / "intro.html").read_text(encoding="utf-8")
    assert 'href="api.html"' in html
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    appendices = next(p["chapters"] for p in toc["parts"] if p.get("caption") == "Appendices")
    assert appendices[-1]["file"] == "book/api", "the API appendix is the last appendix"


# --------------------------------------------------------------------------------------------------
# chapter pages read like a book: no set-up code on the page, plotting code folded under its figure


def _code_cells(notebook: Path):
    import json

    for index, cell in enumerate(json.loads(notebook.read_text(encoding="utf-8"))["cells"]):
        if cell["cell_type"] == "code":
            yield index, "".join(cell["source"]), cell.get("metadata", {}).get("tags", [])


@pytest.mark.parametrize("notebook", sorted(p.name for p in (ROOT / "book").glob("*.ipynb")))
def test_setup_cells_are_hidden_and_plotting_cells_folded(notebook):
    problems = []
    for index, source, tags in _code_cells(ROOT / "book" / notebook):
        hidden = {"remove-input", "remove-cell"} & set(tags)
        if ('find_spec("bnlib")' in source or "bnlib.setup(" in source) and not hidden:
            problems.append(f"cell {index}: set-up code shown on the page (tag it remove-input)")
        draws = "plt.subplots" in source or "plt.figure" in source
        if draws and 'glue("fig' in source and "assert " not in source and not (hidden or "hide-input" in tags):
            problems.append(f"cell {index}: plotting code not folded under its figure (tag it hide-input)")
    assert not problems, f"{notebook}:\n  " + "\n  ".join(problems)


def test_no_built_page_shows_the_setup_cell():
    if not SITE.exists():
        pytest.skip("no built site")
    shown = [p.name for p in (SITE / "book").glob("*.html") if "find_spec" in p.read_text(encoding="utf-8")]
    assert not shown, f"the set-up cell is on {shown}"


# --------------------------------------------------------------------------------------------------
# every chapter has an explorer and ends with what to remember

WIDGET_VIEW_MIME = "application/vnd.jupyter.widget-view+json"


@pytest.mark.parametrize("chapter", _chapters_outside_the_appendices())
def test_every_chapter_has_an_explorer_stored_with_its_frames(chapter):
    """A slider over pre-rendered frames (bnlib.present.widgets.frame_slider), stored with the page so
    that it scrubs on the static site; the browser suite moves it."""
    nb = json.loads((ROOT / f"{chapter}.ipynb").read_text(encoding="utf-8"))
    explorers = [
        c
        for c in nb["cells"]
        if c["cell_type"] == "code"
        and "frame_slider(" in "".join(c["source"])
        and any(WIDGET_VIEW_MIME in o.get("data", {}) for o in c.get("outputs", []))
    ]
    assert explorers, f"{chapter}: no explorer (a frame_slider with a stored widget view)"
    state = nb["metadata"].get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
    images = [m for m in state.get("state", {}).values() if m.get("model_name") == "ImageModel"]
    assert len(images) >= 2, f"{chapter}: the explorer's frames are not stored with the notebook"


@pytest.mark.parametrize("chapter", _chapters_outside_the_appendices())
def test_every_chapter_ends_with_what_to_remember_in_glued_numbers(chapter):
    nb = json.loads((ROOT / f"{chapter}.ipynb").read_text(encoding="utf-8"))
    markdown = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown"]
    boxes = [i for i, text in enumerate(markdown) if re.search(r"\{admonition\} What to remember", text)]
    assert len(boxes) == 1, f"{chapter}: {len(boxes)} 'What to remember' boxes, want one"
    box = markdown[boxes[0]].split("{admonition} What to remember", 1)[1].split("\n```", 1)[0]
    bullets = [line for line in box.splitlines() if line.startswith("- ")]
    assert 3 <= len(bullets) <= 6, f"{chapter}: the box has {len(bullets)} bullets, want 3 to 6"
    assert "{glue:text}" in box, f"{chapter}: no glued number in the box"
    exercises = [i for i, text in enumerate(markdown) if "{exercise}" in text]
    assert not exercises or boxes[0] < exercises[0], f"{chapter}: the box comes after the exercises"


@pytest.mark.parametrize("notebook", sorted(p.name for p in (ROOT / "book").glob("*.ipynb")))
def test_no_code_line_shown_on_a_page_is_wider_than_the_column(notebook):
    """Code shown on a page (not removed) fits the text column: 88 characters, as ruff formats it."""
    wide = [
        f"cell {index}: {len(line)} characters: {line.strip()[:60]}"
        for index, source, tags in _code_cells(ROOT / "book" / notebook)
        if not {"remove-input", "remove-cell"} & set(tags)
        for line in source.splitlines()
        if len(line) > 88
    ]
    assert not wide, f"{notebook}:\n  " + "\n  ".join(wide)
