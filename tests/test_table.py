"""The runs table: its columns, readable cells, --where/--sort, and the early score within a cohort."""

from __future__ import annotations

import json
import time

import pytest

from labkit import runfiles, table
from labkit.config import RunConfig


def make_run(root, name, *, lr=1e-3, ebs=8, steps=10, total_steps=10, state="finished", grad=1.0, loss=2.0,
             evals=None, started=None):
    cfg = RunConfig(name=name, runs_root=str(root), datasets=["skills"], learning_rate=lr, effective_batch_size=ebs,
                    schedule="cosine", seed=7)
    d = cfg.run_dir
    cfg.save(d / "config.yaml")
    t0 = started or time.time() - 100
    runfiles.write_json_atomic(d / runfiles.STATUS, {
        "state": state, "step": steps, "samples": steps * ebs, "total_steps": total_steps,
        "total_samples": total_steps * ebs, "started_at": t0, "ended_at": t0 + 95, "pid": None})
    with (d / runfiles.METRICS).open("w") as fh:
        for s in range(1, steps + 1):
            row = {"step": s, "samples": s * ebs, "loss": loss - 0.01 * s, "grad_norm": grad, "lr": lr, "time": s}
            if s == steps:
                row["val_loss"] = loss + 0.5
            fh.write(json.dumps(row) + "\n")
    if evals:
        (d / "evals").mkdir()
        (d / "evals" / f"{steps}.json").write_text(json.dumps({"step": steps, "samples": steps * ebs, "results": [
            {"task": task, "metric": metric, "value": value} for (task, metric), value in evals.items()]}))
    return d


def write_sweep(root, name, runs, probe_samples):
    d = root / "sweeps" / name
    d.mkdir(parents=True)
    (d / "sweep.json").write_text(json.dumps({
        "name": name, "runs": [{"name": r, "key": r, "overrides": {}} for r in runs],
        "early_termination": {"probe_samples": probe_samples, "stop_fraction": 0.5}}))


def test_table_has_config_state_progress_losses_times_columns(tmp_path):
    make_run(tmp_path, "a", lr=3e-3, ebs=16)
    make_run(tmp_path, "b", state="stopped", steps=4, total_steps=10)
    df = table.runs_table(tmp_path)
    assert list(df.columns[:4]) == ["run", "state", "progress", "step"]
    for col in ("learning_rate", "effective_batch_size", "schedule", "warmup_steps", "seed", "cohort",
                "early_score", "loss", "val_loss", "started", "duration"):
        assert col in df.columns
    b = df.set_index("run").loc["b"]
    assert b["state"] == "stopped" and b["progress"] == pytest.approx(0.4)
    assert b["loss"] == pytest.approx(2.0 - 0.04) and b["val_loss"] == pytest.approx(2.5)
    assert b["duration"] == pytest.approx(95, abs=1)
    text = table.readable(df).set_index("run").loc["b"]
    assert text["progress"] == "40%" and text["duration"] == "1m35s" and len(text["started"]) == 16


def test_user_chosen_columns_where_and_sort(tmp_path):
    make_run(tmp_path, "slow", lr=1e-4)
    make_run(tmp_path, "fast", lr=1e-2)
    make_run(tmp_path, "mid", lr=1e-3, state="failed")
    df = table.runs_table(tmp_path, columns=["learning_rate", "adam_beta2"], sort="learning_rate")
    assert "adam_beta2" in df.columns and "schedule" not in df.columns
    assert df["run"].tolist() == ["slow", "mid", "fast"]
    df = table.runs_table(tmp_path, where="learning_rate >= 1e-3 AND state = 'finished'")
    assert df["run"].tolist() == ["fast"]
    with pytest.raises(KeyError, match="no_such_field"):
        table.runs_table(tmp_path, columns=["no_such_field"])
    with pytest.raises(ValueError, match="--where"):
        table.runs_table(tmp_path, where="nonsense >")


