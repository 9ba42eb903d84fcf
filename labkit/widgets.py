"""Notebook panels: configure and launch a run, watch it train, compare and stop runs.

Every panel is an ipywidgets box, so it displays where it is the last value of a cell. Live panels
poll the run's plain files from a daemon thread that only sets widget values and chart data (never an
Output context: from a thread its output would land in whatever cell runs then), so the kernel stays
free while runs train. Executed notebooks keep no widget state: `snapshot()` gives a table or a chart
to show in reports instead.
"""

from __future__ import annotations

import html
import threading
from typing import Any

import altair as alt
import ipywidgets as w
import pandas as pd

from labkit import catalog, runfiles, table
from labkit.config import ConfigError, RunConfig, from_dict
from labkit.launch import Run, launch, runs

_offline = False


def _chart_widget(chart: alt.TopLevelMixin) -> alt.JupyterChart:
    global _offline
    # JupyterLab on a cluster node often cannot fetch vega from a CDN: serve it from vl-convert.
    if not _offline:
        try:
            alt.JupyterChart.enable_offline()
        except Exception:  # noqa: BLE001 - vl-convert missing or too old: the CDN path still works online
            pass
        _offline = True
    return alt.JupyterChart(chart)


def _problems_html(problems: list[str]) -> str:
    if not problems:
        return "<span style='color:#2e7d32'>&#10003; config is valid</span>"
    lines = "".join(f"<li>{html.escape(p)}</li>" for p in problems)
    return f"<ul style='color:#c62828;margin:0;padding-left:1.2em'>{lines}</ul>"


# -- configure and launch --------------------------------------------------------------------------


