"""Run names are never reused by deleting: the one rule for the CLI, the configurator, `launch()` and sweeps.

When a config names a run directory that already holds a run, the caller chooses:

* `resume`: continue it (from its newest checkpoint);
* `overwrite`: start over; the old run is moved aside to `RUNS/.trash/NAME-YYYYmmdd-HHMMSS/`, not
  deleted (delete that folder yourself once you are sure);
* neither: `on_exists="rename"` picks the next free name (`demo-2`, `demo-3`, ...), as the
  configurator does; `on_exists="refuse"` raises `RunExistsError` naming both ways forward, as the
  CLI and `labkit.launch.launch()` do.

A live run is never touched.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import Literal

from labkit import runfiles
from labkit.config import ConfigError, RunConfig

TRASH = ".trash"
RUN_FILES = ("config.yaml", runfiles.STATUS, runfiles.METRICS, "checkpoints", "final")


class RunExistsError(ConfigError):
    """The run's directory already holds a run, and neither resume nor overwrite was asked for."""


def holds_run(run_dir: Path) -> bool:
    """Whether a directory holds (part of) a run; a folder with only a sweep's report.ipynb does not."""
    return any((Path(run_dir) / f).exists() for f in RUN_FILES)


def unique_name(runs_root: str | Path, name: str) -> str:
    """`name` if free under `runs_root`, else `name-2`, `name-3`, ... (the first free one)."""
    root = Path(runs_root)
    if not holds_run(root / name):
        return name
    stem = re.sub(r"-\d+$", "", name) or name
    n = 2
    while holds_run(root / f"{stem}-{n}") or (root / f"{stem}-{n}").exists():
        n += 1
    return f"{stem}-{n}"[:128]


def trash(run_dir: str | Path) -> Path:
    """Move a run directory to RUNS/.trash/NAME-TIME/ and return its new place (never deletes)."""
    run_dir = Path(run_dir)
    bin_ = run_dir.parent / TRASH
    bin_.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = bin_ / f"{run_dir.name}-{stamp}"
    n = 2
    while dest.exists():
        dest = bin_ / f"{run_dir.name}-{stamp}-{n}"
        n += 1
    shutil.move(str(run_dir), str(dest))
    return dest


def _is_alive(run_dir: Path) -> bool:
    from labkit.launch import Run  # launch imports this module

    return Run(run_dir).is_alive()


def claim_run_dir(cfg: RunConfig, resume: bool = False, overwrite: bool = False,
                  on_exists: Literal["refuse", "rename"] = "refuse") -> RunConfig:
    """The config to start: `cfg` itself, `cfg` with `resume=True`, or `cfg` renamed to a free name.

    With `overwrite`, an old run in the way is moved to RUNS/.trash/ first. Raises `RunExistsError`
    (refuse), or ConfigError when the old run is still live or both resume and overwrite are given.
    """
    resume = resume or cfg.resume
    if resume and overwrite:
        raise ConfigError(f"run {cfg.name!r}: give resume or overwrite, not both")
    run_dir = cfg.run_dir
    if not holds_run(run_dir):
        return cfg
    if _is_alive(run_dir):
        if on_exists == "rename" and not resume and not overwrite:
            return cfg.with_updates(name=unique_name(cfg.runs_root, cfg.name))  # leave the live run alone
        state = runfiles.read_status(run_dir).get("state") or "live"
        raise ConfigError(f"{run_dir}: run {cfg.name!r} is still {state}; stop it first (labkit stop {cfg.name})")
    if resume:
        return cfg if cfg.resume else cfg.with_updates(resume=True)
    if overwrite:
        trash(run_dir)
        return cfg
    if on_exists == "rename":
        return cfg.with_updates(name=unique_name(cfg.runs_root, cfg.name))
    state = runfiles.read_status(run_dir).get("state") or "previous"
    raise RunExistsError(
        f"{run_dir}: a {state} run is already there; pick another name, set resume=True (--resume) to "
        f"continue it, or overwrite=True (--overwrite) to start over (the old run is moved to "
        f"{run_dir.parent / TRASH}/, not deleted)")
