"""Preemption and crashes, as a cluster does them: SIGTERM (twice), kill -9 during a background evaluation,
resume at max_steps, and a run directory owned by one trainer at a time."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trainer_runs import WORKER, tiny_exact
from waiting import wait_for

from labkit import checkpoint, runfiles
from labkit.config import RunConfig
from labkit.launch import _child_env
from labkit.train import checkpoints, train

ROOT = Path(__file__).resolve().parent.parent


def cfg_for(tmp_path, **kw) -> RunConfig:
    return tiny_exact(tmp_path, **{"name": "p", "effective_batch_size": 8, **kw})


def start(cmd: list[str]) -> subprocess.Popen:
    env = {**_child_env(cpu=True), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            start_new_session=True)


def steps_in_file(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / runfiles.METRICS).read_text().splitlines()]


@pytest.mark.slow
def test_sigterm_twice_checkpoints_at_the_next_step_and_stops_resumably(tmp_path):
    cfg = cfg_for(tmp_path, epochs=20)
    path = cfg.save(cfg.run_dir / "config.yaml")
    proc = start([sys.executable, "-m", "labkit.train", str(path)])
    wait_for(lambda: len(runfiles.read_metrics(cfg.run_dir)) >= 2)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # the grace period's reminder must not break the checkpoint
    out, _ = proc.communicate(timeout=120)
    assert time.time() - sent < 60 and proc.returncode == 0, out[-3000:]
    status = runfiles.read_status(cfg.run_dir)
    assert status["state"] == "stopped" and status["stop_reason"].startswith("SIGTERM"), status
    last = checkpoints(cfg.run_dir)[-1]
    assert checkpoint.read_position(last)["step"] == status["step"] == runfiles.read_metrics(cfg.run_dir)[-1]["step"]
    assert "SIGTERM received" in out and not (cfg.run_dir / "final").exists()
    resumed = train(cfg.with_updates(resume=True, max_steps=status["step"] + 2))
    assert resumed["state"] == "finished"
    assert steps_in_file(cfg.run_dir) == list(range(1, status["step"] + 3))


@pytest.mark.slow
def test_kill_9_during_a_background_evaluation_reruns_it_after_resume(tmp_path):
    cfg = cfg_for(tmp_path, max_steps=2, eval_every_samples=16, eval_tasks=["labkit_knowledge_mc"], eval_limit=2)
    path = cfg.save(cfg.run_dir / "config.yaml")
    proc = start([sys.executable, str(WORKER), str(path), "--kill-in", "eval"])
    proc.communicate(timeout=300)
    assert proc.returncode == -9
    pending = cfg.run_dir / "evals" / "pending"
    assert [p.name for p in pending.iterdir()] == ["step-00000002"]
    assert not (cfg.run_dir / "evals" / "2.json").exists()
    resumed = train(cfg.with_updates(resume=True))
    assert resumed["state"] == "finished" and resumed["step"] == 2 and resumed["pending_evals"] == []
    assert json.loads((cfg.run_dir / "evals" / "2.json").read_text())["step"] == 2
    assert not list(pending.iterdir())


def test_resume_from_the_checkpoint_at_max_steps_trains_no_extra_step(tmp_path):
    cfg = cfg_for(tmp_path, max_steps=3, save_every_samples=8)
    assert train(cfg)["step"] == 3
    again = train(cfg.with_updates(resume=True))
    assert again["state"] == "finished" and again["step"] == 3
    assert steps_in_file(cfg.run_dir) == [1, 2, 3]


def test_a_finished_run_is_not_restarted_without_resume_or_overwrite(tmp_path):
    cfg = cfg_for(tmp_path, max_steps=2, save_every_samples=8)
    assert train(cfg)["state"] == "finished"
    before = (cfg.run_dir / runfiles.METRICS).read_text()
    refused = train(cfg)
    assert refused["state"] == "refused" and "set resume: true" in refused["error"]
    assert (cfg.run_dir / runfiles.METRICS).read_text() == before
    assert runfiles.read_status(cfg.run_dir)["state"] == "finished"
    over = train(cfg.with_updates(max_steps=1), overwrite=True)
    assert over["state"] == "finished" and steps_in_file(cfg.run_dir) == [1]
    assert [checkpoint.read_position(c)["step"] for c in checkpoints(cfg.run_dir)] == [1]


def test_a_second_trainer_on_a_live_run_dir_is_refused_and_touches_nothing(tmp_path):
    cfg = cfg_for(tmp_path, max_steps=1)
    cfg.run_dir.mkdir(parents=True)
    runfiles.write_json_atomic(cfg.run_dir / runfiles.STATUS, {"state": "running", "step": 5})
    live = checkpoint.RunLock(cfg.run_dir)
    live.acquire()  # the live trainer
    try:
        refused = train(cfg)
    finally:
        live.release()
    assert refused["state"] == "refused" and "another trainer" in refused["error"]
    assert f"pid {os.getpid()}" in refused["error"]
    assert runfiles.read_status(cfg.run_dir) == {"state": "running", "step": 5}


def test_python_m_labkit_train_on_a_finished_run_exits_2_and_keeps_its_metrics(tmp_path):
    cfg = cfg_for(tmp_path, max_steps=1)
    assert train(cfg)["state"] == "finished"
    before = (cfg.run_dir / runfiles.METRICS).read_text()
    from labkit.train import main

    assert main([str(cfg.run_dir / "config.yaml")]) == 2
    assert (cfg.run_dir / runfiles.METRICS).read_text() == before


@pytest.mark.slow
def test_sigterm_to_the_launcher_of_a_two_process_fsdp_run_stops_both_ranks_with_a_checkpoint(tmp_path):
    # Kubernetes signals the container's first process only: torchrun forwards SIGTERM to its workers.
    from labkit.launch import free_port, launch_command

    cfg = cfg_for(tmp_path, epochs=50, distributed={"cpu": True, "num_processes": 2, "strategy": "fsdp"})
    path = cfg.save(cfg.run_dir / "config.yaml")
    proc = start(launch_command(cfg, path, port=free_port(), cuda=False))
    wait_for(lambda: len(runfiles.read_metrics(cfg.run_dir)) >= 2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    status = runfiles.read_status(cfg.run_dir)
    assert status["state"] == "stopped" and status["stop_reason"].startswith("SIGTERM"), out[-3000:]
    assert status["strategy"] == "fsdp" and status["world_size"] == 2
    assert checkpoint.read_position(checkpoints(cfg.run_dir)[-1])["step"] == status["step"]
    assert "[rank 1] SIGTERM received" in out
