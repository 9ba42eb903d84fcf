"""Cache entries built once per node, however many processes ask for them at the same time.

A cache entry is a directory. It is complete when it holds the marker file, which the builder
writes last, inside a private temp directory that is then renamed into place, so a reader sees
either no entry or a whole one. An entry without the marker (a build killed half way, or one made
by an older labkit that wrote no marker) is incomplete: it is moved aside and rebuilt.

Builders serialise on an exclusive `fcntl.flock` on a lock file next to the entry: the first
process builds, the others block on the lock, then find the marker and read. flock locks die with
their process, so a killed builder never leaves the others waiting, and they are per node (on a
local disk), which is what ranks sharing a node need.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

MARKER = ".labkit-complete"


def is_complete(entry: Path) -> bool:
    """Whether `entry` is a finished cache entry (its completion marker exists)."""
    return (Path(entry) / MARKER).is_file()


def _discard(entry: Path) -> None:
    # Rename first: a half-removed entry must never look like a directory being built into.
    if entry.exists() or entry.is_symlink():
        aside = entry.parent / f".stale-{entry.name}-{os.getpid()}-{time.monotonic_ns()}"
        os.rename(entry, aside)
        shutil.rmtree(aside, ignore_errors=True)


def build_once(entry: str | Path, build: Callable[[Path], None]) -> bool:
    """Make sure the cache directory `entry` exists and is complete; True if this process built it.

    `build(tmp)` fills an empty temp directory (on the same file system as `entry`); it runs at
    most once at a time per entry. An exception from it leaves no entry behind and propagates;
    the next process waiting on the lock then tries for itself.
    """
    entry = Path(entry)
    if is_complete(entry):
        return False
    entry.parent.mkdir(parents=True, exist_ok=True)
    lock = entry.parent / f".{entry.name}.lock"
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes, or when this process dies
        if is_complete(entry):
            return False  # another process built it while this one waited
        _discard(entry)
        for leftover in entry.parent.glob(f".tmp-{entry.name}-*"):
            shutil.rmtree(leftover, ignore_errors=True)  # holding the lock: only dead builders leave these
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
        try:
            build(tmp)
            (tmp / MARKER).write_text(json.dumps({"pid": os.getpid(), "built_at": time.time()}))
            os.rename(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return True
