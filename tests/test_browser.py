"""The explorer where readers use it: JupyterLab in a real (headless) Chromium.

Starts JupyterLab from this Python on 127.0.0.1 (a free port, a random token, a temporary root holding a copy
of the tiling chapter with its outputs cleared, and temporary Jupyter config/data/settings dirs so nothing of
the user's leaks in), opens the chapter through the PyPI `playwright` package driving Debian's
/usr/bin/chromium, runs the explorer cell, then steps the tile slider with the keyboard through all 16 tiles
of the 1,000-key cache, checking each step re-renders the figure and reports the new tile, and that the
last tile reports partial output == exact output; then goes back to tile 1 and presses play, which must
run to the last tile. Saves a screenshot under build/ and prints its path.
The server is always shut down (REST shutdown, then terminate/kill of its process group).

Marked `browser`. It skips, with the reason, when Chromium or playwright is missing — except in CI (CI=true),
where it fails instead: .ci/run installs Chromium, so a skip there would hide a broken setup.
"""

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import pytest
from conftest import CHROMIUM, CHROMIUM_ARGS, require_browser

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
CHAPTER = ROOT / "book" / "03_tiling.ipynb"
EXPLORER_CELL = "explorer = SoftmaxExplorer(cache_len=1000, tile_size=64"
N_TILES = 16  # 1,000 keys in tiles of 64
SCREENSHOT = ROOT / "build" / "browser" / "softmax_explorer.png"


@pytest.fixture(scope="module", autouse=True)
def _browser_available():
    require_browser()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url, timeout=2.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read()


def _wait_for_idle_kernel(base, token, timeout=60):
    """Block until the server has a session whose kernel is idle (the notebook's kernel started)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sessions = json.loads(_get(f"{base}/api/sessions?token={token}")[1])
        if any(s.get("kernel", {}).get("execution_state") == "idle" for s in sessions):
            return
        time.sleep(0.3)
    raise AssertionError(f"no idle kernel after {timeout} s")


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on loopback serving a clean copy of the tiling chapter; yields (base url, token)."""
    root = tmp_path / "root"
    root.mkdir()
    notebook = nbformat.read(CHAPTER, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbformat.write(notebook, root / CHAPTER.name)

    # settings: every cell in the DOM (no virtual scrolling), so the explorer cell is found far down the chapter
    tracker = tmp_path / "settings" / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text(json.dumps({"windowingMode": "none"}))
    news = tmp_path / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))  # no toast over the output
    config = tmp_path / "config"
    config.mkdir()
    (config / "jupyter_server_config.json").write_text(
        json.dumps({"LabApp": {"news_url": None, "check_for_updates_class": "jupyterlab.NeverCheckForUpdate"}})
    )
    env = dict(
        os.environ,
        JUPYTER_CONFIG_DIR=str(config),
        JUPYTER_DATA_DIR=str(tmp_path / "data"),
        JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"),
        IPYTHONDIR=str(tmp_path / "ipython"),
        MPLBACKEND="agg",
    )
    env.pop("JUPYTER_PATH", None)

    started = time.monotonic()
    token, port = secrets.token_hex(16), _free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "jupyterlab.log"
    log = open(log_path, "w")
    # the server runs from this (the repo's .venv) Python, so the native `python3` kernel is the venv's too
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={port}",
            "--port-retries=0",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root}",
        ]
        + (["--allow-root"] if os.geteuid() == 0 else []),  # CI runs as root
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if _get(f"{base}/api/status?token={token}")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"JupyterLab did not answer within 60 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.3)
        _, body = _get(f"{base}/api/kernelspecs?token={token}")
        specs = json.loads(body)["kernelspecs"]
        assert specs["python3"]["spec"]["argv"][0] in (sys.executable, "python"), specs["python3"]["spec"]["argv"]
        yield base, token, log_path, time.monotonic() - started
    finally:
        try:  # clean shutdown: stops the kernels too
            request = urllib.request.Request(
                f"{base}/api/shutdown", method="POST", headers={"Authorization": f"token {token}"}
            )
            urllib.request.urlopen(request, timeout=5).close()
            server.wait(timeout=15)
        except Exception:
            pass
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        log.close()