class Configurator(w.VBox):
    """A form over RunConfig with live validation, an LR-schedule preview and a Launch button.

    Fields not on the form keep the values of `base`. `.config` is the current valid config (or
    raises ConfigError); `.problems` the current messages; `.launched` the runs started from here.
    """

    def __init__(self, base: RunConfig | None = None, catalog_dir=None):
        self.base = base or RunConfig(datasets=["skills"])
        self.catalog_dir = catalog_dir
        self.launched: list[Run] = []
        self.problems: list[str] = []
        b = self.base
        names = sorted(catalog.cards(catalog_dir))
        lay = {"style": {"description_width": "160px"}, "layout": w.Layout(width="360px")}
        self.name = w.Text(value=b.name, description="name", **lay)
        self.model = w.Text(value=b.model, description="model (path or tiny)", **lay)
        chosen = [d for p in b.training_phases() for d in p.datasets]
        self.datasets = w.SelectMultiple(options=sorted(set(names) | set(chosen)), value=tuple(dict.fromkeys(chosen)),
                                         description="datasets", rows=min(6, max(3, len(names))), **lay)
        self.phased = w.Checkbox(value=bool(b.phases), description="phased (one phase per dataset)", indent=False)
        self.effective_batch_size = w.IntText(value=b.effective_batch_size, description="effective batch size", **lay)
        self.learning_rate = w.FloatText(value=b.learning_rate, description="learning rate", **lay)
        self.schedule = w.Dropdown(options=["constant", "cosine", "linear"], value=b.schedule,
                                   description="schedule", **lay)
        self.warmup_steps = w.IntText(value=b.warmup_steps, description="warmup steps", **lay)
        self.epochs = w.IntText(value=b.epochs, description="epochs", **lay)
        self.max_steps = w.IntText(value=b.max_steps or 0, description="max steps (0 = all)", **lay)
        self.max_tokens_per_device = w.IntText(value=b.max_tokens_per_device, description="max tokens / device",
                                               **lay)
        self.seed = w.IntText(value=b.seed, description="seed", **lay)
        self.num_processes = w.IntText(value=b.distributed.num_processes, description="processes", **lay)
        # Phase editor: datasets in training order, each with its epochs.
        self._order: list[str] = [d for p in b.phases for d in p.datasets] if b.phases else list(self.datasets.value)
        self._phase_epochs: dict[str, int] = {d: p.epochs for p in b.phases for d in p.datasets}
        self.phase_box = w.VBox()
        self.messages = w.HTML()
        self.launch_button = w.Button(description="Launch", button_style="success", icon="play")
        self.launch_button.on_click(lambda _: self.launch())
        self.monitors = w.VBox()
        self.preview = _chart_widget(alt.Chart(pd.DataFrame({"step": [], "lr": []})).mark_line())
        self.fields = [self.name, self.model, self.datasets, self.phased, self.effective_batch_size,
                       self.learning_rate, self.schedule, self.warmup_steps, self.epochs, self.max_steps,
                       self.max_tokens_per_device, self.seed, self.num_processes]
        for f in self.fields:
            f.observe(self._changed, names="value")
        form = w.VBox([*self.fields[:4], self.phase_box, *self.fields[4:]])
        super().__init__([w.HBox([form, w.VBox([self.preview, self.messages, self.launch_button])]),
                          self.monitors])
        self.add_class("labkit-configurator")
        self._render_phases()
        self._changed()

    # -- the form -> a config --------------------------------------------------------------------

    def _data(self) -> dict[str, Any]:
        data = self.base.model_dump(mode="json")
        data.update(name=self.name.value.strip(), model=self.model.value.strip(),
                    effective_batch_size=self.effective_batch_size.value, learning_rate=self.learning_rate.value,
                    schedule=self.schedule.value, warmup_steps=self.warmup_steps.value,
                    epochs=self.epochs.value, max_steps=self.max_steps.value or None,
                    max_tokens_per_device=self.max_tokens_per_device.value, seed=self.seed.value)
        data["distributed"]["num_processes"] = self.num_processes.value
        if self.phased.value:
            data["datasets"] = []
            data["phases"] = [{"datasets": [d], "epochs": self._phase_epochs.get(d, 1)} for d in self._order]
        else:
            data["datasets"], data["phases"] = list(self.datasets.value), []
        return data

    def _build(self) -> tuple[RunConfig | None, list[str]]:
        try:
            cfg = from_dict(self._data())
        except ConfigError as e:
            return None, [line.strip().removeprefix("- ") for line in str(e).splitlines()[1:]]
        return cfg, cfg.check()

    @property
    def config(self) -> RunConfig:
        cfg, problems = self._build()
        if problems:
            raise ConfigError("\n  - ".join(["the form's config is not valid:", *problems]))
        return cfg

    def _changed(self, change: dict | None = None) -> None:
        if change is not None and change["owner"] is self.datasets:
            chosen = list(change["new"])
            self._order = [d for d in self._order if d in chosen] + [d for d in chosen if d not in self._order]
        if change is not None and change["owner"] in (self.datasets, self.phased):
            self._render_phases()
        cfg, self.problems = self._build()
        self.messages.value = _problems_html(self.problems)
        self.launch_button.disabled = bool(self.problems)
        if cfg is not None and not self.problems:
            from labkit import viz

            self.preview.chart = viz.lr_schedule(cfg).properties(width=400)

    def _render_phases(self) -> None:
        old = self.phase_box.children
        self.phase_box.children = ()
        for row in old:  # each render makes new widgets: free the old ones' comms
            for child in row.children:
                child.close()
            row.close()
        if not self.phased.value:
            return
        rows = []
        for i, d in enumerate(self._order):
            epochs = w.IntText(value=self._phase_epochs.get(d, 1), description=f"phase {i}: {d}",
                               style={"description_width": "160px"}, layout=w.Layout(width="260px"))
            epochs.observe(lambda c, d=d: self._set_phase_epochs(d, c["new"]), names="value")
            up = w.Button(icon="arrow-up", tooltip="train this phase earlier", layout=w.Layout(width="36px"),
                          disabled=i == 0)
            up.on_click(lambda _, i=i: self.move_phase_up(i))
            rows.append(w.HBox([epochs, up]))
        self.phase_box.children = rows

    def _set_phase_epochs(self, dataset: str, epochs: int) -> None:
        self._phase_epochs[dataset] = epochs
        self._changed()

    def set_phase_epochs(self, dataset: str, epochs: int) -> None:
        """Epochs of the phase training `dataset` (phased mode)."""
        self._set_phase_epochs(dataset, epochs)
        self._render_phases()

    def move_phase_up(self, index: int) -> None:
        if 0 < index < len(self._order):
            o = self._order
            o[index - 1], o[index] = o[index], o[index - 1]
            self._render_phases()
            self._changed()

    # -- actions -----------------------------------------------------------------------------------

    def launch(self, **kwargs: Any) -> Run | None:
        """Launch the form's config (kwargs go to `labkit.launch.launch`) and show a Monitor for it."""
        try:
            cfg = self.config
            # The form's name is a default people launch again and again: an old run of that name
            # is kept and the new one gets the next free name (demo-2), never an overwrite.
            run = launch(cfg, on_exists="rename", **kwargs)
        except ConfigError as e:
            self.messages.value = _problems_html(str(e).replace("\n  - ", "\n").splitlines())
            return None
        note = (f"<span style='color:#7a5600'>a run named <code>{html.escape(cfg.name)}</code> exists (kept): "
                f"launched as <code>{html.escape(run.name)}</code></span>" if run.name != cfg.name else "")
        self.messages.value = note or f"launched <code>{html.escape(run.name)}</code>"
        self.launched.append(run)
        self.monitors.children = (Monitor(run), *self.monitors.children)
        return run

    def snapshot(self) -> pd.DataFrame:
        """The form's config as a (field, value) table, with the current problems."""
        cfg, problems = self._build()
        flat = cfg.flat() if cfg is not None else self._data()
        rows = [{"field": k, "value": v} for k, v in flat.items() if not isinstance(v, dict)]
        rows += [{"field": "problem", "value": p} for p in problems]
        return pd.DataFrame(rows)


