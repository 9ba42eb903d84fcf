"""The files a trainer writes into its run directory (see docs/run-dir.md).

Only plain files: any number of notebooks can read them while the run trains, without locks.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

STATUS = "status.json"
METRICS = "metrics.jsonl"
STOP = "STOP"
FINAL_STATES = ("finished", "stopped", "failed")

# Matched with fullmatch: `$` in re.match would also accept a name ending in a newline.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# What labkit itself keeps directly under a runs root (the store's catalog and its lock/WAL, the
# report index, sweep and study folders): a run of that name would collide with them.
RESERVED_NAMES = frozenset({"lab.duckdb", "lab.duckdb.wal", "lab.duckdb.lock", "index.html", "sweeps", "study"})
RESERVED_PREFIXES = ("lab.duckdb.",)  # lab.duckdb.broken-TIME: a corrupt catalog kept aside


def name_problem(name: str) -> str | None:
    """Why `name` cannot name a run directory under a runs root, or None when it can."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or ".." in name:
        return (f"{name!r} is not a safe run name: use letters, digits, '.', '_' and '-' "
                "(no '/', no '..', no whitespace, at most 128 characters, starting with a letter or digit)")
    if name.lower() in RESERVED_NAMES or name.lower().startswith(RESERVED_PREFIXES):
        return (f"{name!r} is reserved: labkit keeps its own files under that name in the runs root "
                f"(reserved: {', '.join(sorted(RESERVED_NAMES))}, lab.duckdb.*)")
    return None


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Replace `path` with `data` as JSON in one rename: readers see the old file or the new one.
    The temp name is unique, so threads and processes writing the same file never share one."""
    fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=f".{Path(path).name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(data, indent=1, default=str))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a checkpoint is complete once renamed into place)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / "checkpoint.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, or {} while it is missing, unreadable or not an object (never raises)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def read_status(run_dir: Path) -> dict[str, Any]:
    return read_json(Path(run_dir) / STATUS)


def request_stop(run_dir: Path, reason: str) -> None:
    """Ask a trainer to save a checkpoint and stop; written whole, so it never reads a half reason."""
    path = Path(run_dir) / STOP
    tmp = path.with_name(f".{STOP}.{os.getpid()}.tmp")
    tmp.write_text(reason.rstrip("\n") + "\n")
    os.replace(tmp, path)


def finite_number(v: Any) -> float | None:
    """v as a float when it is a real finite number (not a bool, not NaN/inf, not a string), else None."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def update_status(run_dir: Path, **fields: Any) -> dict[str, Any]:
    status = read_status(run_dir)
    status.update(fields, updated_at=time.time())
    write_json_atomic(Path(run_dir) / STATUS, status)
    return status


def _clean(value: Any) -> Any:
    # JSON has no NaN/inf; null keeps every line parseable by DuckDB and pandas.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """Appends one JSON line per optimizer step and flushes it, so readers see it at once."""

    def __init__(self, run_dir: Path, truncate_after_step: int | None = None):
        self.path = Path(run_dir) / METRICS
        if truncate_after_step is not None:
            self._truncate(truncate_after_step)
        self._fh = self.path.open("a", encoding="utf-8")

    def _truncate(self, last_step: int) -> None:
        """Drop rows past a resumed checkpoint, and a torn last line, so no step appears twice."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("step", math.inf) <= last_step:
                kept.append(line + "\n")
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, row: dict[str, Any]) -> None:
        self._fh.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Rows of a (possibly live) run: torn lines skipped, the newest row kept per step."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]
