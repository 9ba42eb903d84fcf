"""JupyterLab over this project, driven in Debian's headless Chromium through playwright.

Used by tests/test_browser.py and docs/make_screenshots.py, so the screenshots show what the test
checks. JupyterLab listens on 127.0.0.1 with a token, its root dir the project and its kernels in
notebooks/ (JupyterLab's default); runs go to the given $LABKIT_RUNS; autosave is off, so the
shipped notebooks are never rewritten; news and update checks are off (no internet here).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from labkit.launch import free_port

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
SETTINGS = {("docmanager-extension", "plugin"): {"autosave": False},
            ("apputils-extension", "notification"): {"fetchNews": "false", "checkForUpdates": False}}


def start_lab(work: Path, runs: Path, timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """JupyterLab on a free port, its files under `work`; returns the process and the /lab URL with its token."""
    port, token = free_port(), secrets.token_hex(16)
    for (plugin, name), data in SETTINGS.items():
        d = work / "settings" / "@jupyterlab" / plugin
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{name}.jupyterlab-settings").write_text(json.dumps(data))
    env = {**os.environ, "LABKIT_RUNS": str(runs), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "JUPYTERLAB_SETTINGS_DIR": str(work / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(work / "ws"),
           "JUPYTER_RUNTIME_DIR": str(work / "runtime")}
    log = work / "lab.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={ROOT}",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         *(["--allow-root"] if os.geteuid() == 0 else [])],
        cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with code {server.returncode}: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            return server, f"{url}/lab?token={token}"
        except OSError:
            time.sleep(0.5)
    stop_lab(server)
    raise TimeoutError(f"JupyterLab did not answer within {timeout:.0f} s; see {log}")


def stop_lab(server: subprocess.Popen) -> None:
    os.killpg(server.pid, 15)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, 9)


@contextmanager
def lab_session(work: Path, runs: Path) -> Iterator[str]:
    """JupyterLab while the block runs; afterwards no run it launched is left alive. Yields the URL."""
    server, url = start_lab(work, runs)
    try:
        yield url
    finally:
        stop_lab(server)
        from labkit.launch import runs as all_runs

        for run in all_runs(runs):
            if run.is_alive():
                run.kill(grace=2)


def open_notebook(page, name: str, timeout: float = 60) -> None:
    """Open notebooks/NAME from the file browser, as a user would, and wait for its kernel."""
    page.locator(".jp-BreadCrumbs-home").first.click()
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
    wait_idle(page, timeout)


def run_all(page) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()


def wait_idle(page, timeout: float = 120) -> None:
    """Until the current notebook's kernel is idle (the status bar follows the notebook in front)."""
    page.wait_for_timeout(500)
    page.locator(".jp-StatusBar-Widget", has_text=re.compile(r"\|\s*Idle")).first.wait_for(timeout=timeout * 1000)
