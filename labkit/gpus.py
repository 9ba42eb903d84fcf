"""GPU slots on one node: which GPUs a local run may use, and who waits for them.

Every local run that needs GPUs asks `place()` for them. The source of truth is the run directories
themselves: a live run's `launcher.json` records the GPUs it was given (`gpus`), a queued run's
records how many it waits for (`gpus_needed`, `queued_at`). Nothing is kept in memory, so a notebook
restart, a second notebook or a `labkit run` in a shell all see the same assignment, and a run whose
processes are gone (finished, stopped, killed with -9: see labkit.liveness) holds nothing. Decisions
are made under a lock file in the runs root, so two launchers never hand out the same GPU; runs of
different runs roots on one node do not see each other (give them one runs root, or split the GPUs
with LABKIT_GPUS).

Policy: first come, first served, with backfill: queued runs are considered oldest first, and each
one that fits in the GPUs still free gets the lowest-numbered of them, so a 1-GPU run may start
while a 4-GPU run ahead of it waits for more (as Slurm's backfill does). A sweep is finite, so the
big run starts at the latest when the small ones are done.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labkit import liveness, runfiles

GPUS_ENV = "LABKIT_GPUS"
LOCK = ".labkit-gpus.lock"


def node_gpus() -> list[str]:
    """GPU ids runs on this node may use: LABKIT_GPUS (`0,1,2,3`; empty: none), else
    CUDA_VISIBLE_DEVICES, else every GPU `nvidia-smi` lists, else none."""
    for var in (GPUS_ENV, "CUDA_VISIBLE_DEVICES"):
        value = os.environ.get(var)
        if value is not None:
            return [g.strip() for g in value.split(",") if g.strip()]
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def gpus_needed(num_processes: int, num_machines: int, cpu: bool, gpus: list[str] | None = None) -> int:
    """GPUs a run needs on each of its nodes: one per process (`num_processes` is the total over all
    machines, as in accelerate); 0 for CPU runs, which share the cores."""
    if cpu:
        return 0
    gpus = node_gpus() if gpus is None else gpus
    return num_processes // num_machines if gpus else 0


@contextmanager
def locked(runs_root: Path) -> Iterator[None]:
    """The runs root's scheduling lock (a flock, released when its holder dies)."""
    runs_root.mkdir(parents=True, exist_ok=True)
    with (runs_root / LOCK).open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass
class Snapshot:
    held: dict[str, list[str]]  # live run -> its GPUs
    queue: list[tuple[float, str, int]]  # (queued_at, run, GPUs needed), oldest first


def snapshot(runs_root: Path, exclude: str | None = None) -> Snapshot:
    """Who holds which GPU on this host, and who waits, from the run dirs (dead runs hold nothing)."""
    held: dict[str, list[str]] = {}
    queue = []
    host = socket.gethostname()
    liveness.rescan()  # decisions under the lock see the processes as they are now
    for path in sorted(runs_root.glob(f"*/{liveness.LAUNCHER}")):
        name = path.parent.name
        info = runfiles.read_json(path)
        if name == exclude or info.get("backend", "local") != "local" or info.get("host") != host:
            continue
        if not (info.get("gpus") or info.get("gpus_needed")):
            continue
        if not liveness.alive(path.parent, info):
            continue
        if info.get("gpus"):
            held[name] = [str(g) for g in info["gpus"]]
        else:
            queue.append((float(info.get("queued_at") or 0), name, int(info["gpus_needed"])))
    return Snapshot(held, sorted(queue))


def plan(gpus: list[str], held: dict[str, list[str]], queue: list[tuple[float, str, int]]) -> dict[str, list[str]]:
    """GPUs for each queued run that can start now (see the module docstring for the policy)."""
    busy = {g for owned in held.values() for g in owned}
    free = [g for g in gpus if g not in busy]
    out = {}
    for _, name, n in queue:
        if n <= len(free):
            out[name], free = free[:n], free[n:]
    return out


def _reason(n: int, gpus: list[str], snap: Snapshot, name: str) -> str:
    busy = {g for owned in snap.held.values() for g in owned}
    free = [g for g in gpus if g not in busy]
    holders = ", ".join(f"{r} has {','.join(g)}" for r, g in sorted(snap.held.items()))
    ahead = sum(1 for _, other, _ in snap.queue if other != name)
    text = f"waiting for {n} GPU{'s' if n > 1 else ''}: {len(free)} of {len(gpus)} free"
    if holders:
        text += f" ({holders})"
    if ahead:
        text += f"; {ahead} other run{'s' if ahead > 1 else ''} queued"
    return text


@dataclass
class Placement:
    gpus: list[str] | None  # given now, or None: queued
    reason: str | None = None  # why it waits


def place(run_dir: Path, n: int, queued_at: float, start: Callable[[list[str]], Any],
          queue: Callable[[str], Any] | None = None, gpus: list[str] | None = None) -> Placement:
    """Give the run in `run_dir` `n` GPUs if the policy lets it start now.

    Under the runs root's lock: `start(gpus)` when it may start (it must record the GPUs in the
    run's launcher.json before returning), else `queue(reason)` (which records `gpus_needed` and
    `queued_at` there, so later decisions see the run waiting).
    """
    run_dir = Path(run_dir)
    gpus = node_gpus() if gpus is None else gpus
    if n > len(gpus):
        raise ValueError(f"{run_dir.name}: needs {n} GPUs per node, this node has {len(gpus)} "
                         f"({','.join(gpus) or 'none'}; set {GPUS_ENV} or CUDA_VISIBLE_DEVICES)")
    with locked(run_dir.parent):
        snap = snapshot(run_dir.parent, exclude=run_dir.name)
        snap.queue = sorted([*snap.queue, (queued_at, run_dir.name, n)])
        given = plan(gpus, snap.held, snap.queue).get(run_dir.name)
        if given is not None:
            start(given)
            return Placement(given)
        reason = _reason(n, gpus, snap, run_dir.name)
        if queue is not None:
            queue(reason)
        return Placement(None, reason)


def usage(runs_root: str | Path) -> dict[str, Any]:
    """The node's GPUs, who holds them and who waits (for the Board and `labkit ls`)."""
    gpus = node_gpus()
    snap = snapshot(Path(runs_root))
    owner = {g: r for r, owned in snap.held.items() for g in owned}
    return {"gpus": gpus, "owner": {g: owner.get(g) for g in gpus},
            "queued": [{"run": r, "gpus_needed": n, "queued_at": t} for t, r, n in snap.queue]}
