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

from labkit import catalog, runfiles
from labkit.config import ConfigError, RunConfig, from_dict
from labkit.launch import Run, launch, overview, runs

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
            run = launch(self.config, **kwargs)
        except ConfigError as e:
            self.messages.value = _problems_html(str(e).replace("\n  - ", "\n").splitlines())
            return None
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
        self.stop_button = w.Button(description="Stop", button_style="danger", icon="stop")
        self.stop_button.on_click(lambda _: self.stop())
        self.chart = _chart_widget(self._chart(pd.DataFrame()))
        self.state: str | None = None
        self._rows = -1
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        super().__init__([self.title, w.HBox([self.progress, self.progress_label, self.stop_button]),
                          self.status, self.chart])
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
            self.status.value = (f"<b>{html.escape(str(self.state))}</b>{loss}"
                                 + (f" &mdash; {html.escape(str(detail))}" if detail else ""))
            self.stop_button.disabled = self.state in runfiles.FINAL_STATES
            df = self.run.metrics()
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
        self.status.value = "<b>stopping</b> &mdash; waiting for the trainer to save a checkpoint"
        t = threading.Thread(target=self.run.stop, kwargs={"timeout": timeout, "reason": "stopped from the monitor"},
                             daemon=True)
        t.start()
        return t

    def close(self) -> None:
        """Stop polling and close the panel's widgets."""
        self._halt.set()
        for widget in (self.title, self.progress, self.progress_label, self.stop_button, self.status, self.chart,
                       *self.children):
            widget.close()
        super().close()

    def snapshot(self) -> alt.TopLevelMixin:
        """The loss / grad-norm chart, titled with the run's state, for executed notebooks."""
        status = self.refresh()
        return self._chart(self.run.metrics()).properties(
            title=f"{self.run.name}: {status.get('state')} at step {status.get('step')}")


# -- all runs --------------------------------------------------------------------------------------


class Board(w.VBox):
    """Every run under `root`, with a comparison chart of the selected runs and Stop / Refresh buttons."""

    def __init__(self, root: str = "runs", y: str = "loss", x: str = "samples"):
        self.root, self.y, self.x = root, y, x
        self.table = w.HTML()
        self.select = w.SelectMultiple(description="compare", rows=6, layout=w.Layout(width="360px"))
        self.select.observe(lambda _: self._draw() if not self._refreshing else None, names="value")
        self.refresh_button = w.Button(description="Refresh", icon="refresh")
        self.refresh_button.on_click(lambda _: self.refresh())
        self.stop_button = w.Button(description="Stop selected", button_style="danger", icon="stop")
        self.stop_button.on_click(lambda _: self.stop_selected())
        self.message = w.HTML()
        self.chart = _chart_widget(alt.Chart(pd.DataFrame({x: [], y: []})).mark_line())
        self._runs: dict[str, Run] = {}
        from labkit.store import Store  # duckdb: only the board needs it

        self._refreshing = False  # resetting the options fires `value` events: draw once, at the end
        self._store = Store(root)
        self.overview = pd.DataFrame()
        super().__init__([self.table, w.HBox([self.select, w.VBox([self.refresh_button, self.stop_button])]),
                          self.message, self.chart])
        self.add_class("labkit-board")
        self.refresh()

    def refresh(self) -> pd.DataFrame:
        self._runs = {r.name: r for r in runs(self.root)}
        self.overview = overview(self.root, store=self._store)
        self.table.value = self.overview.to_html(index=False, na_rep="-", float_format=lambda v: f"{v:.4g}",
                                                 border=0) if len(self.overview) else "<i>no runs yet</i>"
        keep = tuple(n for n in self.select.value if n in self._runs)
        self._refreshing = True
        try:
            self.select.options = list(self._runs)
            self.select.value = keep
        finally:
            self._refreshing = False
        self._draw()
        return self.overview

    def curves(self) -> alt.TopLevelMixin:
        """`y` against `x` for the selected runs, downsampled by the store."""
        from labkit import viz

        names = list(self.select.value)
        df = self._store.metrics(names, x=self.x, columns=[self.y]) if names else pd.DataFrame()
        return viz.curves(df, y=self.y, x=self.x, color="run_id")

    def _draw(self) -> None:
        self.chart.chart = self.curves()

    def stop_selected(self, timeout: float = 120) -> list[threading.Thread]:
        threads = []
        for name in self.select.value:
            t = threading.Thread(target=self._runs[name].stop, kwargs={"timeout": timeout, "reason": "board"},
                                 daemon=True)
            t.start()
            threads.append(t)
        self.message.value = f"stopping {', '.join(self.select.value) or 'nothing'}"
        return threads

    def snapshot(self) -> pd.DataFrame:
        return self.refresh()
