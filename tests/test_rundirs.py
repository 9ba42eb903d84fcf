"""No run is ever deleted to reuse its name: the rule of labkit/rundirs.py, as the Python API, the
configurator and sweeps apply it (the CLI: tests/test_cli.py)."""

from __future__ import annotations

import pytest

from labkit import rundirs, runfiles
from labkit.config import ConfigError, RunConfig
from labkit.launch import launch

TINY = dict(model="tiny", datasets=["skills"], effective_batch_size=8, max_tokens_per_device=512, max_seq_len=256,
            distributed={"cpu": True})


def old_run(root, name, state="stopped"):
    """A run directory as a stopped trainer leaves it: config, status, metrics and a checkpoint."""
    cfg = RunConfig(**TINY, name=name, runs_root=str(root))
    cfg.save(cfg.run_dir / "config.yaml")
    runfiles.write_json_atomic(cfg.run_dir / runfiles.STATUS, {"state": state, "step": 3})
    (cfg.run_dir / runfiles.METRICS).write_text('{"step": 1, "loss": 2.0}\n')
    ck = cfg.run_dir / "checkpoints" / "step-00000003"
    ck.mkdir(parents=True)
    (ck / "checkpoint.json").write_text('{"step": 3}')
    return cfg


def untouched(cfg) -> bool:
    return (runfiles.read_status(cfg.run_dir).get("state") in ("stopped", "failed", "finished")
            and (cfg.run_dir / "checkpoints" / "step-00000003" / "checkpoint.json").is_file())


@pytest.mark.parametrize("state", ["stopped", "failed", "finished"])
def test_the_api_refuses_an_existing_name_and_names_both_ways_forward(tmp_path, state):
    cfg = old_run(tmp_path, "demo", state)
    with pytest.raises(rundirs.RunExistsError) as e:
        launch(cfg)
    assert "resume=True" in str(e.value) and "overwrite=True" in str(e.value) and "--resume" in str(e.value)
    assert untouched(cfg)


def test_overwrite_moves_the_old_run_to_the_trash(tmp_path):
    cfg = old_run(tmp_path, "demo")
    assert rundirs.claim_run_dir(cfg, overwrite=True) == cfg
    assert not cfg.run_dir.exists()
    [moved] = (tmp_path / rundirs.TRASH).iterdir()
    assert moved.name.startswith("demo-") and (moved / "checkpoints" / "step-00000003").is_dir()
    assert runfiles.read_status(moved)["state"] == "stopped"


def test_resume_keeps_the_run_and_sets_resume(tmp_path):
    cfg = old_run(tmp_path, "demo")
    claimed = rundirs.claim_run_dir(cfg, resume=True)
    assert claimed.resume and claimed.name == "demo" and untouched(cfg)
    with pytest.raises(ConfigError, match="not both"):
        rundirs.claim_run_dir(cfg, resume=True, overwrite=True)


def test_rename_picks_the_next_free_name(tmp_path):
    cfg = old_run(tmp_path, "demo")
    old_run(tmp_path, "demo-2")
    assert rundirs.claim_run_dir(cfg, on_exists="rename").name == "demo-3"
    assert rundirs.unique_name(tmp_path, "demo-3") == "demo-3"
    assert untouched(cfg)


def test_a_folder_without_run_files_is_free(tmp_path):
    cfg = RunConfig(**TINY, name="s__a", runs_root=str(tmp_path))
    cfg.run_dir.mkdir()
    (cfg.run_dir / "report.ipynb").write_text("{}")  # what a sweep writes before the run starts
    assert rundirs.claim_run_dir(cfg) == cfg


def test_the_configurator_launches_under_a_new_name_and_keeps_the_old_run(tmp_path, tiny_dir, monkeypatch):
    from labkit.widgets import Configurator

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = old_run(tmp_path, "demo")
    form = Configurator(cfg.with_updates(max_steps=1))
    run = form.launch()
    try:
        assert run is not None and run.name == "demo-2" and untouched(cfg)
        assert "exists (kept)" in form.messages.value
    finally:
        run.stop(timeout=120)
        form.monitors.children[0].close()


def test_a_configurator_launch_that_is_refused_leaves_the_old_run_where_it_was(tmp_path, tiny_dir):
    from labkit.widgets import Configurator

    cfg = old_run(tmp_path, "demo")
    form = Configurator(cfg.with_updates(max_steps=1))
    # Two machines and no main_process_ip: launch() refuses it, after its checks and before any claim.
    assert form.launch(overwrite=True, **{"distributed.num_machines": 2}) is None
    assert "cannot start" in form.messages.value and "main_process_ip" in form.messages.value
    assert untouched(cfg) and not (tmp_path / ".trash").exists()


def test_a_sweep_overwrite_moves_its_old_runs_aside(tmp_path, tiny_dir):
    from labkit.sweep import SweepError, run_sweep

    cfg = old_run(tmp_path, "sw__a")
    spec = {"name": "sw", "base": {**TINY, "datasets": ["no_such_data"]}, "runs": [{"name": "a"}],
            "parameters": {"evaluate_tasks": []}}
    with pytest.raises(SweepError, match="already exist"):
        run_sweep(spec, tmp_path, log=lambda _: None)
    assert untouched(cfg)
    run_sweep(spec, tmp_path, overwrite=True, log=lambda _: None)  # its one run fails fast: bad dataset
    [moved] = (tmp_path / rundirs.TRASH).glob("sw__a-*")
    assert (moved / "checkpoints" / "step-00000003" / "checkpoint.json").is_file()


def test_a_live_run_of_the_same_name_is_left_alone(tmp_path):
    import subprocess

    cfg = old_run(tmp_path, "demo", "running")
    proc = subprocess.Popen(["sleep", "60"])  # stands in for its trainer
    try:
        runfiles.update_status(cfg.run_dir, pid=proc.pid)
        assert rundirs.claim_run_dir(cfg, on_exists="rename").name == "demo-2"  # the configurator
        for kw in ({}, {"overwrite": True}, {"resume": True}):
            with pytest.raises(ConfigError, match="is still running; stop it first"):
                rundirs.claim_run_dir(cfg, **kw)
        assert (cfg.run_dir / "checkpoints" / "step-00000003").is_dir() and not (tmp_path / rundirs.TRASH).exists()
    finally:
        proc.kill()
        proc.wait()
