"""The book as a website, read the way a reader reads it: in a browser, offline.

Builds the site exactly as `make book` does (Sphinx, warnings are errors) into a temporary folder, serves it with
http.server on 127.0.0.1, and visits the landing page, every chapter (book/[0-9][0-9]_*.ipynb, then the
appendices book/A*_*.ipynb) and the API page in Debian's headless Chromium. Every page must show its title, load
every image, typeset its math with the MathJax copy served from the site, and raise no script error; the
landing page lists the chapters in order. Every request the pages make must go to the local server (anything
else is blocked and reported: a reader on a train has no CDN), and none may fail. Every internal link of every
page must resolve: the target answers 200 and, for a #fragment, has an element with that id. Saves a
screenshot of one chapter to build/site/chapter.png and prints its path.

Marked `browser`: it skips with the reason when Chromium or playwright is missing, and fails instead in CI.
"""

import functools
import html.parser
import http.server
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import nbformat
import pytest
from conftest import CHROMIUM, CHROMIUM_ARGS, require_browser

import flashdecode

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"
SCREENSHOT = ROOT / "build" / "site" / "chapter.png"
# the same command as `make book` (there into build/html): -W makes every warning an error
SPHINX = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q"]


def chapters():
    """The notebooks the site must show, in reading order: chapters, then appendices."""
    return sorted(BOOK.glob("[0-9][0-9]_*.ipynb")) + sorted(BOOK.glob("A*_*.ipynb"))


def notebook_facts(path):
    """(title, has math, number of images, widget fallbacks) of a notebook as the site should render it."""
    notebook = nbformat.read(path, as_version=4)
    markdown = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "markdown")
    title = re.search(r"^# (.+)$", markdown, re.M)
    assert title, f"{path.name} has no '# title' heading"
    images = len(re.findall(r"!\[[^\]]*\]\([^)]+\)", markdown))
    widgets = []  # a widget output's text/plain: the site shows it in place of the live widget
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            images += any(mime.startswith("image/") for mime in data)
            if "application/vnd.jupyter.widget-view+json" in data:
                lines = data.get("text/plain", "").strip().splitlines()
                assert lines, f"{path.name}: a widget output with no text/plain fallback shows nothing on the site"
                widgets.append(lines[0])
    return re.sub(r"[`*]", "", title.group(1)).strip(), "$" in markdown, images, widgets


def plain(text):
    """Text with Sphinx's smart quotes and dashes turned back into what the notebook's author typed."""
    for fancy, typed in [("’", "'"), ("‘", "'"), ("“", '"'), ("”", '"'), ("—", "---"), ("–", "--")]:
        text = text.replace(fancy, typed)
    return text


class _Ids(html.parser.HTMLParser):
    """Every id= in a page: the anchors a #fragment may point at."""

    def __init__(self):
        super().__init__()
        self.ids = set()

    def handle_starttag(self, tag, attrs):
        self.ids.update(value for name, value in attrs if name == "id" and value)


@pytest.fixture(scope="module", autouse=True)
def _browser_available():
    require_browser()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Build the site (as make book does) and serve it on 127.0.0.1; yields (base url, html folder, requests log)."""
    out = tmp_path_factory.mktemp("site")
    started = time.monotonic()
    build = subprocess.run(
        SPHINX + ["-d", str(out / "doctrees"), "site", str(out / "html")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, f"the site build failed (warnings are errors):\n{build.stderr[-4000:]}"
    assert "WARNING" not in build.stderr + build.stdout, build.stderr[-4000:]
    build_seconds = time.monotonic() - started
    root = out / "html"

    served = []  # (path, status) of every request the server answered

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_request(self, code="-", size="-"):
            served.append((self.path, int(code) if str(code).isdigit() else 0))

        def log_message(self, format, *args):  # quiet: the test reports what matters
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root, served, build_seconds
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _fetch(url):
    """(status, body) of a GET; 4xx/5xx as a status, not an exception."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, b""


