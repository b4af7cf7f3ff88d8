"""The built site in a real browser, the way a reader meets it.

Headless Chromium (Debian's ``chromium`` package, never a browser downloaded by Playwright) driven by
Playwright for Python, against ``_build/html`` served over HTTP on 127.0.0.1. For every built page:
math is typeset (no raw TeX left), every image loads, stored widgets render, the console shows no
error, and the page requests nothing from any host but the site itself (such requests are blocked and
reported). A full-page screenshot of every page goes to ``_build/screenshots/`` for review.

Without chromium (or Playwright) the tests skip with the reason; under CI (``CI=true``) they fail.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import threading
import urllib.parse
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "_build" / "html"
SCREENSHOTS = ROOT / "_build" / "screenshots"
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
TIMEOUT_MS = 30_000
PHONE_WIDTH = 390  # CSS pixels: a current phone held upright


def _unavailable(reason: str):
    """Skip on a developer machine; fail under CI, where the browser suite must run."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the browser tests must run here)")
    pytest.skip(reason)


def chromium_path() -> str | None:
    """BNBOOK_CHROMIUM if set (and only it), else Debian's chromium on the PATH or in /usr/bin."""
    override = os.environ.get("BNBOOK_CHROMIUM")
    candidates = [override] if override else [shutil.which("chromium"), "/usr/bin/chromium"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def built_pages() -> list[str]:
    """Every HTML page of the built site, as a path relative to it (chapters are picked up as they land)."""
    if not (SITE / "index.html").exists():
        return []
    skip = {"_static", "_sources", "_images", "jupyter_execute"}
    return sorted(
        p.relative_to(SITE).as_posix() for p in SITE.rglob("*.html") if not skip.intersection(p.relative_to(SITE).parts)
    )


def redirect_target(path: str) -> str | None:
    """Where a page forwards to with ``<meta http-equiv="refresh">`` (index.html does), if anywhere."""
    if "?" in path:
        return None
    match = re.search(
        r"""<meta[^>]+http-equiv=["']?refresh["']?[^>]+url=([^"'>\s]+)""",
        (SITE / path).read_text(encoding="utf-8", errors="replace"),
        flags=re.IGNORECASE,
    )
    return match.group(1) if match else None


# --------------------------------------------------------------------------------------------------
# the site over HTTP, and the browser


class _SiteHandler(SimpleHTTPRequestHandler):
    extra: dict[str, bytes] = {}

    def do_GET(self):  # noqa: N802 (http.server's naming)
        path = urllib.parse.urlsplit(self.path).path
        if path in self.extra:
            body = self.extra[path]
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
        pass


@pytest.fixture(scope="session")
def site():
    """The built site served on 127.0.0.1; yields its base URL (``http://127.0.0.1:PORT``)."""
    if not (SITE / "index.html").exists():
        pytest.fail("no built site in _build/html: run `make book` first (`make test` does)")
    handler = functools.partial(_SiteHandler, directory=str(SITE))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("Playwright for Python is not installed (it is in requirements-dev.txt: run `make`)")
    executable = chromium_path()
    if executable is None:
        _unavailable(
            "no chromium executable: install Debian's browser once (`sudo apt-get install chromium`), "
            "or point BNBOOK_CHROMIUM at one"
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


class Visit:
    """One page opened in a fresh browser context, with what it logged and requested."""

    def __init__(self, browser, base_url: str, width: int = 1280):
        self.base = urllib.parse.urlsplit(base_url)
        self.context = browser.new_context(
            viewport={"width": width, "height": 900 if width > PHONE_WIDTH else 844},
            is_mobile=width <= PHONE_WIDTH,
            has_touch=width <= PHONE_WIDTH,
            service_workers="block",
        )
        self.context.set_default_timeout(TIMEOUT_MS)
        self.foreign: list[str] = []
        self.errors: list[str] = []
        self.failed: list[str] = []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        self.page.on("response", self._response)

    def _route(self, route):
        url = urllib.parse.urlsplit(route.request.url)
        if url.scheme in ("data", "blob", "about") or url.netloc == self.base.netloc:
            route.continue_()
        else:  # never let the page reach another host: record it and block it
            self.foreign.append(route.request.url)
            route.abort()

    def _console(self, message):
        if message.type == "error":
            self.errors.append(f"console: {message.text}")

    def _response(self, response):
        if response.status >= 400:
            self.failed.append(f"{response.status} {response.url}")

    def close(self):
        self.context.close()


@pytest.fixture
def visit(browser, site):
    visits = []

    def open_page(path: str, width: int = 1280) -> Visit:
        v = Visit(browser, site, width)
        visits.append(v)
        v.page.goto(f"{site}/{path}", wait_until="load")
        forward = redirect_target(path)
        if forward:  # index.html forwards to the intro: check the page the reader lands on
            v.page.wait_for_url(f"**/{forward}", wait_until="load")
        return v

    yield open_page
    for v in visits:
        v.close()


# --------------------------------------------------------------------------------------------------
# what a page must do in the browser

WAIT_FOR_MATHJAX = """async () => {
  const ready = () => window.MathJax && MathJax.startup && MathJax.startup.promise;
  if (!window.MathJax && !document.querySelector(".math")) return "absent";
  const deadline = Date.now() + 20000;
  while (!ready() && Date.now() < deadline) await new Promise(r => setTimeout(r, 50));
  if (!ready()) return "did not start";
  await MathJax.startup.promise;
  return "typeset";
}"""

# Text the reader sees (outside code, scripts and typeset math) that still looks like TeX.
RAW_TEX = r"""() => {
  const skip = "PRE,CODE,SCRIPT,STYLE,TEXTAREA,MJX-CONTAINER,MJX-ASSISTIVE-MML,svg,math";
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT, {
    acceptNode: n => n.parentElement && n.parentElement.closest(skip) ? NodeFilter.FILTER_REJECT
                                                                      : NodeFilter.FILTER_ACCEPT});
  const found = [];
  const tex = /\\\(|\\\)|\\\[|\\\]|\$\$|\\begin\{|\\frac|\\mathbf|\\hat\{|\\sigma|\\sqrt/;
  for (let n = walker.nextNode(); n; n = walker.nextNode())
    if (tex.test(n.textContent)) found.push(n.textContent.trim().slice(0, 120));
  const math = Array.from(document.querySelectorAll(".math"));
  const untypeset = math.filter(m => !m.querySelector("mjx-container")).map(m => m.textContent.slice(0, 120));
  const errors = Array.from(document.querySelectorAll("mjx-merror, [data-mjx-error]"))
                      .map(e => e.getAttribute("data-mjx-error") || e.textContent);
  return {raw: found, untypeset: untypeset, errors: errors, count: math.length};
}"""

LOAD_IMAGES = """async () => {
  const images = Array.from(document.images);
  for (const img of images) img.loading = "eager";
  await Promise.all(images.map(img => img.complete ? null :
      new Promise(r => { img.addEventListener("load", r); img.addEventListener("error", r); })));
  return images.filter(img => !img.complete || img.naturalWidth === 0).map(img => img.currentSrc || img.src);
}"""

WIDGET_VIEWS = f"""() => {{
  const views = Array.from(document.querySelectorAll('script[type="{WIDGET_VIEW}"]'));
  const rendered = views.filter(v => {{
    const area = v.previousElementSibling;
    return area && area.classList.contains("widget-subarea")
                && area.querySelector(".jupyter-widgets, .widget-inline-hbox, .widget-box, .lm-Widget");
  }});
  return {{views: views.length, rendered: rendered.length}};
}}"""


# Solutions of exercises start folded (sphinx-exercise ``:class: dropdown`` + sphinx-togglebutton).
UNFOLDED_SOLUTIONS = """() => Array.from(document.querySelectorAll(".solution")).filter(s =>
  Array.from(s.children).some(c => !c.classList.contains("admonition-title") && c.offsetHeight > 0)
).map(s => (s.querySelector(".admonition-title") || s).textContent.trim().slice(0, 80))"""

# Display equations wider than their column are cut off on the page (the theme hides the overflow).
WIDE_EQUATIONS = """() => Array.from(document.querySelectorAll('mjx-container[display="true"]'))
  .filter(e => e.scrollWidth > e.parentElement.clientWidth + 2)
  .map(e => (e.textContent || "").slice(0, 80))"""

# At phone width: content that sticks out to the right of the screen, unless it sits inside something that
# scrolls sideways (code blocks, table and output scrollers), and figures wider than their column.
SIDEWAYS = """() => {
  const width = document.documentElement.clientWidth;
  const scrolls = el => { for (let a = el.parentElement; a && a !== document.body; a = a.parentElement) {
      const x = getComputedStyle(a).overflowX; if (x === "auto" || x === "scroll") return true; }
    return false; };
  const hidden = el => !(el.offsetWidth || el.offsetHeight || el.getClientRects().length)
    || el.closest(".bd-sidebar-primary, .bd-sidebar-secondary");  // drawers, off screen until opened
  const out = [];
  for (const el of document.querySelectorAll("main *")) {
    if (hidden(el) || scrolls(el)) continue;
    const r = el.getBoundingClientRect();
    if (r.right > width + 1 && r.width > 0)
      out.push(`${el.tagName.toLowerCase()}.${el.className || ""} right edge ${Math.round(r.right)} px`);
  }
  const figures = Array.from(document.querySelectorAll("main img")).filter(img =>
      !hidden(img) && img.getBoundingClientRect().width > img.parentElement.clientWidth + 1)
    .map(img => `figure wider than its column: ${img.currentSrc || img.src}`);
  return {page: document.documentElement.scrollWidth - width, items: out.slice(0, 5), figures: figures};
}"""

NEXT_FRAME = "() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"


def screenshot_name(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "__", path.removesuffix(".html")) + ".png"


def check_page(v: Visit, path: str) -> list[str]:
    problems = []
    page = v.page
    mathjax = page.evaluate(WAIT_FOR_MATHJAX)
    if mathjax == "did not start":
        problems.append("MathJax did not start")
    math = page.evaluate(RAW_TEX)
    problems += [f"math not typeset: {t!r}" for t in math["untypeset"][:5]]
    problems += [f"TeX error: {t!r}" for t in math["errors"]]
    problems += [f"raw TeX in the text: {t!r}" for t in math["raw"][:5]]
    problems += [f"display equation wider than the page: {t!r}" for t in page.evaluate(WIDE_EQUATIONS)]
    problems += [f"image did not load: {src}" for src in page.evaluate(LOAD_IMAGES)]
    problems += [f"solution shown unfolded: {t!r}" for t in page.evaluate(UNFOLDED_SOLUTIONS)]
    views = page.evaluate(WIDGET_VIEWS)["views"]
    if views:
        try:
            page.wait_for_function(f"() => ({WIDGET_VIEWS})().rendered === {views}", timeout=TIMEOUT_MS)
        except Exception:  # a timeout: reported below, with the count
            pass
        widgets = page.evaluate(WIDGET_VIEWS)
        if widgets["rendered"] != widgets["views"]:
            problems.append(f"only {widgets['rendered']} of {widgets['views']} widget views rendered")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOTS / screenshot_name(path)
    tall = page.evaluate("() => document.documentElement.scrollHeight") > 30_000  # the API appendix
    page.screenshot(path=str(shot), full_page=not tall)
    if not shot.exists() or shot.stat().st_size < 1000:
        problems.append(f"no screenshot saved at {shot.relative_to(ROOT)}")
    problems += v.errors + [f"request failed: {r}" for r in v.failed]
    problems += [f"request to another host: {url}" for url in v.foreign]
    return problems


PAGES = built_pages()


@pytest.mark.parametrize("path", PAGES or ["(no built site)"])
def test_page_in_the_browser(visit, path):
    if not PAGES:
        pytest.fail("no built site in _build/html: run `make book` first (`make test` does)")
    v = visit(path)
    problems = check_page(v, path)
    assert not problems, f"{path}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("path", PAGES or ["(no built site)"])
def test_page_fits_a_phone_screen(visit, path):
    """At 390 px nothing runs off the screen outside a sideways scroller, and figures scale down."""
    if not PAGES:
        pytest.fail("no built site in _build/html: run `make book` first (`make test` does)")
    v = visit(path, width=PHONE_WIDTH)
    v.page.evaluate(LOAD_IMAGES)
    found = v.page.evaluate(SIDEWAYS)
    shot = SCREENSHOTS / "phone" / screenshot_name(path)
    shot.parent.mkdir(parents=True, exist_ok=True)
    tall = v.page.evaluate("() => document.documentElement.scrollHeight") > 30_000  # the API appendix
    v.page.screenshot(path=str(shot), full_page=not tall)
    problems = [f"the page scrolls sideways by {found['page']} px"] if found["page"] > 1 else []
    problems += [f"runs off the screen: {item}" for item in found["items"]] + found["figures"]
    assert not problems, f"{path} at {PHONE_WIDTH} px:\n  " + "\n  ".join(problems)


WIDGET_PAGES = [p for p in PAGES if WIDGET_VIEW in (SITE / p).read_text(encoding="utf-8", errors="replace")]


@pytest.mark.parametrize("path", WIDGET_PAGES or ["(no page with widgets)"])
def test_widget_sliders_scrub_offline(visit, path):
    """On the static site a slider linked in the browser (bnlib.present.widgets) still changes what it shows."""
    if not WIDGET_PAGES:
        pytest.skip("no built page has stored widgets yet")
    v = visit(path)
    v.page.wait_for_function(f"() => ({WIDGET_VIEWS})().rendered > 0", timeout=TIMEOUT_MS)
    areas = [a for a in v.page.query_selector_all(".widget-subarea") if a.query_selector(".noUi-handle")]
    if not areas:
        pytest.skip(f"{path}: its widgets have no slider")
    for number, area in enumerate(areas):
        area.scroll_into_view_if_needed()
        handle = area.query_selector(".noUi-handle")
        handle.focus()
        v.page.keyboard.press("Home")
        v.page.evaluate(NEXT_FRAME)
        first = (area.inner_text(), area.screenshot())
        handle.focus()
        v.page.keyboard.press("End")
        try:
            v.page.wait_for_function("([el, text]) => el.innerText !== text", arg=[area, first[0]], timeout=10_000)
        except Exception:  # a timeout: reported by the assertion below
            pass
        v.page.evaluate(NEXT_FRAME)
        last = (area.inner_text(), area.screenshot())
        assert first[0] != last[0], f"{path}: slider {number} did not move ({first[0]!r})"
        assert first[1] != last[1], f"{path}: slider {number} moved but the view did not change"
    assert not v.errors and not v.foreign and not v.failed, v.errors + v.foreign + v.failed


def test_every_chapter_page_has_an_explorer_that_the_slider_test_moves():
    """Each chapter outside the appendices carries a stored widget, so the slider test above visits it."""
    if not PAGES:
        pytest.fail("no built site in _build/html: run `make book` first (`make test` does)")
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    chapters = [
        f"{c['file']}.html"
        for part in toc["parts"]
        if part.get("caption") != "Appendices"
        for c in part["chapters"]
        if c["file"] != "book/claims"
    ]
    assert chapters and not set(chapters) - set(WIDGET_PAGES), sorted(set(chapters) - set(WIDGET_PAGES))


def test_every_page_was_checked_and_photographed():
    """The suite covers the whole site (chapters included as they land) and leaves a screenshot of each."""
    if not PAGES:
        pytest.fail("no built site in _build/html: run `make book` first (`make test` does)")
    assert {"index.html", "search.html", "book/formulas.html", "book/glossary.html", "book/status.html"} <= set(PAGES)
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = re.findall(r"file: (\S+)", yaml.safe_dump(toc))
    assert {f"{f}.html" for f in files} <= set(PAGES), "a page in _toc.yml was not built"


def test_search_finds_the_formulas_chapter(visit):
    v = visit("search.html?q=running+variance")
    v.page.wait_for_selector("#search-results ul.search li a", timeout=TIMEOUT_MS)
    links = v.page.eval_on_selector_all("#search-results ul.search li a", "els => els.map(e => e.href)")
    assert any("book/formulas.html" in href for href in links), f"search results: {links}"
    assert not v.errors and not v.foreign, v.errors + v.foreign


# --------------------------------------------------------------------------------------------------
# widgets: the vendored widget manager renders stored state offline, even before a chapter has one


def _widget_probe_page() -> bytes:
    """A page with one stored IntSlider, made the way the book makes its pages: a notebook executed by
    nbclient with ``store_widget_state``, and the widget scripts _config.yml tells myst-nb to load."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    source = "import ipywidgets\nipywidgets.IntSlider(value=7, min=0, max=10, description='step')"
    nb.cells = [nbformat.v4.new_code_cell(source)]
    NotebookClient(nb, kernel_name="python3", timeout=120, store_widget_state=True).execute()
    state = nb.metadata["widgets"][WIDGET_STATE]
    view = next(o["data"][WIDGET_VIEW] for o in nb.cells[0].outputs if WIDGET_VIEW in o.get("data", {}))
    config = yaml.safe_load((ROOT / "_config.yml").read_text())["sphinx"]["config"]["nb_ipywidgets_js"]
    scripts = "\n".join(
        f'<script src="/_static/{src}" {" ".join(f"{k}={json.dumps(v)}" for k, v in attrs.items())}></script>'
        for src, attrs in config.items()
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>widget probe</title>{scripts}</head><body>"
        f'<script type="{WIDGET_STATE}">{json.dumps(state)}</script>'
        f'<div class="cell_output"><script type="{WIDGET_VIEW}">{json.dumps(view)}</script></div>'
        "</body></html>"
    ).encode()


def test_stored_widget_renders_offline(browser, site):
    _SiteHandler.extra["/__widget_probe__.html"] = _widget_probe_page()
    v = Visit(browser, site)
    try:
        v.page.goto(f"{site}/__widget_probe__.html", wait_until="load")
        v.page.wait_for_selector(".widget-subarea .widget-slider", timeout=TIMEOUT_MS)
        assert v.page.evaluate(WIDGET_VIEWS) == {"views": 1, "rendered": 1}, "the page check misses the view"
        text = v.page.inner_text(".widget-subarea")
        assert "step" in text and "7" in text, f"rendered widget shows {text!r}"
        assert not v.errors, v.errors
        assert not v.foreign, f"the widget manager reached another host: {v.foreign}"
        assert not v.failed, v.failed
    finally:
        v.close()