def test_explorer_steps_through_all_tiles_in_jupyterlab(lab, capsys):
    from playwright.sync_api import expect, sync_playwright

    base, token, log_path, server_seconds = lab
    started = time.monotonic()
    marks = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.set_default_timeout(30_000)
            page.goto(f"{base}/lab/tree/{CHAPTER.name}?token={token}")
            cell = page.locator(".jp-Notebook .jp-CodeCell").filter(has_text=EXPLORER_CELL)
            expect(cell).to_have_count(1, timeout=60_000)
            # wait until the notebook's kernel has started (asked over REST), then run just this cell (it imports
            # what it needs); a key press that lands while the page is still settling is retried
            _wait_for_idle_kernel(base, token)
            expect(page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first).to_be_visible()
            marks["lab open, kernel idle"] = time.monotonic()
            prompt = cell.locator(".jp-InputPrompt")
            for attempt in range(3):
                prompt.click()
                page.keyboard.press("Shift+Enter")
                try:
                    expect(prompt).to_contain_text(re.compile(r"\[(\*|\d+)\]"), timeout=10_000)
                    break
                except AssertionError:
                    if attempt == 2:
                        raise

            readout = cell.locator(".flashdecode-readout")
            figure = cell.locator("img.flashdecode-figure")
            expect(readout).to_contain_text(f"tile 1 of {N_TILES}", timeout=60_000)
            expect(figure).to_have_attribute("src", re.compile(r"^(blob|data):"))
            assert "keys 0–63 of 1000" in readout.inner_text()
            src = figure.get_attribute("src")
            marks["explorer cell ran"] = time.monotonic()

            handle = cell.locator(".flashdecode-tile .noUi-handle")
            handle.focus()
            for tile in range(2, N_TILES + 1):
                page.keyboard.press("ArrowRight")
                expect(readout).to_contain_text(f"tile {tile} of {N_TILES}")  # the kernel saw the new tile
                expect(figure).not_to_have_attribute("src", src)  # and the figure was redrawn
                src = figure.get_attribute("src")
                assert f"tile {tile} of {N_TILES}" in handle.evaluate("h => h.closest('.jp-OutputArea').innerText")
            text = readout.inner_text()
            assert "keys 960–999 of 1000" in text
            assert "all 1000 keys seen: partial output == exact output" in text
            page.keyboard.press("ArrowLeft")  # and back one tile
            expect(readout).to_contain_text(f"tile {N_TILES - 1} of {N_TILES}")
            assert "==" not in readout.inner_text()
            page.keyboard.press("ArrowRight")
            expect(readout).to_contain_text("partial output == exact output")
            expect(figure).not_to_have_attribute("src", src)

            marks[f"{N_TILES} keyboard steps"] = time.monotonic()
            page.keyboard.press("Home")  # back to tile 1 ...
            expect(readout).to_contain_text(f"tile 1 of {N_TILES}")
            cell.locator(".widget-play button").first.click()  # ... and press play
            expect(readout).to_contain_text(f"tile {N_TILES} of {N_TILES}", timeout=40_000)
            expect(readout).to_contain_text("partial output == exact output")
            marks["play to the end"] = time.monotonic()

            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            cell.screenshot(path=str(SCREENSHOT))
        except BaseException:
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            failure = SCREENSHOT.with_name("failure.png")
            page.screenshot(path=str(failure))
            with capsys.disabled():
                print(
                    f"\n[browser] FAILED; page screenshot: {failure}\n[browser] JupyterLab log (tail):\n"
                    f"{log_path.read_text()[-2000:]}"
                )
            raise
        finally:
            browser.close()
    elapsed, last, phases = time.monotonic() - started, started, []
    for name, mark in marks.items():
        phases.append(f"{name} {mark - last:.1f} s")
        last = mark
    with capsys.disabled():
        print(
            f"\n[browser] JupyterLab up in {server_seconds:.1f} s; in Chromium: {'; '.join(phases)}; "
            f"{elapsed:.1f} s in the browser\n[browser] screenshot: {SCREENSHOT}"
        )
    assert SCREENSHOT.stat().st_size > 10_000
    assert "Traceback" not in log_path.read_text()
