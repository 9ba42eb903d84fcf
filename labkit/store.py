"""The run store: SQL over every run under a runs root, from a DuckDB catalog or from the live files.

Trainers only ever append plain files (docs/run-dir.md). This module reads them two ways:

* The catalog, `ROOT/lab.duckdb`. `Store.sync()` ingests run directories incrementally: per
  `metrics.jsonl` it remembers how many bytes it has read, reads only new complete lines (a torn
  last line is read on a later sync, once complete), and re-ingests a run from scratch when its file
  shrank, was replaced (a resume truncates it) or was edited in place (the file changed without
  growing, or a fingerprint of sampled bytes of the part already read differs). Newest row per
  (run, step) wins. A run whose status.json says running/pending but whose processes are gone is
  stored as failed (`labkit.launch.Run.status`), and re-checked at every sync. Columnar tables
  answer queries over a million rows in tens of milliseconds, so every query method reads the
  catalog by default, after an incremental sync (`auto_sync=True`) that costs a few `stat` calls
  when nothing changed: results are as fresh as the files.
* Live views, `Store.live()`: an in-memory DuckDB connection whose `metrics` / `runs` / `evals`
  views read the files themselves at query time. Always current, no locks, no writes, but each
  query parses the JSONL again (~1 s per million rows). Pass `live=True` to any query method to use
  them: for a widget polling one live run, or where the catalog cannot be written.

Concurrency. DuckDB lets one process open a database read-write *or* many open it read-only, never
both, and an open fails at once rather than waiting. So nobody keeps `lab.duckdb` open: `sync()`
opens it read-write only for the ingest, holding an exclusive `fcntl.flock` on `lab.duckdb.lock`,
and each query opens it read-only for its duration under a shared lock on the same file. Any number
of notebooks, sweeps and CLI calls may sync and query at once: they wait for each other briefly
(up to `lock_timeout` seconds) instead of failing. A sync is one transaction: a crash leaves the
catalog as it was. Trainers never touch the database, so a slow notebook can never stall training.

The catalog is only a cache of the run files. A `lab.duckdb` that cannot be read (truncated, not a
DuckDB file, a bad block) is moved aside to `lab.duckdb.broken-TIME` and rebuilt from the files,
with one warning line on stderr. Each Store reads every table once, at its first sync, so a bad block
is found there rather than in a later query (~0.1-0.2 s per million metric rows).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import yaml

from labkit import liveness, runfiles
from labkit.config import ConfigError, from_dict

SCHEMA_VERSION = "2"
CONFIG = "config.yaml"
EVALS = "evals"
# A metrics file's fingerprint: its first 4 KiB and 32 windows of 64 bytes spread over what was read, the
# last one ending where reading stopped. An edit that changes a line's length shifts the last window; a
# same-length edit is caught by the size rule (_appended_to) unless the file also grew before the next sync
# and the edit missed every window. Hashing all of it would cost a full read per sync of every live run.
FP_HEAD, FP_WINDOW, FP_WINDOWS = 4096, 64, 32
LIVE_STATES = ("running", "pending")
DEFAULT_PROBE_STEPS = 100

# metrics.jsonl fields (docs/run-dir.md) and their column types.
METRIC_COLUMNS: dict[str, str] = {
    "step": "BIGINT", "phase": "INTEGER", "epoch": "DOUBLE", "samples": "BIGINT", "tokens": "BIGINT",
    "loss_tokens": "BIGINT", "loss": "DOUBLE", "grad_norm": "DOUBLE", "lr": "DOUBLE",
    "tokens_per_s": "DOUBLE", "samples_per_s": "DOUBLE", "step_time": "DOUBLE",
    "packing_efficiency": "DOUBLE", "peak_mem_mb": "DOUBLE", "time": "DOUBLE", "ts": "DOUBLE",
    "val_loss": "DOUBLE",
}
X_AXES = ("step", "samples", "tokens", "time")
EVAL_COLUMNS = {"run_id": "VARCHAR", "step": "BIGINT", "samples": "BIGINT", "task": "VARCHAR",
                "metric": "VARCHAR", "value": "DOUBLE", "stderr": "DOUBLE"}
# Leading `runs` columns from status.json (and metrics); config fields follow, flattened.
META_TYPES = {"run_id": "string", "status": "string", "started_at": "Float64", "updated_at": "Float64",
              "ended_at": "Float64", "stop_reason": "string", "error": "string", "total_steps": "Int64",
              "total_samples": "Int64", "status_step": "Int64", "status_samples": "Int64",
              "config_error": "string"}
EARLY_SIGNALS = ("grad_norm_mean", "grad_norm_median", "loss_mean", "loss_median", "early_score")
LOWER_IS_BETTER = re.compile(r"perplexity|ppl|bits_per|loss", re.I)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS _meta (key VARCHAR, value VARCHAR);
CREATE TABLE IF NOT EXISTS _files (path VARCHAR, run_id VARCHAR, kind VARCHAR, ino UBIGINT, size BIGINT,
                                   mtime_ns BIGINT, done BIGINT, fp BLOB);
CREATE TABLE IF NOT EXISTS _run_meta (run_id VARCHAR, meta VARCHAR);
CREATE TABLE IF NOT EXISTS metrics (run_id VARCHAR, {", ".join(f"{k} {t}" for k, t in METRIC_COLUMNS.items())});
CREATE TABLE IF NOT EXISTS evals ({", ".join(f"{k} {t}" for k, t in EVAL_COLUMNS.items())});
"""

_RUNS_SQL = """
SELECT m.run_id, m.status, m.started_at, m.updated_at, m.ended_at, m.stop_reason, m.error, m.total_steps,
       coalesce(a.last_step, m.status_step) AS last_step, coalesce(a.samples, m.status_samples) AS samples,
       m.total_samples, m.config_error,
       m.* EXCLUDE (run_id, status, started_at, updated_at, ended_at, stop_reason, error, total_steps,
                    total_samples, status_step, status_samples, config_error)
FROM _run_meta_flat m
LEFT JOIN (SELECT run_id, max(step) AS last_step, max(samples) AS samples FROM metrics GROUP BY run_id) a
       USING (run_id)
ORDER BY m.started_at NULLS LAST, m.run_id
"""


