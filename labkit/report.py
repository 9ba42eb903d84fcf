"""What notebooks show and keep, and the offline HTML reports made from executed notebooks.

Notebooks run two ways: interactively (widgets, JupyterLab's own chart renderer) and headless
under papermill. In batch mode charts render to inline SVG (vl-convert, no network), results
are recorded as JSON outputs that `recorded()` reads back, and `follow()` prints plain log lines
instead of a widget. `build_reports(root)` renders every executed `report.ipynb` under a runs
root to self-contained HTML (no remote scripts) and writes `index.html` linking them.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

from labkit import runfiles

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "templates" / "report"
SWEEPS = "sweeps"  # as labkit.sweep.SWEEPS_DIR
RECORD_MIME = "application/vnd.labkit.record+json"
# Outputs that need a live kernel or a CDN; a report keeps their text/plain fallback instead.
LIVE_MIMES = ("application/vnd.jupyter.widget-view+json", "application/javascript",
              "application/vnd.jupyter.widget-state+json")


# -- in the notebook ---------------------------------------------------------------------------


VEGA_MIME = "application/vnd.labkit.vegalite+json"  # a chart's spec, kept for interactive HTML reports


def _batch_renderer(spec: dict, **metadata: Any) -> dict[str, Any]:
    """SVG for JupyterLab and nbconvert, plus the spec, which reports turn into an interactive chart."""
    import vl_convert as vlc

    from labkit.viz import _vl_version

    svg = vlc.vegalite_to_svg(spec, vl_version=_vl_version())
    return {VEGA_MIME: spec, "image/svg+xml": svg, "text/plain": "<chart>"}


def setup(interactive: bool) -> None:
    """Charts that need no network: JupyterLab gets altair's JupyterChart with vega inlined (hover,
    zoom); batch runs keep an SVG plus the spec, which `render` turns into an interactive chart."""
    import altair as alt
    import pandas as pd

    if interactive:
        alt.renderers.enable("jupyter", offline=True)
    else:
        alt.renderers.register("labkit-batch", _batch_renderer)
        alt.renderers.enable("labkit-batch")
    pd.set_option("display.max_columns", 40)
    # A run's full config is ~90 fields: a report shows every one (pandas would elide the middle past 60).
    pd.set_option("display.max_rows", 200)
    pd.set_option("display.width", 200)
    pd.set_option("display.float_format", lambda v: f"{v:.4g}")


def jsonable(value: Any) -> Any:
    """Plain JSON types: numpy/pandas scalars unwrapped, frames as records, NaN/inf as None."""
    try:
        import pandas as pd

        if isinstance(value, pd.DataFrame):
            return jsonable(value.to_dict(orient="records"))
        if isinstance(value, pd.Series):
            return jsonable(value.to_dict())
    except ImportError:
        pass
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        try:
            value = value.item()
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def record(name: str, value: Any) -> None:
    """Keep `value` in the executed notebook under `name` (read back with `recorded`)."""
    from IPython.display import display

    value = jsonable(value)
    display({RECORD_MIME: {"name": name, "value": value}, "text/plain": f"[recorded {name}]"}, raw=True)


def recorded(notebook: str | Path) -> dict[str, Any]:
    """Everything `record()` kept in an executed notebook, by name (a later record wins)."""
    import nbformat

    nb = nbformat.read(str(notebook), as_version=4)
    out = {}
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            data = o.get("data", {})
            if RECORD_MIME in data:
                rec = data[RECORD_MIME]
                out[rec["name"]] = rec["value"]
    return out


def notebook_error(notebook: str | Path) -> str | None:
    """`ename: evalue` of the first error output of an executed notebook, if any."""
    import nbformat

    nb = nbformat.read(str(notebook), as_version=4)
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.get("output_type") == "error":
                return f"{o.get('ename')}: {o.get('evalue')}"
    return None


@contextmanager
def quiet():
    """Hide progress bars (lm-eval, transformers) from a cell's output; show them if the block fails."""
    from transformers.utils import logging as hf_logging

    buf = io.StringIO()
    # In a kernel transformers' bars are notebook widgets, which no stream redirect catches.
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with redirect_stderr(buf), redirect_stdout(buf):
            yield
    except BaseException:
        sys.stderr.write(buf.getvalue())
        raise
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def execute(notebook: str | Path, out: str | Path, parameters: dict[str, Any] | None = None,
            log_output: bool = False, cwd: str | Path | None = None) -> Path:
    """Run a notebook headless with papermill on a python3 kernel started in `cwd` (default: the repo root).

    The kernel is started here rather than by papermill: papermill's `cwd` is a process-wide
    chdir, which threads running several notebooks at once would race on; labkit is made importable
    whether or not it is installed; and the kernel's own log lines (transport warnings) are dropped
    instead of landing in the output of the notebook that runs this one. Raises papermill's
    `PapermillExecutionError` when a cell fails; the executed notebook is written either way.
    """
    import subprocess

    import papermill as pm
    from jupyter_client.manager import KernelManager

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(cwd or ROOT), env=env, stderr=subprocess.DEVNULL)
    try:
        pm.execute_notebook(str(notebook), str(out), parameters=parameters or {}, kernel_name="python3", km=km,
                            progress_bar=False, log_output=log_output)
    finally:
        km.shutdown_kernel(now=True)
    return Path(out)


