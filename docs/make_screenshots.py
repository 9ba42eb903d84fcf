"""Screenshots of the real notebooks in a real JupyterLab and of the real HTML reports.

Starts JupyterLab on 127.0.0.1 over the project (runs in a temporary $LABKIT_RUNS, autosave off so
the shipped notebooks are not rewritten), and with headless Chromium driven by playwright:

1. opens `notebooks/01_run.ipynb` from the file browser and runs all cells: `configurator.png`;
   while the demo run trains: `monitor.png`; the form's learning rate is changed and Launch pressed
   for a second run (it gets the next free name, `demo-2`);
2. opens `notebooks/05_lab.ipynb`, runs it and overlays both runs: `board.png`;
3. `labkit report` for the runs, then opens `RUNS/index.html` and `RUNS/demo/report.html` from disk:
   `report-index.png`, `report-run.png`.

    python docs/make_screenshots.py [--chromium /usr/bin/chromium] [--out docs]

Needs the `playwright` package (dev extra) and Debian's chromium; no browser download.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the JupyterLab driver tests/test_browser.py uses

from jupyterlab_driver import CHROMIUM, CHROMIUM_FLAGS, lab_session, open_notebook, run_all  # noqa: E402
from jupyterlab_driver import wait_idle as idle  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chromium", default=CHROMIUM)
    ap.add_argument("--out", default=str(REPO / "docs"))
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    from labkit.launch import Run
    from labkit.report import build_reports, report_run

    out = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix="labkit-shots-"))
    runs = work / "runs"
    originals = {p: p.read_bytes() for p in (REPO / "notebooks").glob("*.ipynb")}
    try:
        with lab_session(work, runs) as url, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(120_000)
            page.goto(url)
            page.wait_for_selector(".jp-DirListing-item")

            open_notebook(page, "01_run.ipynb")
            run_all(page)
            form = page.locator(".labkit-configurator").first
            monitor = form.locator(".labkit-monitor").first
            monitor.wait_for()
            idle(page)
            deadline = time.time() + 300
            while (Run(runs / "demo").status().get("step") or 0) < int(os.environ.get("SHOT_STEP", 60)) \
                    and time.time() < deadline:
                time.sleep(1)
            time.sleep(3)  # the monitor polls every 2 s
            form.scroll_into_view_if_needed()
            form.locator(".widget-hbox").first.screenshot(path=str(out / "configurator.png"))
            monitor.scroll_into_view_if_needed()
            monitor.screenshot(path=str(out / "monitor.png"))
            # A second run from the same form: same name, so it becomes demo-2 (the first run is kept).
            lr = form.locator(".widget-text", has_text="learning rate").locator("input").first
            lr.fill("0.01")
            lr.press("Enter")
            form.locator("button", has_text="Launch").click()
            try:
                form.locator(".widget-html", has_text="launched as").first.wait_for(timeout=60_000)
            except Exception:
                page.screenshot(path=str(work.parent / "labkit-shots-failure.png"), full_page=True)
                raise
            for name in ("demo", "demo-2"):
                Run(runs / name).wait(timeout=900)

            open_notebook(page, "05_lab.ipynb")
            run_all(page)
            board = page.locator(".labkit-board").first
            board.locator(".labkit-runs-table table", has_text="demo-2").first.wait_for()
            page.wait_for_function("() => [...document.querySelectorAll('.labkit-board .vega-embed')]"
                                   ".some(e => e.querySelector('canvas, svg'))")
            time.sleep(2)
            board.scroll_into_view_if_needed()
            board.screenshot(path=str(out / "board.png"))

            for name in ("demo", "demo-2"):
                report_run(runs / name)
            index = build_reports(runs)
            page.goto(index.resolve().as_uri())
            page.wait_for_selector("table.labkit-runs")
            page.screenshot(path=str(out / "report-index.png"), full_page=True)
            page.goto((runs / "demo" / "report.html").resolve().as_uri())
            page.wait_for_function("() => document.querySelector('.labkit-chart canvas, .labkit-chart svg')")
            time.sleep(1)
            page.screenshot(path=str(out / "report-run.png"), full_page=False)
            browser.close()
        print("wrote " + ", ".join(str(out / n) for n in ("configurator.png", "monitor.png", "board.png",
                                                            "report-index.png", "report-run.png")))
    finally:
        for p, data in originals.items():
            if p.read_bytes() != data:
                p.write_bytes(data)
                print(f"warning: {p} was rewritten by the session; restored", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