class StoreError(RuntimeError):
    """The catalog cannot be opened or a query cannot run; the message says why."""


class _Unreadable(Exception):
    """The catalog file is broken (truncated, not DuckDB, a bad block): a cache to rebuild."""


def _held_elsewhere(err: BaseException) -> bool:
    return "Could not set lock" in str(err) or "Conflicting lock" in str(err)


def _read_every_table(con: duckdb.DuckDBPyConnection) -> None:
    """Read every row of every table, so DuckDB checks every block's checksum; raises on a bad one."""
    for (name,) in con.execute("SELECT table_name FROM duckdb_tables() WHERE NOT temporary").fetchall():
        con.execute(f"SELECT count(*), sum(hash({_q(name)})) FROM {_q(name)}").fetchall()


def _fingerprint(fh: Any, n: int) -> bytes:
    """Hash of windows spread over the first `n` bytes of the open file (its last window included)."""
    h = hashlib.blake2b(digest_size=16)
    if n <= 0:
        return h.digest()
    fh.seek(0)
    h.update(fh.read(min(FP_HEAD, n)))
    offsets = sorted({min(max(0, n * k // (FP_WINDOWS - 1) - FP_WINDOW // 2), max(0, n - FP_WINDOW))
                      for k in range(FP_WINDOWS)})
    for off in offsets:
        fh.seek(off)
        h.update(fh.read(min(FP_WINDOW, n - off)))
    return h.digest()


def _appended_to(fh: Any, st: Any, prev: _FileState) -> bool:
    """Whether the file still holds the bytes read before, with only new bytes after them."""
    if st.st_ino != prev.ino or st.st_size < prev.done:
        return False  # replaced (a resume rewrites it) or shrank
    if st.st_size == prev.size:
        return False  # changed without growing: an edit, since a trainer only appends
    return _fingerprint(fh, prev.done) == prev.fp


@dataclass
class _FileState:
    run_id: str
    kind: str
    ino: int
    size: int
    mtime_ns: int
    done: int = 0
    fp: bytes = b""  # _fingerprint of the first `done` bytes


@dataclass
class _Plan:
    """What one sync will change."""

    removed: list[str]  # run directories that are gone
    reset: list[str] = field(default_factory=list)  # runs whose metrics are re-read from byte 0
    chunks: list[tuple[str, str]] = field(default_factory=list)  # (temp file of new lines, run_id)
    files: dict[str, _FileState | None] = field(default_factory=dict)  # new state of changed files (None: gone)
    meta_runs: list[str] = field(default_factory=list)
    eval_runs: list[str] = field(default_factory=list)


def _q(name: str) -> str:
    """A quoted SQL identifier (config columns have dots: "distributed.num_processes")."""
    return '"' + name.replace('"', '""') + '"'


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _columns_struct(cols: dict[str, str]) -> str:
    return "{" + ", ".join(f"{_lit(k)}: {_lit(t)}" for k, t in cols.items()) + "}"


def _clean_metrics_select(prefix: str = "") -> str:
    # JSON has no NaN, but a hand-written or foreign file may: store non-finite as NULL, as runfiles does.
    parts = []
    for k, t in METRIC_COLUMNS.items():
        col = f"{prefix}{k}"
        parts.append(f"CASE WHEN isfinite({col}) THEN {col} END AS {k}" if t == "DOUBLE" else f"{col} AS {k}")
    return ", ".join(parts)


def _as_list(ids: str | Sequence[str] | None) -> list[str] | None:
    if ids is None:
        return None
    return [ids] if isinstance(ids, str) else list(ids)


@contextmanager
def _locked(path: Path, exclusive: bool, timeout: float) -> Iterator[None]:
    """Hold `path` locked (exclusive for writers, shared for readers), waiting up to `timeout` s."""
    fh = open(path, "a+")  # noqa: SIM115 - closed in finally; closing releases the lock
    try:
        mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, mode)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{path}: still locked after {timeout:.0f} s by another labkit process "
                        f"({'syncing' if not exclusive else 'syncing or querying'} the catalog)"
                    ) from None
                time.sleep(0.02)
        yield
    finally:
        fh.close()


