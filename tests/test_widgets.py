"""Notebook panels on real run directories and a real background run."""

import json
import time

import altair as alt
import pandas as pd
import pytest

from labkit import runfiles
from labkit.config import ConfigError, RunConfig
from labkit.launch import Run, runs
from labkit.widgets import Board, Configurator, Monitor

TINY = dict(model="tiny", datasets=["skills"], effective_batch_size=8, max_tokens_per_device=512,
            max_seq_len=256, learning_rate=1e-3, distributed={"cpu": True})


@pytest.fixture
def base(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield RunConfig(**TINY, name="w1", runs_root=str(tmp_path / "runs"))
    for run in runs(tmp_path / "runs"):  # a failed test must not leave training processes behind
        if run.is_alive():
            run.kill(grace=2)


def fake_run(root, name, state="finished", steps=5, total=10):
    """A run directory as the trainer leaves it (docs/run-dir.md), without training."""
    cfg = RunConfig(**TINY, name=name, runs_root=str(root))
    cfg.save(cfg.run_dir / "config.yaml")
    runfiles.write_json_atomic(cfg.run_dir / runfiles.STATUS, {
        "state": state, "pid": None, "step": steps, "samples": 8 * steps, "total_steps": total,
        "total_samples": 8 * total, "loss": 1.5, "stop_reason": "max_steps"})
    with (cfg.run_dir / runfiles.METRICS).open("w") as fh:
        for s in range(1, steps + 1):
            fh.write(json.dumps({"step": s, "samples": 8 * s, "loss": 3.0 / s, "grad_norm": 1.0 + s}) + "\n")
    return Run(cfg.run_dir)


def test_configurator_validates_every_change(base):
    c = Configurator(base)
    assert c.problems == [] and not c.launch_button.disabled
    c.learning_rate.value = 0.0
    assert c.problems == ["learning_rate: Input should be greater than 0"]
    assert "learning_rate: Input should be greater than 0" in c.messages.value and c.launch_button.disabled
    with pytest.raises(ConfigError, match="learning_rate"):
        _ = c.config
    c.learning_rate.value = 3e-4
    c.name.value = "a/b"
    assert c.problems[0].startswith("name: 'a/b' is not a safe run name")
    c.name.value = "w2"
    c.model.value = "/nowhere"
    assert c.problems == ["model: '/nowhere' is not a Hugging Face checkpoint directory (no config.json)"]
    c.model.value = "tiny"
    c.schedule.value, c.warmup_steps.value, c.max_steps.value = "cosine", 4, 20
    cfg = c.config
    assert (cfg.name, cfg.learning_rate, cfg.schedule, cfg.warmup_steps, cfg.max_steps) == ("w2", 3e-4, "cosine", 4, 20)
    assert cfg.runs_root == base.runs_root and cfg.max_seq_len == 256  # fields not on the form are kept


def test_lr_preview_follows_the_form(base):
    c = Configurator(base)
    c.schedule.value, c.warmup_steps.value, c.max_steps.value = "cosine", 5, 40
    spec = c.preview.chart.to_dict()  # validates against the vega-lite schema
    rows = next(iter(spec["datasets"].values())) if "datasets" in spec else spec["data"]["values"]
    lrs = [r["lr"] for r in rows]
    assert len(lrs) == 40 and max(lrs) == pytest.approx(1e-3) and lrs[0] < lrs[4] and lrs[-1] < lrs[10]


def test_phase_editor_orders_datasets_into_phases(base):
    c = Configurator(base)  # base trains on skills
    c.datasets.value = ("knowledge", "skills")
    c.phased.value = True
    # Phases follow the order the datasets were picked in; the arrow moves one earlier.
    assert [p.datasets for p in c.config.phases] == [["skills"], ["knowledge"]]
    c.move_phase_up(1)
    c.set_phase_epochs("knowledge", 3)
    assert [(p.datasets, p.epochs) for p in c.config.phases] == [(["knowledge"], 3), (["skills"], 1)]
    assert len(c.phase_box.children) == 2
    c.phased.value = False
    assert c.config.datasets == ["knowledge", "skills"] and c.config.phases == []


def test_launch_shows_a_monitor_that_follows_the_run(base):
    c = Configurator(base)
    c.name.value, c.epochs.value = "from-form", 5
    run = c.launch()
    assert c.launched == [run] and run.name == "from-form"
    mon = c.monitors.children[0]
    assert isinstance(mon, Monitor) and mon.polling
    deadline = time.time() + 240
    while (mon.refresh().get("step") or 0) < 2 and time.time() < deadline:
        time.sleep(0.5)
    assert mon.state == "running" and mon.progress.value >= 16 and mon.progress.max > mon.progress.value
    assert mon.progress_label.value.startswith(f"{mon.progress.value}/")
    assert len(mon.chart.chart.to_dict()["datasets"]) == 1

    mon.stop().join(timeout=240)
    status = mon.refresh()
    assert status["state"] == "stopped" and mon.stop_button.disabled and mon.progress.bar_style == "warning"
    deadline = time.time() + 10
    while mon.polling and time.time() < deadline:
        time.sleep(0.2)
    assert not mon.polling  # the poller ends with the run
    assert run.checkpoints()
    again = c.launch()  # same name again: the stopped run is kept, the new one gets the next free name
    assert again is not None and again.name == "from-form-2" and again.checkpoints() == []
    assert run.checkpoints() and run.state() == "stopped"
    assert "launched as <code>from-form-2</code>" in c.messages.value
    assert again.stop(timeout=240)["state"] == "stopped"
    c.monitors.children[0].close()


def test_monitor_reads_a_finished_run(tmp_path):
    run = fake_run(tmp_path, "done", steps=5, total=10)  # ended by max_steps before seeing every sample
    mon = Monitor(run, autostart=False)
    assert mon.state == "finished" and mon.progress.value == mon.progress.max == 80  # a full bar
    assert mon.progress_label.value == "40/80 samples, step 5/10" and mon.stop_button.disabled
    chart = mon.snapshot()
    assert isinstance(chart, alt.TopLevelMixin)
    assert chart.to_dict()["title"] == "done: finished at step 5"


def test_board_lists_runs_and_charts_the_selected(tmp_path):
    fake_run(tmp_path, "a", steps=4)
    fake_run(tmp_path, "b", state="stopped", steps=6)
    board = Board(str(tmp_path))
    try:
        table = board.snapshot()
        assert isinstance(table, pd.DataFrame) and set(table["run"]) == {"a", "b"}
        assert set(table[["run", "state"]].itertuples(index=False, name=None)) == {("a", "finished"),
                                                                                    ("b", "stopped")}
        assert "<table" in board.table.html.value and set(board.select.options) == {"a", "b"}
        board.select.value = ("a", "b")
        spec = board.chart.chart.to_dict()
        rows = [r for d in spec["datasets"].values() for r in d]
        assert {r["run_id"] for r in rows} == {"a", "b"} and len(rows) == 10
    finally:
        board.close()
    board._thread.join(timeout=10)
    assert not board._thread.is_alive()  # closing the board ends its polling


def test_board_picks_metric_x_axis_smoothing_and_log_scale(tmp_path):
    fake_run(tmp_path, "a", steps=6)
    fake_run(tmp_path, "b", steps=6)
    board = Board(str(tmp_path), auto_refresh=False)
    board.select.value = ("a", "b")
    board.metric.value, board.x_axis.value = "grad_norm", "step"
    spec = board.chart.chart.to_dict()
    assert spec["encoding"]["x"]["field"] == "step" and spec["encoding"]["y"]["field"] == "grad_norm"
    raw = [r["grad_norm"] for d in spec["datasets"].values() for r in d if r["run_id"] == "a"]
    board.smoothing.value = 0.8
    board.log_y.value = True
    spec = board.chart.chart.to_dict()
    smooth = [r["grad_norm"] for d in spec["datasets"].values() for r in d if r["run_id"] == "a"]
    assert spec["encoding"]["y"]["scale"]["type"] == "log" and "EMA 0.80" in spec["title"]
    assert smooth[-1] < raw[-1]  # the EMA lags behind the rising grad norm
    # Two runs picked together are one cohort: the table ranks them by early score.
    assert set(board.table.frame["cohort"]) == {"selected"}


def test_board_stop_message_is_cleared_once_the_runs_have_ended(tmp_path):
    fake_run(tmp_path, "a", state="running", steps=3)
    board = Board(str(tmp_path), auto_refresh=False)
    board.select.value = ("a",)
    # "a" has no live process: its status reads failed, so nothing is left to stop.
    board.stop_selected(timeout=1)
    assert "nothing" in board.message.value
    board._stopping["a"] = None  # as if a stop had been sent before the run ended
    board.refresh()
    assert "stopping" not in board.message.value and "a: failed" in board.message.value


def test_monitor_and_board_show_where_a_run_is_placed_and_why_a_queued_one_waits(tmp_path):
    from labkit.launch import LAUNCHER

    placed = fake_run(tmp_path, "placed")
    runfiles.write_json_atomic(placed.dir / LAUNCHER, {"backend": "slurm", "job_id": "42", "node": "gpu-node-3"})
    runfiles.write_json_atomic(placed.dir / "slurm-job.json", {"node": "gpu-node-3", "gpus": "0,1"})
    queued = fake_run(tmp_path, "queued", steps=0)
    runfiles.write_json_atomic(queued.dir / runfiles.STATUS, {"state": "pending", "launched_at": time.time()})
    runfiles.write_json_atomic(queued.dir / LAUNCHER, {"backend": "local", "gpus_needed": 4,
                                                       "pending_reason": "waiting for 4 GPUs: 2 of 4 free"})
    assert "slurm job 42 on gpu-node-3 gpu 0,1" in Monitor(placed, autostart=False).status.value
    assert "queued for 4 GPUs (waiting for 4 GPUs: 2 of 4 free)" in Monitor(queued, autostart=False).status.value
    board = Board(str(tmp_path), auto_refresh=False)
    assert "slurm job 42 on gpu-node-3 gpu 0,1" in board.table.html.value
    assert "waiting for 4 GPUs: 2 of 4 free" in board.table.html.value


def test_monitor_shows_lr_val_loss_throughput_memory_and_eta(tmp_path):
    run = fake_run(tmp_path, "m", state="running", steps=4, total=10)
    with (run.dir / runfiles.METRICS).open("a") as fh:
        fh.write(json.dumps({"step": 5, "samples": 40, "loss": 0.5, "grad_norm": 1.0, "lr": 3e-3, "val_loss": 0.9,
                             "tokens_per_s": 12345.0, "peak_mem_mb": 2048.0, "time": 50.0}) + "\n")
    status = {"state": "running", "step": 5, "total_steps": 10}
    from labkit.widgets import stats_html

    text = stats_html(run.metrics(), status)
    assert "lr 3.00e-03" in text and "val loss 0.9" in text and "12,345 tokens/s" in text
    assert "peak mem 2,048 MB" in text and "ETA 50s" in text


def test_runs_table_widget_keeps_the_chosen_sort_across_refreshes(tmp_path):
    from labkit.widgets import RunsTable

    fake_run(tmp_path, "a", steps=4)
    fake_run(tmp_path, "b", steps=6)
    t = RunsTable(tmp_path)
    t.refresh()
    t.sort.value = "step"
    t.refresh()
    assert t.sort.value == "step" and t.frame["run"].tolist() == ["b", "a"]
    t.where.value = "step < 5"
    assert t.frame["run"].tolist() == ["a"] and "<table" in t.html.value
    t.columns.value = "no_such_field"
    assert "no_such_field" in t.error.value