def test_every_page_renders_offline_with_figures_math_and_working_links(site, capsys):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    base, root, served, build_seconds = site
    notebooks = chapters()
    assert notebooks, "no chapters found in book/"
    chapter_pages = [f"book/{path.stem}.html" for path in notebooks]
    for page_path in chapter_pages:
        assert (root / page_path).is_file(), f"the site has no page {page_path}"

    started = time.monotonic()
    blocked, errors, links = [], [], {}  # links: absolute href -> the page it was found on
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 1000})
            context.set_default_timeout(30_000)

            def only_local(route):
                # nothing may leave the machine: record and block every request not to our server
                if route.request.url.startswith(base + "/") or route.request.url.startswith("data:"):
                    route.continue_()
                else:
                    blocked.append(route.request.url)
                    route.abort()

            context.route("**/*", only_local)
            page = context.new_page()
            page.on("pageerror", lambda error: errors.append(f"{page.url}: {error}"))

            def visit(path):
                page.goto(f"{base}/{path}", wait_until="load")
                # a page without math may carry no MathJax; where it does, MathJax loads deferred and its startup
                # promise resolves after the page's first typeset
                if page.locator("script[src*='mathjax']").count():
                    try:
                        page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise")
                    except PlaywrightTimeout:
                        raise AssertionError(f"{path}: MathJax did not start; blocked requests: {blocked}") from None
                    page.evaluate("() => MathJax.startup.promise")
                images = page.eval_on_selector_all(
                    "img", "els => els.map(e => ({src: e.currentSrc || e.src, ok: e.complete && e.naturalWidth > 0}))"
                )
                broken = [image["src"] for image in images if not image["ok"]]
                assert not broken, f"{path}: images that did not load: {broken}"
                math = page.evaluate(
                    """() => ({
                        nodes: document.querySelectorAll('.math').length,
                        typeset: document.querySelectorAll('.math mjx-container').length,
                        untypeset: [...document.querySelectorAll('.math')].filter(
                            e => !e.querySelector('mjx-container')).map(e => e.textContent.slice(0, 80)),
                        errors: [...document.querySelectorAll('mjx-merror')].map(e => e.textContent.slice(0, 80)),
                    })"""
                )
                assert not math["untypeset"], f"{path}: math left as TeX source: {math['untypeset']}"
                assert not math["errors"], f"{path}: TeX errors: {math['errors']}"
                for href in page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)"):
                    links.setdefault(href, path)
                return len(images), math

            # the landing page: the README's story, then the chapters in order, then the API
            visit("index.html")
            assert page.locator("h1").first.inner_text().strip().rstrip("#").strip() == "flashdecode"
            toc = page.eval_on_selector_all(".toctree-wrapper a.reference.internal", "els => els.map(e => e.href)")
            toc = [urllib.parse.urlsplit(href).path.lstrip("/") for href in toc if "#" not in href]
            assert toc == chapter_pages + ["api.html"], f"the landing page lists {toc}"

            for notebook, page_path in zip(notebooks, chapter_pages):
                title, has_math, n_images, widgets = notebook_facts(notebook)
                shown_images, math = visit(page_path)
                heading = page.locator("article h1").first.inner_text().strip().rstrip("#¶").strip()
                assert plain(heading) == plain(title), f"{page_path}: heading {heading!r}, notebook title {title!r}"
                assert plain(page.title()).startswith(plain(title)), f"{page_path}: <title> {page.title()!r}"
                assert shown_images >= n_images, f"{page_path}: {shown_images} images, the notebook has {n_images}"
                text = page.locator("article").inner_text()
                missing = [widget for widget in widgets if widget not in text]
                assert not missing, f"{page_path}: widget outputs not shown as text: {missing}"
                if has_math:
                    assert math["typeset"] > 0 and math["typeset"] == math["nodes"], f"{page_path}: {math}"
                # every page links every chapter in the sidebar, in order
                nav = page.eval_on_selector_all("nav.bd-links a.reference.internal", "els => els.map(e => e.href)")
                nav = [urllib.parse.urlsplit(href).path.lstrip("/") for href in nav]
                assert [p for p in nav if p.startswith("book/")] == chapter_pages, f"{page_path}: sidebar {nav}"
                if page_path == chapter_pages[0]:
                    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(SCREENSHOT))

            visit("api.html")
            api_text = page.locator("article").inner_text()
            undocumented = [name for name in flashdecode.__all__ if name not in api_text]
            assert not undocumented, f"the API page misses {undocumented}"
            assert page.locator("dl.py").count() >= len(flashdecode.__all__)
        finally:
            browser.close()
    browser_seconds = time.monotonic() - started

    assert not blocked, f"pages asked for resources outside the site: {sorted(set(blocked))}"
    assert not errors, f"script errors: {errors}"
    failed = [(path, status) for path, status in served if status >= 400 and path != "/favicon.ico"]
    assert not failed, f"requests the site could not answer: {failed}"
    mathjax = [path for path, _ in served if "/_static/mathjax/" in path]
    assert any(path.endswith("tex-chtml.js") for path in mathjax), "MathJax was not loaded from the site"
    assert any(".woff" in path for path in mathjax), "MathJax's fonts were not loaded from the site"

    # every link within the site resolves, and every #fragment names an element of its target page
    ids, checked = {}, 0
    for href, found_on in sorted(links.items()):
        if not href.startswith(base + "/"):
            continue  # external links (none today) are not fetched: there is no internet here
        target, _, fragment = href.partition("#")
        if target not in ids:
            status, body = _fetch(target)
            assert status == 200, f"{found_on}: link {href} answers {status}"
            parser = _Ids()
            if target.endswith(".html") or target.endswith("/"):
                parser.feed(body.decode("utf-8", "replace"))
            ids[target] = parser.ids
        if fragment:
            fragment = urllib.parse.unquote(fragment)
            assert fragment in ids[target], f"{found_on}: link {href}: no element with id {fragment!r}"
        checked += 1
    assert checked > 10 * len(chapter_pages), f"only {checked} internal links checked"

    with capsys.disabled():
        print(
            f"\n[site] built in {build_seconds:.1f} s; {len(chapter_pages) + 2} pages in Chromium in "
            f"{browser_seconds:.1f} s; {checked} internal links resolved\n[site] screenshot: {SCREENSHOT}"
        )
    assert SCREENSHOT.stat().st_size > 10_000