def _meta_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Run metadata rows as a frame with stable, DuckDB-friendly column types."""
    names = list(META_TYPES) + [k for r in rows for k in r if k not in META_TYPES]
    names = list(dict.fromkeys(names))
    out = {}
    for name in names:
        values = [r.get(name) for r in rows]
        kinds = {type(v) for v in values if v is not None}
        dtype = META_TYPES.get(name)
        if dtype == "Float64":  # status.json is written by hand sometimes: a bad value is no value
            values = [runfiles.finite_number(v) for v in values]
        elif dtype == "Int64":
            values = [None if (f := runfiles.finite_number(v)) is None or not f.is_integer() else int(f) for v in values]
        elif dtype is None:
            dtype = ("boolean" if kinds == {bool} else "Int64" if kinds == {int}
                     else "Float64" if kinds and kinds <= {int, float} else "string")
        if dtype == "string":
            values = [None if v is None else str(v) for v in values]
        out[name] = pd.array(values, dtype=dtype)
    return pd.DataFrame(out, columns=names)


def read_run_meta(run_dir: Path) -> dict[str, Any]:
    """One `runs` row before metrics are joined: status.json fields and the flattened config."""
    status = runfiles.read_status(run_dir)
    row: dict[str, Any] = {
        "run_id": run_dir.name, "status": status.get("state"), "started_at": status.get("started_at"),
        "updated_at": status.get("updated_at"), "ended_at": status.get("ended_at"),
        "stop_reason": status.get("stop_reason"), "error": status.get("error"),
        "total_steps": status.get("total_steps"), "total_samples": status.get("total_samples"),
        "status_step": status.get("step"), "status_samples": status.get("samples"), "config_error": None,
    }
    if (run_dir / CONFIG).exists():
        try:
            flat = _load_config(run_dir / CONFIG).flat()
        except ConfigError as e:
            row["config_error"] = str(e)
        else:
            row.update({k: v for k, v in flat.items() if k not in row})
    return row


def _load_config(path: Path) -> Any:
    # libyaml when present: the pure-Python parser would spend ~10 ms per run, seconds per sweep.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        data = yaml.load(path.read_text(), Loader=loader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a run config must be a YAML mapping, got {type(data).__name__}")
    return from_dict(data, source=str(path))


def read_eval_file(path: Path) -> list[dict[str, Any]]:
    """Rows of one `evals/STEP.json` (written by labkit.evaluate); raises ValueError naming the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON: {e}") from None
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, list):
        raise ValueError(f"{path}: expected an object with a 'results' list")
    step = data.get("step", path.stem)
    if not isinstance(step, int) and not (isinstance(step, str) and step.isdigit()):
        raise ValueError(f"{path}: 'step' must be an integer, got {step!r}")
    samples = data.get("samples")
    rows = []
    for i, r in enumerate(results):
        if not isinstance(r, dict) or not {"task", "metric", "value"} <= set(r):
            raise ValueError(f"{path}: results[{i}] needs 'task', 'metric' and 'value'")
        if not isinstance(r["value"], int | float):
            raise ValueError(f"{path}: results[{i}].value must be a number, got {r['value']!r}")
        rows.append({"run_id": path.parent.parent.name, "step": int(step),
                     "samples": samples if isinstance(samples, int) else None, "task": str(r["task"]),
                     "metric": str(r["metric"]), "value": runfiles.finite_number(r["value"]),
                     "stderr": runfiles.finite_number(r.get("stderr"))})  # lm-eval writes "N/A" when it has none
    return rows


def _eval_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    dtypes = {"VARCHAR": "string", "BIGINT": "Int64", "DOUBLE": "Float64"}
    return pd.DataFrame({c: pd.array([r[c] for r in rows], dtype=dtypes[t]) for c, t in EVAL_COLUMNS.items()})


def _spearman(a: pd.Series, b: pd.Series) -> float:
    ok = a.notna() & b.notna()
    if ok.sum() < 3:
        return float("nan")
    ra, rb = a[ok].rank(), b[ok].rank()
    if ra.nunique() < 2 or rb.nunique() < 2:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