def follow(run, poll: float = 2.0, every: float = 10.0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Batch-mode monitor: a plain log line every `every` s until the run ends; returns its status."""
    last_line, last_step = 0.0, -1
    while True:
        status = run.status()
        state = status.get("state")
        step = status.get("step") or 0
        done = state in runfiles.FINAL_STATES
        if done or (time.time() - last_line >= every and step != last_step):
            loss = status.get("loss")
            log(f"{time.strftime('%H:%M:%S')} {run.name}: {state} step {step}/{status.get('total_steps') or '?'} "
                f"samples {status.get('samples') or 0}/{status.get('total_samples') or '?'}"
                + (f" loss {loss:.4f}" if isinstance(loss, int | float) else ""))
            last_line, last_step = time.time(), step
        if done:
            if state == "failed":
                log(run.tail(30))
            return status
        time.sleep(poll)


# -- tables and charts the notebooks show -------------------------------------------------------


def sweep_base_of(cfg) -> dict[str, Any] | None:
    """The sweep this run belongs to, if any: its name and the run's overrides of the sweep's base."""
    root = Path(cfg.runs_root)
    for path in sorted((root / SWEEPS).glob("*/sweep.json")):
        rec = runfiles.read_json(path)
        for r in rec.get("runs", []):
            if r.get("name") == cfg.name:
                return {"sweep": rec.get("name"), "overrides": r.get("overrides") or {}}
    return None


def config_table(cfg):
    """The full resolved config (defaults included): value, the default where it differs, and which
    fields the sweep varied from its base (`sweep axis`)."""
    import pandas as pd

    from labkit.config import RunConfig

    defaults = RunConfig(datasets=["_"]).flat()
    sweep = sweep_base_of(cfg) or {}
    axes = set(sweep.get("overrides", {}))
    rows = []
    for k, v in cfg.flat().items():
        d = defaults.get(k)
        changed = k not in ("datasets", "name", "runs_root") and d != v
        rows.append({"field": k, "value": "" if v is None else str(v),
                     "default": ("" if d is None else str(d)) if changed else "",
                     "set by": "sweep axis" if k in axes else "config" if changed else "default"})
    df = pd.DataFrame(rows).set_index("field")
    return df


def config_diff(cfg):
    """Only the fields that differ from the defaults or were set by the sweep: what a colleague reads first."""
    df = config_table(cfg)
    return df[df["set by"] != "default"]


def eval_table(run_dir: str | Path):
    """One row per (evaluation, task, metric): step, score and its stderr, newest evaluation first."""
    import pandas as pd

    from labkit.store import read_eval_file
    from labkit.sweep import eval_files

    rows = []
    for p in reversed(eval_files(run_dir)):
        try:
            for r in read_eval_file(p):
                rows.append({"checkpoint": p.stem, "samples": r["samples"], "task": r["task"],
                             "metric": r["metric"], "score": r["value"], "± stderr": r["stderr"]})
        except ValueError:
            continue
    df = pd.DataFrame(rows, columns=["checkpoint", "samples", "task", "metric", "score", "± stderr"])
    return df.set_index(["task", "metric"])


def run_summary(run_dir: str | Path) -> dict[str, Any]:
    """Status, final metrics and newest eval scores of a run, as plain JSON."""
    from labkit.sweep import eval_scores, planned_samples

    run_dir = Path(run_dir)
    st = runfiles.read_status(run_dir)
    metrics = runfiles.read_metrics(run_dir)
    last = metrics[-1] if metrics else {}
    val = [m["val_loss"] for m in metrics if m.get("val_loss") is not None]
    return jsonable({
        "run": run_dir.name, "state": st.get("state"), "stop_reason": st.get("stop_reason"), "error": st.get("error"),
        "step": st.get("step"), "samples": st.get("samples"), "planned_samples": planned_samples(run_dir),
        "final_loss": last.get("loss"), "final_grad_norm": last.get("grad_norm"),
        "final_val_loss": val[-1] if val else None, "best_val_loss": min(val) if val else None,
        "tokens_per_s": last.get("tokens_per_s"), "train_seconds": last.get("time"),
        "evals": eval_scores(run_dir)})


def run_markdown(s: dict[str, Any]) -> str:
    def f(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = [f"**{s['run']}**: {s['state']} at step {s['step']} ({s['samples']}/{s['planned_samples']} samples)"]
    if s.get("stop_reason"):
        lines.append(f"- stop reason: {s['stop_reason']}")
    for key in ("final_loss", "final_grad_norm", "final_val_loss", "best_val_loss", "tokens_per_s", "train_seconds"):
        if s.get(key) is not None:
            lines.append(f"- {key.replace('_', ' ')}: {f(s[key])}")
    for key, value in (s.get("evals") or {}).items():
        lines.append(f"- {key}: {f(value)}")
    return "\n".join(lines)


def curves_chart(run_dir: str | Path, x: str = "samples"):
    """Loss (and validation loss) beside the gradient norm of one run, against samples seen."""
    import altair as alt
    import pandas as pd

    from labkit import viz

    df = pd.DataFrame(runfiles.read_metrics(run_dir))
    panels = []
    for cols, title in ((("loss", "val_loss"), "loss"), (("grad_norm",), "grad norm (before clipping)")):
        have = [c for c in cols if c in df.columns]
        long = (df.melt(id_vars=[x], value_vars=have, var_name="metric").dropna(subset=["value"]) if have and len(df)
                else pd.DataFrame({x: [], "value": [], "metric": []}))
        panels.append(viz.curves(long, y="value", x=x, color="metric", title=title).properties(width=380))
    return alt.hconcat(*panels).properties(title=Path(run_dir).name)


def run_column(df) -> str:
    return "run_id" if "run_id" in df.columns else "run"


def store_curves(store, runs: list[str] | None = None, y: str = "loss", x: str = "samples"):
    """`y` of the store's runs against `x`, downsampled in DuckDB to stay under altair's row limit."""
    from labkit import viz

    df = store.metrics(runs, x=x, columns=[y])
    return viz.curves(df, y=y, x=x, color="run_id").properties(title=f"{y} by {x}")


def sweep_curves(sweep_dir: str | Path, y: str = "loss", x: str = "samples"):
    """`y` of every run of a sweep against `x`, read from the run files."""
    import pandas as pd

    from labkit import viz
    from labkit.sweep import read_sweep

    frames = []
    for r in read_sweep(sweep_dir)["runs"]:
        df = pd.DataFrame(runfiles.read_metrics(Path(r["notebook"]).parent))
        if y in df.columns:
            frames.append(df[[x, y]].dropna().assign(run=r["key"]))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({x: [], y: [], "run": []})
    return viz.curves(df, y=y, x=x, color="run").properties(title=f"{y} by {x}")


def sweep_heatmap(df, spec=None, values: tuple[str, ...] | None = None):
    """Heatmaps over the sweep's first two axes: the early score and the final result, side by side.

    With one axis (or explicit runs only) the grid is a single row. The final result is the first of
    the eval columns (`task/metric`), `final_val_loss` and `final_loss` that has values.
    """
    import altair as alt

    from labkit import viz

    df = df.copy()
    axes = list(spec.axes) if spec is not None and getattr(spec, "axes", None) else []
    if not axes:
        axes = ["key"]
    x = axes[0]
    y = axes[1] if len(axes) > 1 else "sweep"
    if y == "sweep":
        df["sweep"] = spec.name if spec is not None else "sweep"
    if "state" in df.columns:
        # A stopped run's last value is not a final result: leave its cell out of the final maps.
        done = df["state"] == "finished"
        for c in [c for c in df.columns if "/" in c] + ["final_val_loss", "final_loss", "best_val_loss"]:
            if c in df.columns:
                df.loc[~done, c] = None
    if values is None:
        finals = [c for c in df.columns if "/" in c] + ["final_val_loss", "final_loss"]
        final = next((c for c in finals if c in df.columns and df[c].notna().any()), None)
        values = tuple(v for v in ("early_score", final) if v and v in df.columns and df[v].notna().any())
    charts = [viz.sweep_heatmap(df, x=x, y=y, value=v, title=v).properties(width=260, height=200)
              for v in values]
    if not charts:
        return alt.Chart(df).mark_text().properties(title="no values to show yet")
    return alt.hconcat(*charts).resolve_scale(color="independent") if len(charts) > 1 else charts[0]


def sweep_title(spec, name: str | None = None) -> str:
    """`bs_lr: effective batch size x learning rate (4 runs)`, from the spec's axes."""
    from labkit.sweep import overrides_of

    axes = [a.replace("_", " ") for a in spec.axes] or ["explicit runs"]
    n = len(overrides_of(spec))
    return f"{name or spec.name}: {' x '.join(axes)} ({n} run{'s' if n != 1 else ''})"


def decisions_table(sweep_dir: str | Path):
    """The early-termination ranking at each decision: run, early score, rank, stopped or kept."""
    import pandas as pd

    from labkit.sweep import read_sweep

    et = read_sweep(sweep_dir).get("early_termination") or {}
    rows = []
    for i, d in enumerate(et.get("decisions", [])):
        for r in d["ranking"]:
            rows.append({"decision": i + 1, "at": f"{d['budget']} {d['axis']} (rung {d.get('rung', 1)})", "run": r["run"],
                         "early_score": r["early_score"], "grad_norm_mean": r.get("grad_norm_mean"),
                         "loss_mean": r.get("loss_mean"), "rank": r["rank"], "verdict": r.get("verdict")})
    cols = ["decision", "at", "run", "early_score", "grad_norm_mean", "loss_mean", "rank", "verdict"]
    return pd.DataFrame(rows, columns=cols).set_index(["decision", "at"])


def sweep_markdown(sweep_dir: str | Path) -> str:
    """Runs, states, early-termination decisions and the compute they saved, in a few lines."""
    from labkit.sweep import EarlyTermination, read_sweep

    rec = read_sweep(sweep_dir)
    results = rec.get("results", [])
    states: dict[str, int] = {}
    for r in results:
        states[r["state"] or "unknown"] = states.get(r["state"] or "unknown", 0) + 1
    took = (rec.get("ended_at") or time.time()) - rec["started_at"]
    lines = [f"**{rec['name']}**: {len(rec['runs'])} runs ("
             + ", ".join(f"{n} {s}" for s, n in sorted(states.items())) + f") in {took:.0f} s, "
             f"concurrency {rec['concurrency']}."]
    et = rec.get("early_termination")
    if et:
        rule = EarlyTermination.model_validate({k: v for k, v in et.items() if k in EarlyTermination.model_fields})
        at = " and ".join(map(str, rule.budgets))
        axis = "samples" if rule.axis == "samples" else "steps"
        lines.append(f"- Early termination: after {at} {axis}, stop the worst {et['stop_fraction']:.0%} "
                     f"by early score ({et['score']}); stopped {len(et['stopped'])}: "
                     + (", ".join(f"`{n}`" for n in et["stopped"]) or "none") + ".")
        c = rec.get("compute")
        if c:
            lines.append(f"- Compute saved: {c['saved_samples']} of {c['planned_samples']} planned samples "
                         f"({100 * c['saved_fraction']:.0f}%).")
        if et.get("watcher_error"):
            lines.append(f"- Watcher error: {et['watcher_error']}")
    for r in results:
        if r.get("notebook_error"):
            lines.append(f"- `{r['name']}` failed: {r['notebook_error'][:300]}")
    return "\n".join(lines)


# -- rendering ---------------------------------------------------------------------------------


def _exporter():
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import TagRemovePreprocessor
    from traitlets.config import Config

    c = Config()
    c.TagRemovePreprocessor.remove_input_tags = {"hide-input"}
    c.TagRemovePreprocessor.remove_cell_tags = {"hide-cell"}
    c.TagRemovePreprocessor.enabled = True
    exporter = HTMLExporter(config=c, template_name="labkit", extra_template_basedirs=[str(TEMPLATES)])
    exporter.register_preprocessor(TagRemovePreprocessor(config=c), enabled=True)
    return exporter


def _chart_html(spec: dict, n: int) -> str:
    div = f"labkit-chart-{n}"
    return (f'<div id="{div}" class="labkit-chart"></div>\n<script type="module">'
            f'vegaEmbed("#{div}", {json.dumps(spec)}, {{"actions": false}});</script>')


def _offline(nb, show_code: bool) -> int:
    """Make an executed notebook a report: no parameters cells, no widgets, no progress lines, no
    record outputs; charts become interactive vega-embed charts. Returns the number of charts."""
    nb.metadata.pop("widgets", None)
    charts = 0
    for cell in nb.cells:
        tags = cell.metadata.setdefault("tags", [])
        if "parameters" in tags or "injected-parameters" in tags:
            # Absolute paths of whoever ran it; the report shows the resolved config instead.
            tags.append("hide-cell")
        elif cell.cell_type == "code" and not show_code and "hide-input" not in tags:
            tags.append("hide-input")
        outputs = []
        for o in cell.get("outputs", []):
            if o.get("output_type") == "stream" and (o.get("name") == "stderr" or "progress" in tags):
                continue  # warnings and progress lines: the report shows results
            data = o.get("data")
            if data is not None:
                if RECORD_MIME in data:
                    continue
                for mime in LIVE_MIMES:
                    data.pop(mime, None)
                if VEGA_MIME in data:
                    charts += 1
                    spec = data.pop(VEGA_MIME)
                    data.pop("image/svg+xml", None)
                    data["text/html"] = _chart_html(spec, charts)
                if not data or set(data) == {"text/plain"} and data["text/plain"].startswith("<chart"):
                    continue
            outputs.append(o)
        if "outputs" in cell:
            cell.outputs = outputs
    return charts


_VEGA_JS: str | None = None


def vega_js() -> str:
    """vega, vega-lite and vega-embed in one script (from vl-convert: no network, ~900 kB)."""
    global _VEGA_JS
    if _VEGA_JS is None:
        import vl_convert as vlc

        from labkit.viz import _vl_version

        _VEGA_JS = vlc.javascript_bundle(vl_version=_vl_version())
    return _VEGA_JS


def render(notebook: str | Path, out: str | Path | None = None, title: str | None = None,
           index_href: str | None = None, show_code: bool = False) -> Path:
    """Render an executed notebook to one self-contained HTML file (interactive charts, no remote scripts)."""
    import nbformat

    notebook = Path(notebook)
    out = Path(out) if out else notebook.with_suffix(".html")
    nb = nbformat.read(str(notebook), as_version=4)
    charts = _offline(nb, show_code)
    nb.metadata["title"] = title or notebook.parent.name
    resources = {"metadata": {"name": title or notebook.parent.name},
                 "labkit": {"index_href": index_href, "vega_js": vega_js() if charts else ""}}
    body, _ = _exporter().from_notebook_node(nb, resources=resources)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(body, encoding="utf-8")
    tmp.replace(out)
    return out


def is_run_dir(path: str | Path) -> bool:
    from labkit.rundirs import holds_run

    return Path(path).is_dir() and holds_run(Path(path))


def report_run(run_dir: str | Path, force: bool = False) -> Path:
    """RUN_DIR/report.html for any run, CLI runs included: a run without an executed notebook gets one
    (`01_run.ipynb` attached to the existing run: nothing is launched or evaluated again)."""
    run_dir = Path(run_dir).resolve()
    nb = run_dir / "report.ipynb"
    if force or not nb.is_file():
        execute(ROOT / "notebooks" / "01_run.ipynb", nb, {
            "existing_run": str(run_dir), "runs_root": str(run_dir.parent), "evaluate_tasks": [],
            "interactive": False})
    return render(nb, run_dir / "report.html", title=run_dir.name)


# -- the index ---------------------------------------------------------------------------------


def _is_run(d: Path) -> bool:
    return (d / "config.yaml").is_file() or (d / runfiles.STATUS).is_file()


def _sweeps(root: Path) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Per run of any sweep: its sweep, early score and notebook result; and one row per sweep."""
    runs, sweeps = {}, []
    for path in sorted((root / SWEEPS).glob("*/sweep.json")):
        try:
            rec = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        et = rec.get("early_termination") or {}
        results = {r["name"]: r for r in rec.get("results", [])}
        for r in rec.get("runs", []):
            runs[r["name"]] = {"sweep": rec["name"], "early_score": (et.get("scores") or {}).get(r["name"]),
                               "result": results.get(r["name"], {})}
        compute = rec.get("compute") or {}
        sweeps.append({"name": rec["name"], "dir": path.parent, "runs": len(rec.get("runs", [])),
                       "stopped": len(et.get("stopped") or {}), "early_termination": bool(et),
                       "saved_fraction": compute.get("saved_fraction"),
                       "seconds": (rec.get("ended_at") or 0) - (rec.get("started_at") or 0)
                       if rec.get("ended_at") else None})
    return runs, sweeps


def _cell(v: Any) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)  # the template autoescapes


def build_reports(root: str | Path = "runs", force: bool = False, show_code: bool = False) -> Path:
    """Render every `report.ipynb` under run, sweep and study dirs of `root`; write `root/index.html`."""
    import jinja2

    from labkit import table

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such runs root")
    notebooks = sorted(root.glob("*/report.ipynb")) + sorted((root / SWEEPS).glob("*/report.ipynb"))
    rendered = {}
    for nb in notebooks:
        html_path = nb.with_suffix(".html")
        depth = len(nb.parent.relative_to(root).parts)
        if force or not html_path.exists() or html_path.stat().st_mtime < nb.stat().st_mtime:
            render(nb, html_path, title=nb.parent.name, index_href="../" * depth + "index.html",
                   show_code=show_code)
        rendered[nb.parent] = html_path

    swept, sweeps = _sweeps(root)
    runs = table.runs_table(root)
    notes = {}
    for name in runs["run"]:
        st = runfiles.read_status(root / name)
        notes[name] = str(st.get("stop_reason") or st.get("error") or "")
    # A sweep's run that failed before training (bad config, missing data) has only its notebook.
    lost = [n for n, info in swept.items() if n not in set(runs["run"]) and (root / n / "report.ipynb").is_file()]
    if lost:
        import pandas as pd

        extra = pd.DataFrame({"run": lost, "state": [swept[n]["result"].get("state") or "failed" for n in lost],
                              "cohort": [swept[n]["sweep"] for n in lost]})
        runs = pd.concat([runs, extra], ignore_index=True) if len(runs) else extra.reindex(columns=runs.columns)
        for n in lost:
            notes[n] = swept[n]["result"].get("notebook_error") or notebook_error(root / n / "report.ipynb") or ""
    links = {d.name: p.relative_to(root).as_posix() for d, p in rendered.items() if d.parent == root}
    for s in sweeps:
        s["href"] = (rendered[s["dir"]].relative_to(root).as_posix() if s["dir"] in rendered else None)
    studies = [{"name": d.name, "href": p.relative_to(root).as_posix()} for d, p in rendered.items()
               if d.parent == root and not _is_run(d) and d.name not in swept]
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True)
    env.filters["cell"] = _cell
    page = env.get_template("index.html.j2").render(
        root=str(root.resolve()), generated=time.strftime("%Y-%m-%d %H:%M:%S"), n_runs=len(runs),
        runs_table=table.to_html(runs, links=links, notes=notes), early_help=table.EARLY_SCORE_HELP,
        sweeps=sweeps, studies=studies)
    out = root / "index.html"
    tmp = out.with_name(".index.html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="labkit report", description="Render executed notebooks to offline HTML.")
    ap.add_argument("root", nargs="?", default=None, help="runs root or one run dir (default: $LABKIT_RUNS "
                    "or PROJECT/runs)")
    ap.add_argument("--force", action="store_true", help="re-render reports that look up to date")
    ap.add_argument("--code", action="store_true", help="show code cells (default: parameters and results)")
    args = ap.parse_args(argv)
    from labkit import paths

    target = Path(args.root) if args.root else paths.runs_root()
    if is_run_dir(target):
        print(report_run(target, force=args.force).resolve())
    else:
        print(build_reports(target, force=args.force, show_code=args.code).resolve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
