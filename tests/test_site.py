"""The built site (``make book`` builds it into _build/html before ``make test`` runs this)."""

from html.parser import HTMLParser
from pathlib import Path

import pytest

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
