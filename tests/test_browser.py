"""The lab as a new user meets it: JupyterLab in headless Chromium, the real notebooks, real clicks.

JupyterLab is started on 127.0.0.1 with a token, its root dir the project, and its kernels in
notebooks/ (JupyterLab's default). Runs go to a temporary $LABKIT_RUNS; autosave is off, so the
shipped notebooks are never rewritten. Needs Debian's chromium (`apt-get install chromium`, done by
.ci/run) and the `playwright` package (dev extra); no browser download.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]

try:
    import playwright.sync_api  # noqa: F401
except ImportError:
    playwright_missing = "the playwright package is not installed (pip install -e '.[dev]')"
else:
    playwright_missing = ""

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM, reason="no chromium on PATH (apt-get install chromium; .ci/run does)"),
    pytest.mark.skipif(bool(playwright_missing), reason=playwright_missing or "-"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lab(work: Path, runs: Path) -> tuple[subprocess.Popen, str]:
    """JupyterLab over the project on a free port; returns the process and the /lab URL with its token."""
    port, token = free_port(), secrets.token_hex(16)
    settings = work / "settings" / "@jupyterlab" / "docmanager-extension"
    settings.mkdir(parents=True)
    (settings / "plugin.jupyterlab-settings").write_text(json.dumps({"autosave": False}))
    notes = work / "settings" / "@jupyterlab" / "apputils-extension"
    notes.mkdir(parents=True)
    (notes / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false",
                                                                         "checkForUpdates": False}))
    env = {**os.environ, "LABKIT_RUNS": str(runs), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "JUPYTERLAB_SETTINGS_DIR": str(work / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(work / "ws"),
           "JUPYTER_RUNTIME_DIR": str(work / "runtime")}
    log = (work / "lab.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={ROOT}",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         *(["--allow-root"] if os.geteuid() == 0 else [])],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"JupyterLab exited: {(work / 'lab.log').read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            return server, f"{url}/lab?token={token}"
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("JupyterLab did not answer within 90 s")


def open_notebook(page, name: str) -> None:
    """Open notebooks/NAME from the file browser, as a user would."""
    page.locator(".jp-DirListing-item", has_text="notebooks").first.dblclick()
    page.locator(".jp-DirListing-item", has_text=name).first.dblclick()
    page.wait_for_selector(f".lm-TabBar-tab:has-text('{name}')", timeout=30_000)
    # JupyterLab may ask which kernel to start; its default is the notebook's own (python3).
    dialog = page.locator(".jp-Dialog", has_text="Select Kernel")
    try:
        dialog.wait_for(timeout=5_000)
        dialog.locator("button", has_text="Select").click()
    except Exception:  # noqa: BLE001 - no dialog: the kernel started by itself
        pass
    wait_idle(page, 60)


def run_all(page) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()


def wait_idle(page, timeout: float) -> None:
    """Until the current notebook's kernel is idle (the status bar follows the notebook in front)."""
    page.wait_for_timeout(500)
    page.locator(".jp-StatusBar-Widget", has_text=re.compile(r"\|\s*Idle")).first.wait_for(timeout=timeout * 1000)


def no_script_errors(page) -> None:
    text = page.locator("body").inner_text()
    assert "Error loading script" not in text
    assert "Error loading script" not in page.content()


@pytest.fixture
def lab(tmp_path, tiny_dir):
    originals = {p: p.read_bytes() for p in (ROOT / "notebooks").glob("*.ipynb")}
    runs = tmp_path / "runs"
    server, url = start_lab(tmp_path, runs)
    try:
        yield url, runs
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
        from labkit.launch import runs as all_runs

        for run in all_runs(runs):
            if run.is_alive():
                run.kill(grace=2)
        for p, data in originals.items():  # autosave is off; this only guards against a regression
            assert p.read_bytes() == data, f"{p} was rewritten by the browser session"
        shutil.rmtree(ROOT / "notebooks" / ".ipynb_checkpoints", ignore_errors=True)


def test_run_stop_evaluate_and_the_lab_board_in_jupyterlab(lab):
    from playwright.sync_api import sync_playwright

    url, runs = lab
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        try:
            session(page, url, runs)
        except Exception:
            shot = Path(os.environ.get("LABKIT_BROWSER_SHOT", runs.parent / "failure.png"))
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}\n" + page.locator("body").inner_text()[-3000:])
            raise
        finally:
            browser.close()


def session(page, url: str, runs: Path) -> None:
    """The user's steps: 01_run (launch, watch, stop, evaluate), then the lab board."""
    page.goto(url)
    page.wait_for_selector(".jp-DirListing-item", timeout=90_000)

    # 01_run: run every cell; the launch cell returns at once and the form's monitor follows the run.
    open_notebook(page, "01_run.ipynb")
    run_all(page)
    monitor = page.locator(".labkit-monitor").first
    monitor.wait_for(timeout=90_000)
    wait_idle(page, 90)  # the kernel is free while the run trains
    assert page.locator(".labkit-monitor").count() == 1  # one monitor per run
    label = monitor.locator(".widget-label", has_text="samples, step").first
    page.wait_for_function(
        "el => /^[1-9][0-9]*\\//.test(el.textContent)", arg=label.element_handle(), timeout=120_000)
    first = label.inner_text()
    page.wait_for_function("([el, t]) => el.textContent !== t", arg=[label.element_handle(), first],
                           timeout=60_000)  # the monitor moves

    t0 = time.time()
    monitor.locator("button", has_text="Stop").click()
    monitor.locator(".widget-html", has_text="stopped").first.wait_for(timeout=60_000)
    stopped_after = time.time() - t0
    assert stopped_after < 30, f"the run took {stopped_after:.0f}s to stop"
    print(f"stopped {stopped_after:.1f}s after the click")
    status = json.loads((runs / "demo" / "status.json").read_text())
    assert status["state"] == "stopped" and status["step"] < status["total_steps"]

    # The Evaluate cell, run again, evaluates the stopped run's checkpoint.
    cell = page.locator(".jp-Cell", has_text="from labkit.evaluate import evaluate").first
    cell.locator(".jp-InputArea-editor").click()
    page.keyboard.press("Shift+Enter")
    cell.locator(".jp-OutputArea-output", has_text="labkit_knowledge_mc").first.wait_for(timeout=180_000)
    assert list((runs / "demo" / "evals").glob("*.json"))
    no_script_errors(page)

    # 05_lab: the runs table and an overlaid chart of the run.
    page.locator(".jp-BreadCrumbs-home").first.click()
    open_notebook(page, "05_lab.ipynb")
    run_all(page)
    board = page.locator(".labkit-board").first
    board.wait_for(timeout=90_000)
    board.locator(".labkit-runs-table table", has_text="demo").first.wait_for(timeout=60_000)
    board.locator(".vega-embed").first.wait_for(timeout=60_000)
    page.wait_for_function(
        "() => [...document.querySelectorAll('.labkit-board .vega-embed')].some("
        "e => e.querySelector('canvas, svg'))", timeout=60_000)
    assert "stopped" in board.locator(".labkit-runs-table").inner_text()
    no_script_errors(page)
