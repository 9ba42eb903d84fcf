"""The lab as a new user meets it: JupyterLab in headless Chromium, the real notebooks, real clicks.

JupyterLab is started on 127.0.0.1 with a token, its root dir the project, and its kernels in
notebooks/ (JupyterLab's default). Runs go to a temporary $LABKIT_RUNS; autosave is off, so the
shipped notebooks are never rewritten. Needs Debian's chromium (`apt-get install chromium`, done by
.ci/run) and the `playwright` package (dev extra); no browser download.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from jupyterlab_driver import CHROMIUM, CHROMIUM_FLAGS, ROOT, lab_session, open_notebook, run_all, wait_idle

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


def no_script_errors(page) -> None:
    text = page.locator("body").inner_text()
    assert "Error loading script" not in text
    assert "Error loading script" not in page.content()


@pytest.fixture
def lab(tmp_path, tiny_dir):
    originals = {p: p.read_bytes() for p in (ROOT / "notebooks").glob("*.ipynb")}
    runs = tmp_path / "runs"
    try:
        with lab_session(tmp_path, runs) as url:
            yield url, runs
    finally:
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
