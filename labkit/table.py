"""The one runs table: behind `labkit ls`, the Board, `03_early_dynamics` and the report index.

One row per run under a runs root: name, state (with a liveness check), progress, the config
columns you choose, the early score within its cohort, final loss and validation loss, the eval
scores (`task/metric` columns, best per task), start time and duration. `runs_table()` returns the
typed frame (numbers stay numbers, `started` a timestamp, `duration` seconds); `readable()` the same
rows as short strings; `to_html()` a sortable, filterable HTML table that needs no network.

The early score is only meaningful inside a cohort, runs compared over the same first samples: a
sweep (its probe budget), or runs you pick (`cohort=[...]`). Runs outside any cohort get none.
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from labkit import paths, progress, runfiles

DEFAULT_CONFIG_COLUMNS = ("learning_rate", "effective_batch_size", "schedule", "warmup_steps", "seed")
# The table's own columns, in order around the config columns and eval scores.
LEAD = ("run", "state", "progress", "step")
TAIL = ("cohort", "early_score", "early_rank", "loss", "val_loss")
END = ("started", "duration", "placement")
SELECTED = "selected"  # the cohort name of runs picked by hand
EARLY_SCORE_HELP = (
    "Early score: rank within its cohort (a sweep, or runs picked together) by grad norm and loss over "
    "the same first samples, 0..2, higher is better; the paper found lower early grad norm and higher "
    "early loss predict the better final model. Runs that have not reached the window are not ranked.")


def _sweeps(root: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted((root / "sweeps").glob("*/sweep.json")):
        rec = runfiles.read_json(path)
        if rec.get("runs"):
            out.append(rec)
    return out


def default_window(store, names: Sequence[str]) -> int:
    """Samples to compare a hand-picked cohort over: a tenth of the shortest run's planned samples."""
    planned = [runfiles.finite_number(runfiles.read_status(store.root / n).get("total_samples")) for n in names]
    planned = [p for p in planned if p]
    return max(1, int(min(planned) // 10)) if planned else 256


def cohort_scores(store, root: Path, cohort: Sequence[str] | None = None,
                  first_samples: int | None = None) -> pd.DataFrame:
    """run_id, cohort, early_score, early_rank for every run in a sweep or in `cohort`."""
    frames = []
    for rec in _sweeps(root):
        et = rec.get("early_termination") or {}
        names = [r["name"] for r in rec["runs"]]
        budgets = et.get("probe_samples") or et.get("probe_steps")
        budget = (budgets[0] if isinstance(budgets, list) else budgets) if budgets else None
        by_steps = bool(et.get("probe_steps")) and not et.get("probe_samples")
        kw: dict[str, Any] = {}
        if first_samples is not None:
            kw["first_samples"] = first_samples
        elif budget and by_steps:
            kw["first_steps"] = int(budget)
        else:
            kw["first_samples"] = int(budget) if budget else default_window(store, names)
        frames.append(store.cohort_early_scores(names, **kw).assign(cohort=rec["name"]))
    if cohort:
        window = first_samples or default_window(store, cohort)
        picked = store.cohort_early_scores(list(cohort), first_samples=window).assign(cohort=SELECTED)
        frames = [f[~f["run_id"].isin(picked["run_id"])] for f in frames] + [picked]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=["run_id", "cohort", "early_score", "early_rank"])
    return pd.concat(frames, ignore_index=True)[["run_id", "cohort", "early_score", "early_rank"]]


def runs_table(root: str | Path | None = None, columns: Sequence[str] | None = None, where: str | None = None,
               sort: str | None = None, descending: bool | None = None, cohort: Sequence[str] | None = None,
               first_samples: int | None = None, store=None) -> pd.DataFrame:
    """One row per run, newest first (or by `sort`); `columns` are the config columns to show.

    `where` is a SQL condition over the table's columns (`"learning_rate >= 1e-3 AND state = 'finished'"`;
    quote dotted names: `"distributed.num_processes" > 1`). `sort` is a column name, descending by
    default for scores and times (`descending` overrides). `cohort`: run names to rank together.
    """
    import duckdb

    from labkit.launch import Run
    from labkit.store import Store

    root = paths.runs_root(root) if root is None else Path(root)
    if store is None:
        store = Store(root)
    if not root.is_dir():
        return empty(columns)
    base = store.runs_table()
    config_cols = [c for c in (DEFAULT_CONFIG_COLUMNS if columns is None else columns)]
    missing = [c for c in config_cols if c not in base.columns and c not in _ALL_NAMES]
    if missing and len(base):
        raise KeyError(f"no run column(s) {', '.join(map(repr, missing))}; config columns are: "
                       + ", ".join(c for c in base.columns if c not in _STORE_ONLY))
    evals = sorted(c for c in base.columns if "/" in c)
    scores = cohort_scores(store, root, cohort, first_samples)
    now = time.time()
    rows = []
    for r in base.to_dict(orient="records"):
        name = r["run_id"]
        status = Run(root / name).status()
        state = status.get("state") or r.get("status")
        started = runfiles.finite_number(status.get("started_at") or r.get("started_at"))
        ended = runfiles.finite_number(status.get("ended_at") or r.get("ended_at"))
        samples = runfiles.finite_number(status.get("samples") if status.get("samples") is not None
                                         else r.get("samples")) or 0
        total = runfiles.finite_number(status.get("total_samples") or r.get("total_samples"))
        progress = 1.0 if state == "finished" else (min(samples / total, 1.0) if total else None)
        live = state in ("running", "pending")
        row = {"run": name, "state": state, "progress": progress, "step": status.get("step") or r.get("last_step"),
               **{c: r.get(c) for c in config_cols if c not in _ALL_NAMES},
               "loss": r.get("last_loss"), "val_loss": r.get("last_val_loss"),
               **{c: r.get(c) for c in evals},
               # Local wall-clock time, as people read it.
               "started": pd.Timestamp(datetime.fromtimestamp(started)) if started else pd.NaT,
               "duration": ((now if live else ended or now) - started) if started else None,
               "placement": placement_text(status)}
        rows.append(row)
    df = pd.DataFrame(rows)
    if not len(df):
        return empty(columns)
    df = df.merge(scores, how="left", left_on="run", right_on="run_id").drop(columns="run_id")
    df["cohort"] = df["cohort"].fillna("")
    df["early_rank"] = df["early_rank"].astype("Int64")
    df["progress"] = pd.to_numeric(df["progress"], errors="coerce")
    df["duration"] = pd.to_numeric(df["duration"], errors="coerce")
    order = [*LEAD, *[c for c in config_cols if c not in _ALL_NAMES], *TAIL, *evals, *END]
    df = df[order]
    if where:
        con = duckdb.connect()
        con.register("runs", df)
        try:
            df = con.execute(f"SELECT * FROM runs WHERE {where}").df()
        except duckdb.Error as e:
            raise ValueError(f"--where {where!r}: {str(e).splitlines()[0]}; columns: {', '.join(df.columns)}") \
                from None
        finally:
            con.close()
    if sort:
        if sort not in df.columns:
            raise KeyError(f"--sort {sort!r}: no such column; columns: {', '.join(df.columns)}")
        desc = descending if descending is not None else sort in _DESC_BY_DEFAULT or "/" in sort
        df = df.sort_values(sort, ascending=not desc, na_position="last", kind="stable")
    else:
        df = df.sort_values("started", ascending=False, na_position="last", kind="stable")
    return df.reset_index(drop=True)


_DESC_BY_DEFAULT = {"early_score", "started", "duration", "progress", "step"}
_ALL_NAMES = {*LEAD, *TAIL, *END}
_STORE_ONLY = {"run_id", "status", "started_at", "updated_at", "ended_at", "stop_reason", "error", "total_steps",
               "last_step", "samples", "total_samples", "config_error", "last_loss", "min_loss", "last_val_loss",
               "min_val_loss"}


def empty(columns: Sequence[str] | None = None) -> pd.DataFrame:
    cols = [*LEAD, *(DEFAULT_CONFIG_COLUMNS if columns is None else columns), *TAIL, *END]
    return pd.DataFrame(columns=list(dict.fromkeys(cols)))


def placement_text(status: dict[str, Any]) -> str | None:
    """Where a run trains, and why it waits if it does: `slurm job 42 on node1 (Slurm: Resources)`."""
    from labkit.launch import where

    text = where(status.get("placement") or {})
    reason = status.get("pending_reason") if status.get("state") == "pending" else None
    return f"{text} ({reason})" if text and reason else text or reason


# -- readable ------------------------------------------------------------------------------------


def duration_text(seconds: float | None) -> str:
    return "" if seconds is None or pd.isna(seconds) else progress.duration_text(seconds)


def _number(v: Any, col: str) -> str:
    if v is None or (isinstance(v, float) and pd.isna(v)) or v is pd.NA:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    if isinstance(v, float):
        if col in ("learning_rate", "lr") or (v != 0 and abs(v) < 1e-3):
            return f"{v:.2g}" if abs(v) >= 1e-3 else f"{v:.1e}"
        if v.is_integer() and abs(v) < 1e15:
            return f"{int(v):,}" if abs(v) >= 10000 else str(int(v))
        return f"{v:.4g}"
    return str(v)


def cell_text(v: Any, col: str) -> str:
    """One value as the table shows it: 57%, 3e-03, 1.234, 2026-12-01 20:31, 3m12s."""
    if col == "progress":
        return "" if v is None or pd.isna(v) else f"{100 * float(v):.0f}%"
    if col == "duration":
        return duration_text(v)
    if col == "started":
        return "" if v is None or pd.isna(v) else pd.Timestamp(v).strftime("%Y-%m-%d %H:%M")
    if hasattr(v, "item") and not isinstance(v, str):
        try:
            v = v.item()
        except (TypeError, ValueError):
            pass
    return _number(v, col)


def readable(df: pd.DataFrame) -> pd.DataFrame:
    """The table as strings: percentages, short numbers, local times, durations; empty for missing."""
    return pd.DataFrame({c: [cell_text(v, c) for v in df[c]] for c in df.columns}, index=df.index)


def to_text(df: pd.DataFrame) -> str:
    if not len(df):
        return "(no runs)"
    return readable(df).to_string(index=False)


def _sort_key(v: Any, col: str) -> str:
    if v is None or (not isinstance(v, str) and pd.isna(v)):
        return ""
    if col == "started":
        return str(pd.Timestamp(v).timestamp())
    if hasattr(v, "item") and not isinstance(v, str):
        v = v.item()
    return repr(float(v)) if isinstance(v, int | float) and not isinstance(v, bool) else str(v)


# A table sorter and filter in a few lines of plain JS, inlined: reports must work offline.
SORTER_JS = """
(function () {
  function key(td) { var k = td.getAttribute('data-sort'); return k === null ? td.textContent : k; }
  document.querySelectorAll('table.labkit-runs').forEach(function (table) {
    var body = table.tBodies[0];
    table.querySelectorAll('thead th').forEach(function (th, i) {
      th.style.cursor = 'pointer';
      th.title = 'sort by ' + th.textContent;
      th.addEventListener('click', function () {
        var desc = th.getAttribute('aria-sort') !== 'descending';
        table.querySelectorAll('thead th').forEach(function (o) { o.removeAttribute('aria-sort'); });
        th.setAttribute('aria-sort', desc ? 'descending' : 'ascending');
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = key(a.cells[i]), y = key(b.cells[i]);
          if (x === '' || y === '') { return x === y ? 0 : (x === '' ? 1 : -1); }
          var nx = parseFloat(x), ny = parseFloat(y);
          var c = (!isNaN(nx) && !isNaN(ny) && String(nx) !== 'NaN') ? nx - ny : x.localeCompare(y);
          return desc ? -c : c;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
    var box = document.getElementById(table.id + '-filter');
    if (box) {
      box.addEventListener('input', function () {
        var words = box.value.toLowerCase().split(/\\s+/).filter(Boolean);
        Array.prototype.forEach.call(body.rows, function (r) {
          var text = r.textContent.toLowerCase();
          r.style.display = words.every(function (w) { return text.indexOf(w) >= 0; }) ? '' : 'none';
        });
      });
    }
  });
})();
"""

NUMERIC = ("progress", "step", "early_score", "early_rank", "loss", "val_loss", "duration", "started")


def to_html(df: pd.DataFrame, table_id: str = "runs", links: dict[str, str] | None = None,
            notes: dict[str, str] | None = None, script: bool = True, filter_box: bool = True) -> str:
    """A sortable (click a header) and filterable (type words) HTML table; the script is inline.

    `links`: run -> report href; `notes`: run -> the state's tooltip (stop reason or error)."""
    links, notes = links or {}, notes or {}
    head = "".join(f"<th>{html.escape(c)}</th>" for c in df.columns)
    body = []
    for _, r in df.iterrows():
        cells = []
        for c in df.columns:
            v = r[c]
            text = html.escape(cell_text(v, c))
            if c == "run" and links.get(str(v)):
                text = f"<a href=\"{html.escape(links[str(v)])}\">{text}</a>"
            if c == "state" and text:
                note = notes.get(str(r["run"])) if "run" in df.columns else None
                tip = f" title=\"{html.escape(note)}\"" if note else ""
                text = f"<span class=\"state {text}\"{tip}>{text}</span>"
            num = c in NUMERIC or (not isinstance(v, str) and isinstance(v, int | float) and not isinstance(v, bool))
            cls = " class=\"num\"" if num else ""
            cells.append(f"<td{cls} data-sort=\"{html.escape(_sort_key(v, c))}\">{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    parts = []
    if filter_box:
        parts.append(f"<input id=\"{table_id}-filter\" class=\"labkit-filter\" type=\"search\" "
                     "placeholder=\"filter runs (words, e.g. finished lr)\">")
    parts.append(f"<div class=\"labkit-scroll\"><table id=\"{table_id}\" class=\"labkit-runs\"><thead><tr>{head}"
                 f"</tr></thead><tbody>{''.join(body)}</tbody></table></div>")
    if script:
        parts.append(f"<script>{SORTER_JS}</script>")
    return "\n".join(parts)