def test_eval_scores_are_columns(tmp_path):
    make_run(tmp_path, "e", evals={("knowledge_mc", "acc"): 0.75})
    df = table.runs_table(tmp_path)
    assert df.loc[0, "knowledge_mc/acc"] == pytest.approx(0.75)


def test_early_score_is_ranked_within_a_sweep_and_not_for_incomplete_runs(tmp_path):
    # The paper's rule: lower early grad norm and higher early loss rank better.
    make_run(tmp_path, "s__good", grad=0.5, loss=3.0)
    make_run(tmp_path, "s__bad", grad=2.0, loss=1.0)
    make_run(tmp_path, "s__young", grad=0.1, loss=9.0, steps=2, state="running")  # has not reached 40 samples
    make_run(tmp_path, "loner", grad=0.1, loss=9.0)  # in no cohort: no score
    write_sweep(tmp_path, "s", ["s__good", "s__bad", "s__young"], probe_samples=40)
    df = table.runs_table(tmp_path).set_index("run")
    assert df.loc["s__good", "early_score"] > df.loc["s__bad", "early_score"]
    assert df.loc["s__good", "early_rank"] == 1 and df.loc["s__bad", "early_rank"] == 2
    assert df.loc["s__young", "cohort"] == "s" and df.loc["s__young", "early_score"] != df.loc["s__young", "early_score"]
    assert df.loc["loner", "cohort"] == "" and df["early_score"].isna()["loner"]


def test_a_complete_runs_score_does_not_move_when_unrelated_runs_are_added(tmp_path):
    make_run(tmp_path, "s__a", grad=0.5, loss=3.0)
    make_run(tmp_path, "s__b", grad=2.0, loss=1.0)
    write_sweep(tmp_path, "s", ["s__a", "s__b"], probe_samples=40)
    before = table.runs_table(tmp_path).set_index("run")["early_score"]
    make_run(tmp_path, "other", grad=0.01, loss=99.0)
    after = table.runs_table(tmp_path).set_index("run")["early_score"]
    assert after["s__a"] == before["s__a"] and after["s__b"] == before["s__b"]


def test_runs_picked_by_hand_form_a_cohort(tmp_path):
    make_run(tmp_path, "x", grad=0.5, loss=3.0)
    make_run(tmp_path, "y", grad=2.0, loss=1.0)
    make_run(tmp_path, "z", grad=1.0, loss=2.0)
    df = table.runs_table(tmp_path, cohort=["x", "y"], first_samples=40).set_index("run")
    assert df.loc["x", "cohort"] == "selected" and df.loc["x", "early_rank"] == 1
    assert df["early_score"].isna()["z"]


def test_html_table_sorts_and_filters_offline(tmp_path):
    make_run(tmp_path, "a")
    page = table.to_html(table.runs_table(tmp_path), links={"a": "a/report.html"})
    assert "<table id=\"runs\" class=\"labkit-runs\"" in page and "data-sort=" in page
    assert "addEventListener('click'" in page and "runs-filter" in page
    assert "http" not in page.replace("a/report.html", "")
    assert '<a href="a/report.html">a</a>' in page


def test_placement_says_where_each_run_trains_and_why_a_queued_one_waits(tmp_path):
    from labkit.launch import LAUNCHER

    on_gpus = make_run(tmp_path, "gpus", state="finished")
    runfiles.write_json_atomic(on_gpus / LAUNCHER, {"backend": "local", "node": "node1", "gpus": [0, 1]})
    queued = make_run(tmp_path, "queued", state="pending", steps=0)
    # Just launched: alive by the launch window, as while launch() waits for GPUs.
    runfiles.write_json_atomic(queued / runfiles.STATUS, {"state": "pending", "launched_at": time.time()})
    runfiles.write_json_atomic(queued / LAUNCHER, {"backend": "local", "node": "node1", "gpus_needed": 2,
                                                    "pending_reason": "waiting for 2 free GPUs"})
    df = table.runs_table(tmp_path).set_index("run")
    assert df.loc["gpus", "placement"] == "node1 gpu 0,1"
    assert df.loc["queued", "placement"] == "queued for 2 GPUs (waiting for 2 free GPUs)"