# -- one live run ----------------------------------------------------------------------------------


def _eta(status: dict[str, Any], df: pd.DataFrame) -> str:
    step, total = status.get("step") or 0, status.get("total_steps")
    if not total or not step or "time" not in df.columns or not len(df) or step >= total:
        return ""
    elapsed = runfiles.finite_number(df["time"].iloc[-1])
    if not elapsed:
        return ""
    return table.duration_text(elapsed / step * (total - step))


def stats_html(df: pd.DataFrame, status: dict[str, Any]) -> str:
    """LR, validation loss, tokens/s, peak memory and ETA of a run, from its newest metrics rows."""
    if not len(df):
        return ""
    last = df.iloc[-1]

    def get(col: str) -> float | None:
        return runfiles.finite_number(last.get(col)) if col in df.columns else None

    val = df["val_loss"].dropna() if "val_loss" in df.columns else pd.Series(dtype=float)
    parts = []
    if get("lr") is not None:
        parts.append(f"lr {get('lr'):.2e}")
    if len(val):
        parts.append(f"val loss {float(val.iloc[-1]):.4g}")
    if get("tokens_per_s") is not None:
        parts.append(f"{get('tokens_per_s'):,.0f} tokens/s")
    if get("peak_mem_mb") is not None:
        parts.append(f"peak mem {get('peak_mem_mb'):,.0f} MB")
    if status.get("state") not in runfiles.FINAL_STATES:
        eta = _eta(status, df)
        if eta:
            parts.append(f"ETA {eta}")
    return "<span class='labkit-stats'>" + " &middot; ".join(parts) + "</span>"



