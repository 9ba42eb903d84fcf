"""Screenshots of the notebook panels in a real JupyterLab: docs/configurator.png and docs/monitor.png.

Starts JupyterLab on 127.0.0.1 in a temporary directory, opens a notebook that shows a Configurator
for a tiny CPU run, clicks its Launch button and waits for the run to finish, then screenshots the
Configurator and the Monitor it opened, with headless Chromium driven by playwright.

    python docs/make_screenshots.py [--chromium /usr/bin/chromium] [--out docs]

Needs `pip install playwright` and a Chromium binary (`apt-get install chromium`); no browser download.
"""

from __future__ import annotations

import argparse
import json
import os
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

SETUP = """\
from labkit.config import RunConfig
from labkit.widgets import Configurator

base = RunConfig(name="demo-lr3e-3", model="tiny", datasets=["skills"], effective_batch_size=16,
                 max_tokens_per_device=1024, max_seq_len=256, learning_rate=3e-3, schedule="cosine",
                 warmup_steps=5, max_steps=40, runs_root={runs!r}, distributed={{"cpu": True}})
panel = Configurator(base)
panel"""


def notebook(runs: Path) -> dict:
    cell = {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
            "source": SETUP.format(runs=str(runs))}
    return {"cells": [cell], "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                          "language": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with code {server.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"JupyterLab did not answer at {url}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    ap.add_argument("--out", default=str(REPO / "docs"))
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    from labkit.launch import Run

    work = Path(tempfile.mkdtemp(prefix="labkit-shots-"))
    runs = work / "runs"
    (work / "panels.ipynb").write_text(json.dumps(notebook(runs)))
    settings = work / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "JUPYTERLAB_SETTINGS_DIR": str(work / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(work / "ws"),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    lab = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}", "--LabApp.expose_app_in_browser=True",
         *(["--allow-root"] if os.geteuid() == 0 else [])],
        cwd=REPO, env=env, stdout=(work / "lab.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    out = Path(args.out)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/status?token={token}", lab)
        with sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(
                str(work / "chromium-profile"), executable_path=args.chromium, args=CHROMIUM_FLAGS,
                headless=True, viewport={"width": 1400, "height": 1000}, device_scale_factor=1)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/lab/tree/panels.ipynb?token={token}")
            page.wait_for_selector(".jp-Notebook", timeout=120_000)
            page.wait_for_function("window.jupyterapp && window.jupyterapp.shell.currentWidget "
                                   "&& window.jupyterapp.shell.currentWidget.sessionContext?.session?.kernel",
                                   timeout=120_000)
            # Single-document mode hides the file browser and other panes: only the notebook is shown.
            page.evaluate("window.jupyterapp.commands.execute('application:set-mode', {mode: 'single-document'})")
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
            panel = page.locator(".labkit-configurator")
            panel.wait_for(timeout=120_000)
            page.locator(".labkit-configurator .vega-embed").first.wait_for(timeout=60_000)
            time.sleep(2)
            panel.screenshot(path=str(out / "configurator.png"))

            panel.locator("button:has-text('Launch')").click()
            monitor = page.locator(".labkit-monitor")
            monitor.wait_for(timeout=60_000)
            run = Run(runs / "demo-lr3e-3")
            status = run.wait(timeout=600)
            time.sleep(6)  # the monitor polls every 2 s
            monitor.scroll_into_view_if_needed()
            monitor.screenshot(path=str(out / "monitor.png"))
            browser.close()
        print(f"run {status['state']} at step {status.get('step')}; wrote {out / 'configurator.png'} "
              f"and {out / 'monitor.png'}")
    finally:
        lab.terminate()
        try:
            lab.wait(timeout=20)
        except subprocess.TimeoutExpired:
            lab.kill()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
