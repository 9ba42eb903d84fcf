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
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lab(work: Path, runs: Path) -> tuple[subprocess.Popen, str]:
    port, token = free_port(), secrets.token_hex(16)
    for plugin, name, data in (("docmanager-extension", "plugin", {"autosave": False}),
                               ("apputils-extension", "notification", {"fetchNews": "false",
                                                                        "checkForUpdates": False})):
        d = work / "settings" / "@jupyterlab" / plugin
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{name}.jupyterlab-settings").write_text(json.dumps(data))
    env = {**os.environ, "LABKIT_RUNS": str(runs), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "JUPYTERLAB_SETTINGS_DIR": str(work / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(work / "ws"),
           "JUPYTER_RUNTIME_DIR": str(work / "runtime")}
    lab = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={REPO}",
         *(["--allow-root"] if os.geteuid() == 0 else [])],
        cwd=REPO, env=env, stdout=(work / "lab.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if lab.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with code {lab.returncode}; see {work / 'lab.log'}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2)
            return lab, f"http://127.0.0.1:{port}/lab?token={token}"
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("JupyterLab did not answer")


def open_notebook(page, name: str) -> None:
    page.locator(".jp-BreadCrumbs-home").first.click()
    page.locator(".jp-DirListing-item", has_text="notebooks").first.dblclick()
    page.locator(".jp-DirListing-item", has_text=name).first.dblclick()
    page.wait_for_selector(f".lm-TabBar-tab:has-text('{name}')", timeout=30_000)
    dialog = page.locator(".jp-Dialog", has_text="Select Kernel")
    try:
        dialog.wait_for(timeout=5_000)
        dialog.locator("button", has_text="Select").click()
    except Exception:  # noqa: BLE001 - no dialog: the kernel started by itself
        pass
    idle(page)


def idle(page, timeout: float = 120) -> None:
    page.wait_for_timeout(500)
    page.locator(".jp-StatusBar-Widget", has_text=re.compile(r"\|\s*Idle")).first.wait_for(timeout=timeout * 1000)


def run_all(page) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    ap.add_argument("--out", default=str(REPO / "docs"))
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    from labkit.launch import Run
    from labkit.report import build_reports, report_run

    out = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix="labkit-shots-"))
    runs = work / "runs"
    originals = {p: p.read_bytes() for p in (REPO / "notebooks").glob("*.ipynb")}
    lab, url = start_lab(work, runs)
    try:
        with sync_playwright() as pw:
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
        os.killpg(lab.pid, 15)
        try:
            lab.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(lab.pid, 9)
        from labkit.launch import runs as all_runs

        for run in all_runs(runs):
            if run.is_alive():
                run.kill(grace=2)
        for p, data in originals.items():
            if p.read_bytes() != data:
                p.write_bytes(data)
                print(f"warning: {p} was rewritten by the session; restored", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