class Monitor(w.VBox):
    """Progress, status and live loss / grad-norm curves of one run, with a Stop button.

    A daemon thread calls `refresh()` every `interval` seconds until the run ends or `close()`.
    """

    def __init__(self, run: Run | str, interval: float = 2.0, autostart: bool = True):
        self.run = run if isinstance(run, Run) else Run(run)
        self.interval = interval
        self.title = w.HTML(f"<b>{html.escape(self.run.name)}</b> <code>{html.escape(str(self.run.dir))}</code>")
        self.progress = w.IntProgress(value=0, min=0, max=1, description="samples",
                                      layout=w.Layout(width="420px"))
        self.progress_label = w.Label()
        self.status = w.HTML()
        self.stats = w.HTML()
        self.stop_button = w.Button(description="Stop", button_style="danger", icon="stop")
        self.stop_button.on_click(lambda _: self.stop())
        self.chart = _chart_widget(self._chart(pd.DataFrame()))
        self.state: str | None = None
        self._rows = -1
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        super().__init__([self.title, w.HBox([self.progress, self.progress_label, self.stop_button]),
                          self.status, self.stats, self.chart])
        self.add_class("labkit-monitor")
        self.refresh()
        if autostart:
            self.start()

    @staticmethod
    def _chart(df: pd.DataFrame) -> alt.TopLevelMixin:
        from labkit import viz

        panels = [viz.curves(df, y=y, x="step", color="run_id").properties(width=340, height=200)
                  for y in ("loss", "grad_norm")]
        return alt.hconcat(*panels)

    def refresh(self) -> dict[str, Any]:
        """Read the run's files once and update every widget; returns the status."""
        with self._lock:
            status = self.run.status()
            self.state = status.get("state")
            total = status.get("total_samples") or 0
            samples = status.get("samples") or 0
            self.progress.max = max(total, samples, 1)
            # A run capped by max_steps finishes before it has seen total_samples.
            self.progress.value = self.progress.max if self.state == "finished" else samples
            steps = f"step {status.get('step') or 0}/{status.get('total_steps') or '?'}"
            self.progress_label.value = f"{samples}/{total or '?'} samples, {steps}"
            self.progress.bar_style = {"finished": "success", "failed": "danger", "stopped": "warning"}.get(
                self.state or "", "info")
            detail = status.get("error") or status.get("stop_reason") or ""
            loss = f", loss {status['loss']:.4g}" if isinstance(status.get("loss"), int | float) else ""
            stopping = self.state not in runfiles.FINAL_STATES and (self.run.dir / runfiles.STOP).exists()
            place = table.placement_text(status)
            self.status.value = (f"<b>{html.escape(str(self.state))}</b>{loss}"
                                 + (f" &middot; {html.escape(place)}" if place else "")
                                 + (f" &mdash; {html.escape(str(detail))}" if detail else "")
                                 + (" &mdash; stopping: the trainer saves a checkpoint, then exits" if stopping else ""))
            self.stop_button.disabled = self.state in runfiles.FINAL_STATES or stopping
            df = self.run.metrics()
            self.stats.value = stats_html(df, status)
            if len(df) != self._rows:  # re-render only when new steps arrived
                self._rows = len(df)
                self.chart.chart = self._chart(df)
            return status

    def _poll(self) -> None:
        while not self._halt.is_set():
            try:
                state = self.refresh().get("state")
            except Exception as e:  # noqa: BLE001 - a poller must not die silently on a half-written file
                self.status.value = f"<span style='color:#c62828'>monitor error: {html.escape(str(e))}</span>"
                state = None
            if state in runfiles.FINAL_STATES:
                break
            self._halt.wait(self.interval)

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._halt.clear()
            self._thread = threading.Thread(target=self._poll, name=f"labkit-monitor-{self.run.name}", daemon=True)
            self._thread.start()

    @property
    def polling(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 120) -> threading.Thread:
        """Ask the run to stop, from a thread (stopping waits for the trainer's checkpoint)."""
        self.stop_button.disabled = True
        runfiles.request_stop(self.run.dir, "stopped from the monitor")  # at once: the trainer polls for it
        self.status.value = "<b>stopping</b> &mdash; waiting for the trainer to save a checkpoint"
        t = threading.Thread(target=self.run.stop, kwargs={"timeout": timeout, "reason": "stopped from the monitor"},
                             daemon=True)
        t.start()
        self.start()  # follow it to its final state even if polling had ended
        return t

    def close(self) -> None:
        """Stop polling and close the panel's widgets."""
        self._halt.set()
        for widget in (self.title, self.progress, self.progress_label, self.stop_button, self.status, self.stats,
                       self.chart,
                       *self.children):
            widget.close()
        super().close()

    def snapshot(self) -> alt.TopLevelMixin:
        """The loss / grad-norm chart, titled with the run's state, for executed notebooks."""
        status = self.refresh()
        return self._chart(self.run.metrics()).properties(
            title=f"{self.run.name}: {status.get('state')} at step {status.get('step')}")


# -- all runs --------------------------------------------------------------------------------------