class Store:
    """Every run under `root`: `sync()` into the catalog, then query with the methods below."""

    def __init__(self, root: str | Path = "runs", db: str | Path | None = None, auto_sync: bool = True,
                 lock_timeout: float = 120.0):
        self.root = Path(root)
        self.db = Path(db) if db is not None else self.root / "lab.duckdb"
        self.lock = self.db.with_name(self.db.name + ".lock")
        self.auto_sync = auto_sync
        self.lock_timeout = lock_timeout
        self._meta_cache: dict[Path, tuple[tuple, dict[str, Any]]] = {}
        self._verified = False  # every table read once without error by this Store

    def __repr__(self) -> str:
        return f"Store(root={str(self.root)!r}, db={str(self.db)!r})"

    # -- files -------------------------------------------------------------------------------------

    def run_dirs(self) -> dict[str, Path]:
        """Run directories under the root: any folder with a config, a status or metrics."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"runs root {str(self.root)!r} does not exist")
        found = {}
        for d in sorted(self.root.iterdir()):
            if d.is_dir() and not d.name.startswith(".") and any(
                    (d / f).exists() for f in (CONFIG, runfiles.STATUS, runfiles.METRICS)):
                found[d.name] = d
        return found

    def _meta(self, run_dir: Path) -> dict[str, Any]:
        key = tuple(_stat_key(run_dir / f) for f in (CONFIG, runfiles.STATUS))
        hit = self._meta_cache.get(run_dir)
        if hit is None or hit[0] != key:
            hit = (key, read_run_meta(run_dir))
            self._meta_cache[run_dir] = hit
        meta = hit[1]
        if meta["status"] in LIVE_STATES:
            # status.json of a killed trainer says running forever: ask its processes (cheap signal-0 probes).
            live = liveness.effective_status(run_dir)
            if live.get("state") != meta["status"]:
                meta = {**meta, "status": live.get("state"), "error": live.get("error")}
        return meta

    # -- catalog -----------------------------------------------------------------------------------

    def _connect(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        """A connection to the catalog; StoreError when another program holds it, _Unreadable when broken."""
        try:
            return duckdb.connect(str(self.db), read_only=read_only)
        except duckdb.Error as e:
            if _held_elsewhere(e):
                raise StoreError(
                    f"{self.db}: cannot open ({e}). labkit opens it only briefly behind {self.lock.name}; "
                    "another program (a DuckDB shell?) probably holds it open: close it, or use live=True."
                ) from None
            raise _Unreadable(str(e)) from e

    def _unreadable(self, err: BaseException) -> bool:
        """Whether `err`, raised while using the catalog, comes from a broken file (not a bug or a lock)."""
        if isinstance(err, _Unreadable):
            return True
        if not isinstance(err, duckdb.Error) or _held_elsewhere(err) or not self.db.exists():
            return False
        try:
            con = duckdb.connect(str(self.db), read_only=True)
        except duckdb.Error as e:
            return not _held_elsewhere(e)
        try:
            _read_every_table(con)
        except duckdb.Error:
            return True
        finally:
            con.close()
        return False

    def _set_aside(self, err: BaseException) -> Path:
        """Move the broken catalog (and its WAL) aside, keeping it for inspection; one warning line."""
        aside = self.db.with_name(f"{self.db.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while aside.exists():
            n += 1
            aside = aside.with_name(f"{self.db.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        self.db.replace(aside)
        wal = self.db.with_name(self.db.name + ".wal")
        if wal.exists():
            wal.replace(aside.with_name(aside.name + ".wal"))
        why = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        print(f"labkit: warning: the run catalog {self.db} was unreadable ({why}); moved it to {aside.name} "
              "and rebuilt it from the run files", file=sys.stderr, flush=True)
        return aside

    def sync(self) -> dict[str, Any]:
        """Ingest new and changed run files into the catalog; returns what changed."""
        t0 = time.perf_counter()
        self.run_dirs()  # fails clearly on a missing root before any lock file is made
        self.db.parent.mkdir(parents=True, exist_ok=True)
        aside = None
        with _locked(self.lock, True, self.lock_timeout), tempfile.TemporaryDirectory(prefix="labkit-sync-") as tmp:
            runs = self.run_dirs()
            for attempt in range(2):
                try:
                    # A fresh folder per attempt: chunks of a failed one must not be ingested.
                    result = self._sync_once(runs, Path(tmp) / str(attempt))
                    break
                except (duckdb.Error, _Unreadable) as e:
                    if aside is not None or not self._unreadable(e):
                        raise
                    aside = self._set_aside(e)  # then rebuild from the files, once
        result["seconds"] = round(time.perf_counter() - t0, 4)
        if aside is not None:
            result["recovered"] = str(aside)
        return result

    def _sync_once(self, runs: dict[str, Path], tmp: Path) -> dict[str, Any]:
        tmp.mkdir()
        con = self._connect(read_only=False)
        try:
            if not self._verified:
                _read_every_table(con)  # a bad block surfaces here, where it can be repaired
            known = self._prepare(con)
            states = dict(con.execute("SELECT run_id, json_extract_string(meta, '$.status') FROM _run_meta")
                          .fetchall())
            plan = self._plan(runs, known, tmp, states)
            result = self._apply(con, runs, plan)
        finally:
            con.close()
        self._verified = True
        return result

    @staticmethod
    def _prepare(con: duckdb.DuckDBPyConnection) -> dict[str, _FileState]:
        """Create or migrate the schema; the ingest state of every file seen before."""
        con.execute(_SCHEMA)
        version = con.execute("SELECT value FROM _meta WHERE key = 'schema'").fetchone()
        if version is None or version[0] != SCHEMA_VERSION:
            # Another layout: rebuild from the files, which are the source of truth.
            con.execute("DROP TABLE IF EXISTS metrics; DROP TABLE IF EXISTS evals; DROP TABLE IF EXISTS runs;"
                        "DROP TABLE _files; DROP TABLE _run_meta; DELETE FROM _meta;")
            con.execute(_SCHEMA)
            con.execute("INSERT INTO _meta VALUES ('schema', ?)", [SCHEMA_VERSION])
        rows = con.execute("SELECT path, run_id, kind, ino, size, mtime_ns, done, fp FROM _files").fetchall()
        return {path: _FileState(*rest, fp=bytes(fp or b"")) for path, *rest, fp in rows}

    def _plan(self, runs: dict[str, Path], known: dict[str, _FileState], tmp: Path,
              states: dict[str, str | None] | None = None) -> _Plan:
        """Compare the files with what was ingested; new metric lines are copied to `tmp`.

        `states` are the stored run states: a run stored as running/pending is re-read when its
        liveness changed (a dead trainer changes no file)."""
        states = states or {}
        plan = _Plan(removed=sorted({s.run_id for s in known.values()} - set(runs)))
        known_runs = {s.run_id for s in known.values()}
        for run_id, d in runs.items():
            p = d / runfiles.METRICS
            prev = known.get(str(p))
            chunk = tmp / f"{len(plan.chunks)}.jsonl"
            planned = self._plan_metrics(p, run_id, prev, chunk)
            if planned is None and prev is not None:  # metrics.jsonl was deleted
                plan.reset.append(run_id)
                plan.files[str(p)] = None
            elif planned is not None and planned[0] is not prev:
                state, from_scratch = planned
                plan.files[str(p)] = state
                if from_scratch and prev is not None and prev.done:
                    plan.reset.append(run_id)
                if chunk.exists():
                    plan.chunks.append((str(chunk), run_id))
            # Small files: compare stats, re-read the kind that changed.
            now = {str(f): _FileState(run_id, kind, *_stat_key(f))
                   for kind, paths in (("config", [d / CONFIG]), ("status", [d / runfiles.STATUS]),
                                       ("eval", sorted((d / EVALS).glob("*.json"))))
                   for f in paths if f.exists()}
            before = {k: v for k, v in known.items() if v.run_id == run_id and v.kind != "metrics"}
            changed = {k for k in now.keys() | before.keys()
                       if k not in now or k not in before or _stat_of(now[k]) != _stat_of(before[k])}
            kinds = {(now.get(k) or before[k]).kind for k in changed}
            if kinds & {"config", "status"} or run_id not in known_runs or (
                    states.get(run_id) in LIVE_STATES and self._meta(d)["status"] != states[run_id]):
                plan.meta_runs.append(run_id)
            if "eval" in kinds:
                plan.eval_runs.append(run_id)
            plan.files.update({k: now.get(k) for k in changed})
        return plan

    def _apply(self, con: duckdb.DuckDBPyConnection, runs: dict[str, Path], plan: _Plan) -> dict[str, Any]:
        """Write the plan in one transaction: a crash or error leaves the catalog as it was."""
        errors: list[str] = []
        rows = n_evals = 0
        con.begin()
        try:
            if plan.removed:
                for table in ("metrics", "evals", "_run_meta", "_files"):
                    con.execute(f"DELETE FROM {table} WHERE list_contains(?, run_id)", [plan.removed])
            if plan.reset:
                con.execute("DELETE FROM metrics WHERE list_contains(?, run_id)", [plan.reset])
            if plan.chunks:
                rows = self._ingest_metrics(con, plan.chunks)
            if plan.eval_runs:
                n_evals = self._ingest_evals(con, runs, plan.eval_runs, errors)
            if plan.meta_runs:
                metas = [self._meta(runs[r]) for r in plan.meta_runs]
                errors += [f"{runs[m['run_id']] / CONFIG}: {m['config_error']}" for m in metas if m["config_error"]]
                con.execute("DELETE FROM _run_meta WHERE list_contains(?, run_id)", [plan.meta_runs])
                con.register("_meta_rows", pd.DataFrame({"run_id": plan.meta_runs,
                                                         "meta": [json.dumps(m) for m in metas]}))
                con.execute("INSERT INTO _run_meta SELECT * FROM _meta_rows")
            if plan.files:
                con.execute("DELETE FROM _files WHERE list_contains(?, path)", [list(plan.files)])
                now = [(k, s.run_id, s.kind, s.ino, s.size, s.mtime_ns, s.done, s.fp)
                       for k, s in plan.files.items() if s is not None]
                if now:
                    con.register("_file_rows", pd.DataFrame(now, columns=[
                        "path", "run_id", "kind", "ino", "size", "mtime_ns", "done", "fp"]))
                    con.execute("INSERT INTO _files SELECT * FROM _file_rows")
            has_runs = con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'runs'").fetchone()[0]
            if plan.files or plan.removed or plan.meta_runs or not has_runs:
                metas = [json.loads(m) for (m,) in con.execute("SELECT meta FROM _run_meta").fetchall()]
                con.register("_run_meta_flat", _meta_frame(metas))
                con.execute(f"CREATE OR REPLACE TABLE runs AS {_RUNS_SQL}")
            con.commit()
        except BaseException:
            con.rollback()
            raise
        return {"runs": len(runs), "rows": rows, "reingested": sorted(set(plan.reset)), "removed": plan.removed,
                "meta": len(plan.meta_runs), "evals": n_evals, "errors": errors}

    @staticmethod
    def _plan_metrics(path: Path, run_id: str, prev: _FileState | None,
                      out: Path) -> tuple[_FileState, bool] | None:
        """New complete lines of `path` since `prev`, written to `out`; (new state, read from byte 0)."""
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if prev is not None and (prev.ino, prev.size, prev.mtime_ns) == key:
            return prev, False
        with path.open("rb") as fh:
            # Continue where we stopped only when the file is the one read before, grown by appends.
            start = prev.done if prev is not None and _appended_to(fh, st, prev) else 0
            fh.seek(start)
            data = fh.read(st.st_size - start)
            cut = data.rfind(b"\n") + 1  # bytes up to the last complete line
            if cut:
                out.write_bytes(data[:cut])
            done = start + cut
            fp = _fingerprint(fh, done)
        return _FileState(run_id, "metrics", *key, done=done, fp=fp), start == 0

    @staticmethod
    def _ingest_metrics(con: duckdb.DuckDBPyConnection, chunks: list[tuple[str, str]]) -> int:
        con.register("_plan", pd.DataFrame({"file": [f for f, _ in chunks], "run_id": [r for _, r in chunks]}))
        files = "[" + ", ".join(_lit(f) for f, _ in chunks) + "]"
        # One parallel scan of every new chunk (ordinality keeps the line order within each file).
        con.execute(f"""
            CREATE TEMP TABLE _new AS
            SELECT p.run_id, j.ordinality AS _line, {_clean_metrics_select("j.")}
            FROM read_ndjson({files}, columns={_columns_struct(METRIC_COLUMNS)}, ignore_errors=true,
                             filename=true) WITH ORDINALITY AS j
            JOIN _plan p ON j.filename = p.file
            WHERE j.step IS NOT NULL
        """)
        # A resume re-logs steps: the last line of a step wins. Checking first skips the sort when none repeat.
        if con.execute("SELECT count(*) > count(DISTINCT (run_id, step)) FROM _new").fetchone()[0]:
            con.execute("CREATE OR REPLACE TEMP TABLE _new AS SELECT * FROM _new "
                        "QUALIFY row_number() OVER (PARTITION BY run_id, step ORDER BY _line DESC) = 1")
        con.execute("DELETE FROM metrics USING _new WHERE metrics.run_id = _new.run_id AND metrics.step = _new.step")
        con.execute("INSERT INTO metrics BY NAME SELECT * EXCLUDE (_line) FROM _new")
        n = con.execute("SELECT count(*) FROM _new").fetchone()[0]
        con.execute("DROP TABLE _new")
        return n

    @staticmethod
    def _ingest_evals(con: duckdb.DuckDBPyConnection, runs: dict[str, Path], eval_runs: list[str],
                      errors: list[str]) -> int:
        rows = []
        for run_id in eval_runs:
            for f in sorted((runs[run_id] / EVALS).glob("*.json")):
                try:
                    rows += read_eval_file(f)
                except ValueError as e:
                    errors.append(str(e))
        con.execute("DELETE FROM evals WHERE list_contains(?, run_id)", [eval_runs])
        con.register("_eval_rows", _eval_frame(rows))
        con.execute("INSERT INTO evals BY NAME SELECT * FROM _eval_rows")
        return len(rows)

    @contextmanager
    def catalog(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection to the catalog, for your own SQL (tables runs, metrics, evals).

        Syncs first (when `auto_sync`); holds the shared lock while open, so keep the block short.
        """
        if self.auto_sync:
            self.sync()
        elif not self.db.exists():
            raise StoreError(f"{self.db}: no catalog yet; call Store.sync() first, or query with live=True")
        for attempt in range(2):
            with _locked(self.lock, False, self.lock_timeout):
                try:
                    con = self._connect(read_only=True)
                except _Unreadable as e:
                    if attempt:
                        raise StoreError(f"{self.db}: cannot read the catalog ({e}); query with live=True") from None
                    con = None
                if con is not None:
                    try:
                        yield con
                    finally:
                        con.close()
                    return
            self.sync()  # without the shared lock: sets the broken file aside and rebuilds it

    # -- live views --------------------------------------------------------------------------------

    def live(self) -> duckdb.DuckDBPyConnection:
        """An in-memory connection with views `metrics`, `runs`, `evals` over the run files themselves.

        `metrics` re-reads every metrics.jsonl at each query, so polling it shows training progress;
        `runs` (status, config) and `evals` are read once, by this call. No locks, no catalog.
        """
        runs = self.run_dirs()
        con = duckdb.connect()
        root = str(self.root).rstrip("/")
        metric_files = [d / runfiles.METRICS for d in runs.values() if (d / runfiles.METRICS).exists()]
        if metric_files:
            con.execute(f"""
                CREATE VIEW metrics AS
                SELECT regexp_extract(filename, '([^/]+)/metrics\\.jsonl$', 1) AS run_id,
                       {_clean_metrics_select("j.")}
                FROM read_ndjson({_lit(root + "/*/" + runfiles.METRICS)}, columns={_columns_struct(METRIC_COLUMNS)},
                                 union_by_name=true, ignore_errors=true, filename=true) WITH ORDINALITY AS j
                WHERE j.step IS NOT NULL AND run_id NOT LIKE '.%'
                QUALIFY row_number() OVER (PARTITION BY filename, j.step ORDER BY j.ordinality DESC) = 1
            """)
        else:
            con.execute("CREATE VIEW metrics AS SELECT NULL::VARCHAR AS run_id, "
                        + ", ".join(f"NULL::{t} AS {k}" for k, t in METRIC_COLUMNS.items()) + " WHERE false")
        # Eval files are small, few and may be pretty-printed (not NDJSON), so they are parsed here;
        # a half-written one is skipped until it is complete.
        evals = []
        for d in runs.values():
            for f in sorted((d / EVALS).glob("*.json")):
                try:
                    evals += read_eval_file(f)
                except ValueError:
                    pass
        con.register("evals", _eval_frame(evals))
        con.register("_run_meta_flat", _meta_frame([self._meta(d) for d in runs.values()]))
        con.execute(f"CREATE VIEW runs AS {_RUNS_SQL}")
        return con

    @contextmanager
    def _reader(self, live: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        if live:
            con = self.live()
            try:
                yield con
            finally:
                con.close()
        else:
            with self.catalog() as con:
                yield con

    def sql(self, query: str, params: Any = None, live: bool = False) -> pd.DataFrame:
        """Run your own SQL over `runs`, `metrics` and `evals`; returns a DataFrame."""
        with self._reader(live) as con:
            return con.execute(query, params).df()

    # -- queries -----------------------------------------------------------------------------------

    @staticmethod
    def _check_runs(con: duckdb.DuckDBPyConnection, ids: list[str] | None) -> None:
        if ids is None:
            return
        have = {r for (r,) in con.execute("SELECT run_id FROM runs").fetchall()}
        missing = [r for r in ids if r not in have]
        if missing:
            raise KeyError(f"no run(s) named {', '.join(map(repr, missing))} in the store "
                           f"({len(have)} runs: {', '.join(sorted(have)[:10])}{' ...' if len(have) > 10 else ''})")

    @staticmethod
    def _check_run_columns(con: duckdb.DuckDBPyConnection, names: Sequence[str]) -> None:
        have = [r[0] for r in con.execute("DESCRIBE runs").fetchall()]
        bad = [n for n in names if n not in have]
        if bad:
            raise KeyError(f"runs table has no column(s) {', '.join(map(repr, bad))}; it has: {', '.join(have)}")

    def runs_table(self, filter_sql: str | None = None, live: bool = False) -> pd.DataFrame:
        """Runs with config columns, loss summaries and the best eval per task ("TASK/METRIC" columns).

        `filter_sql` is a WHERE clause over these columns, e.g.
        `"learning_rate >= 1e-5 AND status = 'finished'"` (quote dotted names: `"distributed.num_processes"`).
        """
        with self._reader(live) as con:
            df = con.execute("""
                SELECT r.*, s.* EXCLUDE (run_id) FROM runs r LEFT JOIN (
                    SELECT run_id, arg_max(loss, step) AS last_loss, min(loss) AS min_loss,
                           arg_max(val_loss, step) FILTER (WHERE val_loss IS NOT NULL) AS last_val_loss,
                           min(val_loss) AS min_val_loss
                    FROM metrics GROUP BY run_id) s USING (run_id)
            """).df()
            best = con.execute("SELECT run_id, task, metric, max(value) AS hi, min(value) AS lo "
                               "FROM evals GROUP BY ALL").df()
            if len(best):
                best["col"] = best["task"] + "/" + best["metric"]
                best["best"] = np.where(best["metric"].str.contains(LOWER_IS_BETTER), best["lo"], best["hi"])
                wide = best.pivot(index="run_id", columns="col", values="best").reset_index()
                wide.columns.name = None
                df = df.merge(wide, how="left", on="run_id")
            if filter_sql:
                con.register("_runs_table", df)
                try:
                    df = con.execute(f"SELECT * FROM _runs_table WHERE {filter_sql}").df()
                except duckdb.Error as e:
                    raise ValueError(f"filter_sql {filter_sql!r}: {e}") from None
        return df

    def metrics(self, run_ids: str | Sequence[str] | None = None, x: str = "step",
                columns: str | Sequence[str] = ("loss", "grad_norm"), max_points: int = 1500,
                smooth: float | None = None, color_by: str | None = None, live: bool = False) -> pd.DataFrame:
        """Curves of `columns` against `x`, at most `max_points` rows per run.

        Longer runs are cut into `max_points` equal-width buckets of `x` and averaged in SQL. `smooth`
        is an EMA weight alpha in (0, 1] on the newest point (smaller is smoother), applied to the raw
        rows before downsampling. `color_by` adds a runs-table column (e.g. "learning_rate").
        """
        ids = _as_list(run_ids)
        cols = [columns] if isinstance(columns, str) else list(columns)
        if x not in X_AXES:
            raise ValueError(f"x={x!r}: choose one of {', '.join(X_AXES)}")
        bad = [c for c in cols if c not in METRIC_COLUMNS]
        if bad:
            raise ValueError(f"unknown metric column(s) {bad}; metrics has: {', '.join(METRIC_COLUMNS)}")
        if max_points < 2:
            raise ValueError(f"max_points={max_points}: need at least 2")
        if smooth is not None and not 0 < smooth <= 1:
            raise ValueError(f"smooth={smooth}: the EMA alpha must be in (0, 1]")
        cols = [c for c in dict.fromkeys(cols) if c != x]
        where = f"{x} IS NOT NULL" + (" AND list_contains($ids, run_id)" if ids is not None else "")
        params: dict[str, Any] = {"ids": ids} if ids is not None else {}
        with self._reader(live) as con:
            self._check_runs(con, ids)
            if color_by:
                self._check_run_columns(con, [color_by])
            source = "metrics"
            if smooth is not None:
                raw = con.execute(f"SELECT run_id, {x}, {', '.join(cols)} FROM metrics WHERE {where} "
                                  f"ORDER BY run_id, {x}", params).df()
                raw[cols] = raw.groupby("run_id")[cols].transform(lambda s: s.ewm(alpha=smooth).mean())
                con.register("_smoothed", raw)
                source, where, params = "_smoothed", "true", {}
            params["budget"] = max_points
            avg = ", ".join(f"avg({c}) AS {c}" for c in cols)
            color = f", any_value(r.{_q(color_by)}) AS {_q(color_by)}" if color_by else ""
            join = "LEFT JOIN runs r USING (run_id)" if color_by else ""
            df = con.execute(f"""
                WITH m AS (SELECT run_id, {x} AS _x, {", ".join(cols) or "1 AS _one"} FROM {source} WHERE {where}),
                b AS (SELECT *, count(*) OVER w AS _n, min(_x) OVER w AS _lo, max(_x) OVER w AS _hi,
                             row_number() OVER (PARTITION BY run_id ORDER BY _x) AS _rn
                      FROM m WINDOW w AS (PARTITION BY run_id)),
                k AS (SELECT *, CASE WHEN _n <= $budget THEN _rn
                             ELSE least($budget - 1, coalesce(floor((_x - _lo) / nullif(_hi - _lo, 0) * $budget), 0))
                             END AS _bucket FROM b)
                SELECT k.run_id, avg(_x) AS {x}{", " + avg if avg else ""}{color}
                FROM k {join} GROUP BY k.run_id, _bucket ORDER BY k.run_id, {x}
            """, params).df()
        return df

    def early_dynamics(self, first_steps: int | None = None, first_samples: int | None = None,
                       runs: str | Sequence[str] | None = None,
                       score: str | Callable[[pd.DataFrame], Any] = "paper",
                       include: Sequence[str] = (), live: bool = False) -> pd.DataFrame:
        """Per run: grad norm and loss over its first N steps (or S samples), with an early score and rank.

        The paper's finding: among runs of one sweep, lower early gradient norm and higher early loss
        predict better final models. `score="paper"` is
        `percent_rank(-grad_norm_mean) + percent_rank(loss_mean)` over the runs returned (0..2, higher is
        better); a string is any SQL expression over the columns below; a callable gets the frame and
        returns the scores. Runs with a non-finite loss or grad norm in the window get no score and rank
        last; `complete` is False for runs that have not reached the window's end yet. Defaults to the
        first 100 steps. `include` adds runs-table columns (e.g. "learning_rate").
        """
        if first_steps is not None and first_samples is not None:
            raise ValueError("give first_steps or first_samples, not both")
        axis, budget = ("samples", first_samples) if first_samples is not None else \
            ("step", first_steps if first_steps is not None else DEFAULT_PROBE_STEPS)
        if budget < 1:
            raise ValueError(f"the probe budget must be >= 1, got {budget}")
        ids = _as_list(runs)
        params: dict[str, Any] = {"budget": budget}
        where = ""
        if ids is not None:
            where, params["ids"] = "WHERE list_contains($ids, run_id)", ids
        base = f"""
            WITH m AS (SELECT run_id, step, samples, loss, grad_norm FROM metrics {where}),
            reach AS (SELECT run_id, max({axis}) AS reached FROM m GROUP BY run_id),
            agg AS (SELECT run_id, count(*) AS n_steps, max(step) AS last_step, max(samples) AS last_samples,
                           avg(grad_norm) AS grad_norm_mean, median(grad_norm) AS grad_norm_median,
                           avg(loss) AS loss_mean, median(loss) AS loss_median,
                           count(*) FILTER (WHERE loss IS NULL OR grad_norm IS NULL) AS n_nonfinite
                    FROM m WHERE {axis} <= $budget GROUP BY run_id)
            SELECT agg.*, reach.reached, coalesce(reach.reached >= $budget, false) AS complete
            FROM agg JOIN reach USING (run_id)
        """
        if score == "paper":
            expr = ("CASE WHEN _ok THEN percent_rank() OVER (PARTITION BY _ok ORDER BY grad_norm_mean DESC)"
                    " + percent_rank() OVER (PARTITION BY _ok ORDER BY loss_mean) END")
        elif isinstance(score, str):
            expr = f"CASE WHEN _ok THEN ({score}) END"
        else:
            expr = "NULL::DOUBLE"
        extra = ", " + ", ".join(f"r.{_q(c)}" for c in include) if include else ""
        query = f"""
            WITH e AS ({base}),
            s AS (SELECT *, n_nonfinite = 0 AND grad_norm_mean IS NOT NULL AND loss_mean IS NOT NULL AS _ok FROM e)
            SELECT s.* EXCLUDE (_ok), ({expr})::DOUBLE AS early_score{extra}
            FROM s {"LEFT JOIN runs r USING (run_id)" if include else ""}
        """
        with self._reader(live) as con:
            self._check_runs(con, ids)
            if include:
                self._check_run_columns(con, include)
            try:
                df = con.execute(query, params).df()
            except duckdb.Error as e:
                if isinstance(score, str) and score != "paper":
                    raise ValueError(f"score={score!r}: {e}") from None
                raise
        if callable(score):
            df["early_score"] = pd.Series(score(df), index=df.index, dtype="float64")
            ok = (df["n_nonfinite"] == 0) & df["grad_norm_mean"].notna() & df["loss_mean"].notna()
            df.loc[~ok, "early_score"] = np.nan
        df["rank"] = df["early_score"].rank(ascending=False, method="min", na_option="bottom").astype("int64")
        return df.sort_values(["rank", "run_id"], ignore_index=True)

    def align(self, runs: str | Sequence[str] | None = None, by: str = "samples", metric: str = "loss",
              points: int = 200, live: bool = False) -> pd.DataFrame:
        """`metric` of each run interpolated on one shared grid of `by` (the range every run covers).

        Returns long rows (run_id, by, metric): every run has the same `points` x values, so runs with
        different batch sizes compare at equal samples or tokens seen. Empty when the runs share no range.
        """
        if by not in X_AXES:
            raise ValueError(f"by={by!r}: choose one of {', '.join(X_AXES)}")
        if metric not in METRIC_COLUMNS:
            raise ValueError(f"unknown metric {metric!r}; metrics has: {', '.join(METRIC_COLUMNS)}")
        ids = _as_list(runs)
        with self._reader(live) as con:
            self._check_runs(con, ids)
            raw = con.execute(f"SELECT run_id, {by} AS x, {metric} AS y FROM metrics "
                              f"WHERE {by} IS NOT NULL AND {metric} IS NOT NULL"
                              + (" AND list_contains($ids, run_id)" if ids is not None else "")
                              + " ORDER BY run_id, x", {"ids": ids} if ids is not None else {}).df()
        out = pd.DataFrame({"run_id": pd.Series(dtype="object"), by: pd.Series(dtype="float64"),
                            metric: pd.Series(dtype="float64")})
        if raw.empty:
            return out
        groups = dict(tuple(raw.groupby("run_id", sort=True)))
        lo = max(g["x"].min() for g in groups.values())
        hi = min(g["x"].max() for g in groups.values())
        if lo > hi:
            return out
        grid = np.linspace(lo, hi, points) if hi > lo else np.array([lo], dtype=float)
        frames = [pd.DataFrame({"run_id": r, by: grid, metric: np.interp(grid, g["x"], g["y"])})
                  for r, g in groups.items()]
        return pd.concat(frames, ignore_index=True)

    def final_scores(self, task: str, metric: str, live: bool = False) -> pd.DataFrame:
        """The last eval of (`task`, `metric`) per run: run_id, step, samples, value, stderr."""
        with self._reader(live) as con:
            df = con.execute("""
                SELECT run_id, step, samples, value, stderr FROM evals WHERE task = ? AND metric = ?
                QUALIFY row_number() OVER (PARTITION BY run_id ORDER BY step DESC) = 1
                ORDER BY value DESC, run_id
            """, [task, metric]).df()
            if df.empty:
                have = con.execute("SELECT DISTINCT task, metric FROM evals ORDER BY ALL").fetchall()
                if have:
                    raise KeyError(f"no evals of task {task!r} metric {metric!r}; the store has: "
                                   + ", ".join(f"{t}/{m}" for t, m in have))
        return df

    def correlate_early_with_final(self, task: str, metric: str, **early_kwargs: Any) -> pd.DataFrame:
        """Spearman rho between each early signal and the final eval value, over runs having both.

        `early_kwargs` go to `early_dynamics` (first_steps, first_samples, runs, score, live). A good
        early signal for the paper's rule shows rho < 0 for grad_norm_mean and rho > 0 for early_score.
        """
        early = self.early_dynamics(**early_kwargs)
        final = self.final_scores(task, metric, live=early_kwargs.get("live", False))
        both = early.merge(final[["run_id", "value"]], on="run_id")
        rows = [{"signal": s, "rho": _spearman(both[s], both["value"]),
                 "n": int((both[s].notna() & both["value"].notna()).sum())} for s in EARLY_SIGNALS]
        return pd.DataFrame(rows)

    # -- cohorts (the lab's runs table) ----------------------------------------------------------

    def cohort_early_scores(self, runs: Sequence[str], first_samples: int | None = None,
                            first_steps: int | None = None, score: str | Callable[[pd.DataFrame], Any] = "paper",
                            live: bool = False) -> pd.DataFrame:
        """The early score within one cohort (a sweep, or runs picked together) over the same first budget.

        Only runs that have reached the window's end are scored and ranked, against each other: a
        run still short of it (or without metrics) gets no score and no rank, so adding or
        advancing other runs never moves a complete run's score except by joining its cohort.
        Columns: run_id, complete, reached, early_score, early_rank, grad_norm_mean, loss_mean.
        """
        cols = ["run_id", "complete", "reached", "early_score", "early_rank", "grad_norm_mean", "loss_mean"]
        have = self.run_dirs()
        names = [r for r in dict.fromkeys(runs) if r in have]
        if not names:
            return pd.DataFrame(columns=cols)
        kw = {"first_samples": first_samples} if first_samples is not None else {"first_steps": first_steps}
        probe = self.early_dynamics(runs=names, live=live, **kw)
        complete = probe.loc[probe["complete"], "run_id"].tolist()
        out = pd.DataFrame({"run_id": names})
        out = out.merge(probe[["run_id", "complete", "reached"]], how="left", on="run_id")
        out["complete"] = out["complete"].astype("boolean").fillna(False).astype(bool)
        if complete:
            ranked = self.early_dynamics(runs=complete, score=score, live=live, **kw)
            ranked = ranked[["run_id", "early_score", "rank", "grad_norm_mean", "loss_mean"]]
            out = out.merge(ranked.rename(columns={"rank": "early_rank"}), how="left", on="run_id")
            out.loc[out["early_score"].isna(), "early_rank"] = np.nan
        else:
            out = out.assign(early_score=np.nan, early_rank=np.nan, grad_norm_mean=np.nan, loss_mean=np.nan)
        out["early_rank"] = out["early_rank"].astype("Int64")
        return out[cols]


def _stat_key(path: Path) -> tuple[int, int, int]:
    try:
        st = path.stat()
    except FileNotFoundError:
        return (0, -1, 0)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _stat_of(s: _FileState) -> tuple[int, int, int]:
    return (s.ino, s.size, s.mtime_ns)