class RunsTable(w.VBox):
    """The runs table (labkit.table) with a SQL filter, a sort column and a choice of config columns."""

    def __init__(self, root=None, columns: list[str] | None = None, store=None):
        from labkit import paths, table

        self.root = paths.runs_root(root)
        self._store = store
        self.frame = table.empty(columns)
        lay = {"style": {"description_width": "70px"}}
        self.where = w.Text(placeholder="e.g. learning_rate >= 1e-3 AND state = 'finished'", description="filter",
                            layout=w.Layout(width="460px"), **lay)
        self.sort = w.Dropdown(options=["started"], value="started", description="sort by",
                               layout=w.Layout(width="260px"), **lay)
        self.descending = w.Checkbox(value=True, description="descending", indent=False,
                                     layout=w.Layout(width="110px"))
        self.columns = w.Text(value=",".join(columns if columns is not None else table.DEFAULT_CONFIG_COLUMNS),
                              description="config", layout=w.Layout(width="460px"), **lay)
        self.html = w.HTML()
        self.error = w.HTML()
        for c in (self.where, self.columns):
            c.continuous_update = False
            c.observe(lambda _: self.refresh(), names="value")
        for c in (self.sort, self.descending):
            c.observe(lambda _: self.refresh() if not self._busy else None, names="value")
        self._busy = False
        super().__init__([w.HBox([self.where, self.sort, self.descending]), self.columns, self.error, self.html])
        self.add_class("labkit-runs-table")

    def refresh(self, cohort: list[str] | None = None) -> pd.DataFrame:
        cols = [c.strip() for c in self.columns.value.split(",") if c.strip()]
        try:
            df = table.runs_table(self.root, columns=cols, where=self.where.value.strip() or None,
                                  sort=self.sort.value, descending=self.descending.value, cohort=cohort,
                                  store=self._store)
            self.error.value = ""
        except (KeyError, ValueError) as e:
            self.error.value = f"<span style='color:#c62828'>{html.escape(str(e.args[0] if e.args else e))}</span>"
            return self.frame
        self.frame = df
        self._busy = True
        try:
            chosen = self.sort.value
            options = list(df.columns)
            if chosen not in options:
                options.append(chosen)
            if list(self.sort.options) != options:
                self.sort.options = options  # resets the value: put the user's choice back
                self.sort.value = chosen
        finally:
            self._busy = False
        text = table.readable(df)
        grid = text.to_html(index=False, border=0, classes="labkit-runs").replace(
            "<table", "<table style='white-space:nowrap;border-collapse:collapse;font-size:12px'", 1)
        self.html.value = (f"<div style='overflow-x:auto;max-width:100%'>{grid}</div>" if len(df)
                           else "<i>no runs yet</i>")
        if len(df) and df["early_score"].notna().any():
            self.html.value += f"<div style='color:#666;font-size:12px'>{html.escape(table.EARLY_SCORE_HELP)}</div>"
        return df


METRICS = ("loss", "val_loss", "grad_norm", "lr", "tokens_per_s", "samples_per_s", "step_time", "peak_mem_mb",
           "packing_efficiency")


class Board(w.VBox):
    """The lab board: the runs table, an overlay chart of the selected runs, Stop selected.

    Pick the metric, the x-axis (step, samples, tokens or time), EMA smoothing and a log scale; with
    auto-refresh on, a daemon thread re-reads the files every `interval` seconds (widget values only).
    Table and chart come from the same refresh. The early score ranks the selected runs as one cohort.
    """

    def __init__(self, root=None, y: str = "loss", x: str = "samples", interval: float = 5.0,
                 auto_refresh: bool = True):
        from labkit import paths
        from labkit.store import Store  # duckdb: only the board needs it

        self.root = paths.runs_root(root)
        self.interval = interval
        self._store = Store(self.root) if self.root.is_dir() else None
        self.table = RunsTable(self.root, store=self._store)
        lay = {"style": {"description_width": "80px"}, "layout": w.Layout(width="230px")}
        self.metric = w.Dropdown(options=list(METRICS), value=y, description="metric", **lay)
        self.x_axis = w.Dropdown(options=["step", "samples", "tokens", "time"], value=x, description="x-axis", **lay)
        self.smoothing = w.FloatSlider(value=0.0, min=0.0, max=0.95, step=0.05, description="smoothing",
                                       readout_format=".2f", **lay)
        self.log_y = w.Checkbox(value=False, description="log scale", indent=False)
        self.select = w.SelectMultiple(description="overlay", rows=8, layout=w.Layout(width="420px"))
        self.refresh_button = w.Button(description="Refresh", icon="refresh")
        self.refresh_button.on_click(lambda _: self.refresh())
        self.auto = w.Checkbox(value=auto_refresh, description=f"auto-refresh every {interval:g}s", indent=False)
        self.stop_button = w.Button(description="Stop selected", button_style="danger", icon="stop")
        self.stop_button.on_click(lambda _: self.stop_selected())
        self.message = w.HTML()
        self.chart = _chart_widget(alt.Chart(pd.DataFrame({x: [], y: []})).mark_line())
        self._runs: dict[str, Run] = {}
        self._stopping: dict[str, threading.Thread] = {}
        self._refreshing = False  # resetting the options fires `value` events: draw once, at the end
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        for c in (self.metric, self.x_axis, self.smoothing, self.log_y):
            c.observe(lambda _: self._draw() if not self._refreshing else None, names="value")
        # The selection is also the table's cohort: re-rank, then draw.
        self.select.observe(lambda _: self.refresh() if not self._refreshing else None, names="value")
        self.auto.observe(lambda c: self.start() if c["new"] else self._halt.set(), names="value")
        controls = w.VBox([self.metric, self.x_axis, self.smoothing, self.log_y])
        buttons = w.VBox([self.refresh_button, self.auto, self.stop_button])
        super().__init__([self.table, w.HBox([self.select, controls, buttons]), self.message, self.chart])
        self.add_class("labkit-board")
        self.refresh()
        if auto_refresh:
            self.start()

    @property
    def y(self) -> str:
        return self.metric.value

    @property
    def x(self) -> str:
        return self.x_axis.value

    def refresh(self) -> pd.DataFrame:
        """Re-read every run once: the table, the run list, the stop messages and the chart."""
        with self._lock:
            if self._store is None and self.root.is_dir():
                from labkit.store import Store

                self._store = Store(self.root)
                self.table._store = self._store
            self._runs = {r.name: r for r in runs(self.root)}
            keep = tuple(n for n in self.select.value if n in self._runs)
            df = self.table.refresh(cohort=list(keep) if len(keep) > 1 else None)
            self._refreshing = True
            try:
                self.select.options = list(self._runs)
                self.select.value = keep
            finally:
                self._refreshing = False
            self._update_message(df)
            self._draw_locked()
            return df

    def _update_message(self, df: pd.DataFrame) -> None:
        states = dict(zip(df["run"], df["state"])) if len(df) else {}
        waiting = [n for n in self._stopping if states.get(n) not in runfiles.FINAL_STATES]
        done = [f"{n}: {states.get(n)}" for n in self._stopping if n not in waiting]
        for n in list(self._stopping):
            if n not in waiting:
                del self._stopping[n]
        parts = []
        if waiting:
            parts.append(f"stopping {', '.join(waiting)} (saving a checkpoint)")
        if done:
            parts.append(", ".join(done))
        self.message.value = html.escape("; ".join(parts))

    def curves(self) -> alt.TopLevelMixin:
        """The chosen metric against the chosen x for the selected runs, downsampled in DuckDB."""
        from labkit import viz

        names = [n for n in self.select.value if n in self._runs]
        alpha = 1.0 - self.smoothing.value
        df = pd.DataFrame()
        if names and self._store is not None:
            df = self._store.metrics(names, x=self.x, columns=[self.y], smooth=alpha if alpha < 1 else None)
            if self.log_y.value and self.y in df.columns:
                df = df[df[self.y] > 0]
        title = f"{self.y} by {self.x}" + (f", EMA {self.smoothing.value:.2f}" if alpha < 1 else "")
        return viz.curves(df, y=self.y, x=self.x, color="run_id", log_y=self.log_y.value, title=title)

    def _draw(self) -> None:
        with self._lock:
            self._draw_locked()

    def _draw_locked(self) -> None:
        self.chart.chart = self.curves().properties(width=640, height=320)

    def _poll(self) -> None:
        while not self._halt.wait(self.interval):
            if not self.auto.value:
                break
            try:
                self.refresh()
            except Exception as e:  # noqa: BLE001 - the board must keep polling past a half-written file
                self.message.value = f"<span style='color:#c62828'>refresh error: {html.escape(str(e))}</span>"

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._halt.clear()
            self._thread = threading.Thread(target=self._poll, name="labkit-board", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._halt.set()
        super().close()

    def stop_selected(self, timeout: float = 120) -> list[threading.Thread]:
        threads = []
        for name in self.select.value:
            run = self._runs[name]
            if run.state() in runfiles.FINAL_STATES:
                continue
            runfiles.request_stop(run.dir, "stopped from the board")
            t = threading.Thread(target=run.stop, kwargs={"timeout": timeout, "reason": "stopped from the board"},
                                 daemon=True)
            t.start()
            self._stopping[name] = t
            threads.append(t)
        self.message.value = html.escape(f"stopping {', '.join(self._stopping) or 'nothing (no live run selected)'}")
        return threads

    def snapshot(self) -> pd.DataFrame:
        """The runs table as a frame (show `labkit.table.readable(...)` of it, and `curves()`, in reports)."""
        return self.refresh()
