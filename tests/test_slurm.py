"""The Slurm backend against a real single-node Slurm (tests/slurm_cluster.py): the same `Run` API
as local runs, each run its own job, the run directory on the (here: local) shared filesystem."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest
from slurm_cluster import slurm_cluster  # noqa: F401 - the session fixture
from waiting import wait_for

from labkit import runfiles, slurm, sweep
from labkit.config import ConfigError, RunConfig
from labkit.launch import Run, launch, runs
from labkit.table import runs_table

TINY = dict(model="tiny", datasets=["skills"], effective_batch_size=8, max_tokens_per_device=512, max_seq_len=128,
            learning_rate=1e-3, seed=3, keep_checkpoints=1, distributed={"cpu": True})


@pytest.fixture
def on_slurm(slurm_cluster, tmp_path, tiny_dir, monkeypatch):  # noqa: F811
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root = tmp_path / "runs"

    def make(name: str, **kw) -> RunConfig:
        return RunConfig(**{**TINY, "name": name, "runs_root": str(root), **kw})

    yield make
    for run in runs(root):
        if run.is_alive():
            run.kill(grace=2)



def test_a_run_submitted_to_slurm_trains_to_the_end(on_slurm, slurm_cluster):  # noqa: F811
    t0 = time.time()
    # Two processes (gloo): accelerate's rendezvous inside the job, on loopback like a local run.
    run = launch(on_slurm("sl-done", max_steps=4, distributed={"cpu": True, "num_processes": 2}), backend="slurm")
    placement = run.placement()
    assert placement["backend"] == "slurm" and placement["job_id"]
    wait_for(lambda: run.status().get("job_state") in ("RUNNING", "COMPLETED") or
             run.status()["state"] != "pending", what=f"the job to start:\n{run.tail()}")
    started = time.time() - t0
    status = run.wait(timeout=300, poll=0.5)
    assert status["state"] == "finished", run.tail(40)
    assert list(run.metrics()["step"]) == [1, 2, 3, 4]
    assert (run.dir / "final" / "config.json").is_file()
    placement = run.placement()
    assert placement["node"] == slurm_cluster["node"]
    assert "#SBATCH --nodes=1" in (run.dir / "slurm.sbatch").read_text()
    assert f"slurm job {placement['job_id']} on {slurm_cluster['node']}" in list(runs_table(run.dir.parent)["placement"])
    print(f"slurm job start latency {started:.1f}s, run {time.time() - t0:.1f}s")


def test_a_slurm_run_stopped_through_run_stop_exits_cleanly_with_a_checkpoint(on_slurm):
    run = launch(on_slurm("sl-stop", epochs=50), backend="slurm")
    wait_for(lambda: len(run.metrics()) >= 2, timeout=180, what=f"two steps:\n{run.tail()}")
    status = run.stop(timeout=120, reason="enough")
    assert status["state"] == "stopped" and "enough" in status["stop_reason"], run.tail(40)
    ckpt = json.loads((run.checkpoints()[-1] / "checkpoint.json").read_text())
    assert ckpt["step"] == status["step"] == run.metrics()["step"].iloc[-1]
    wait_for(lambda: slurm.job_info(run.placement()["job_id"], fresh=True)["state"] == "COMPLETED",
             what="the job to complete")  # a clean exit, not a cancel


def test_a_queued_job_shows_slurms_reason_and_kill_cancels_it(on_slurm):
    run = launch(on_slurm("sl-later", max_steps=2, slurm={"sbatch_args": ["--begin=now+3600"]}), backend="slurm")
    status = run.status()
    assert status["state"] == "pending" and status["pending_reason"] == "Slurm: BeginTime"
    assert run.is_alive()
    status = run.kill(reason="not today", grace=1)
    assert status["state"] == "stopped" and status["stop_reason"] == "not today"
    assert slurm.job_info(run.placement()["job_id"], fresh=True)["state"] == "CANCELLED"
    assert not run.is_alive()


def test_a_job_that_fails_shows_its_error_in_status(on_slurm):
    run = launch(on_slurm("sl-broken", max_steps=2,
                          slurm={"setup": ["echo 'error: module cuda/12.4 not found' >&2", "exit 3"]}),
                 backend="slurm")
    status = run.wait(timeout=120, poll=0.5)
    assert status["state"] == "failed" and status["died"]
    assert "ended FAILED (exit code 3:0)" in status["error"], status["error"]
    assert "error: module cuda/12.4 not found" in status["error"]


def release_when_queued(n: int, timeout: float = 240) -> None:
    """Releases the held jobs once `n` of them are queued."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["squeue", "-h", "-t", "PD", "-o", "%i %r"], capture_output=True, text=True)
        held = [line.split()[0] for line in out.stdout.splitlines() if line.endswith("JobHeldUser")]
        if len(held) >= n:
            subprocess.run(["scontrol", "release", ",".join(held)], check=True, capture_output=True)
            return
        time.sleep(0.3)


@pytest.mark.slow
def test_a_four_run_sweep_on_slurm_stops_the_worse_half(slurm_cluster, tmp_path, tiny_dir, monkeypatch):  # noqa: F811
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root = tmp_path / "runs"
    # The jobs are held until all four are queued, then released at once, and a decision may wait
    # 8 budgets for a slower run: runs started together are ranked together. (Started minutes
    # apart, as on a busy cluster, later runs face the earlier ones' bar instead: test_sweep.)
    spec = {"name": "sl", "backend": "slurm", "concurrency": 4,
            "base": {**TINY, "datasets": ["knowledge"], "max_steps": 40, "save_final": False,
                     "max_tokens_per_device": 2048, "max_seq_len": 256, "slurm": {"sbatch_args": ["--hold"]}},
            "axes": {"learning_rate": [3e-4, 3e-3, 3e-2, 3e-1]},
            "early_termination": {"probe_samples": 24, "stop_fraction": 0.5, "min_runs": 2, "wait": 8},
            "parameters": {"evaluate_tasks": [], "poll_seconds": 0.5}}
    released = threading.Thread(target=release_when_queued, args=(4,), daemon=True)
    released.start()
    df = sweep.run_sweep(spec, root, poll=0.3, log=lambda _: None)
    released.join(timeout=1)
    rec = sweep.read_sweep(root / "sweeps" / "sl")
    assert len(rec["early_termination"]["stopped"]) == 2, rec["early_termination"]
    assert sorted(df["state"]) == ["finished", "finished", "stopped", "stopped"], df[["run", "state", "error"]]
    for name in df["run"]:
        run = Run(root / name)
        assert run.placement()["backend"] == "slurm" and run.placement()["job_id"]
        assert (root / name / "report.ipynb").is_file()  # the executed notebook is still the run's report
        if name in rec["early_termination"]["stopped"]:
            assert "early termination by sweep sl" in runfiles.read_status(run.dir)["stop_reason"]


def test_a_two_node_job_runs_one_accelerate_per_node_with_slurms_rank_and_the_first_host(tmp_path, monkeypatch):
    import subprocess

    from labkit.launch import _slurm_command

    profile = tmp_path / "slurm.yaml"
    profile.write_text("partition: gpu\naccount: lab\ntime: '12:00:00'\nsetup: [module load cuda]\n")
    monkeypatch.setenv("LABKIT_SLURM_PROFILE", str(profile))
    cfg = RunConfig(**{**TINY, "name": "big", "runs_root": str(tmp_path / "runs"), "slurm": {"time": "01:00:00"},
                       "distributed": {"num_processes": 8, "num_machines": 2}})
    text = slurm.script(cfg, _slurm_command(cfg, cfg.run_dir / "config.yaml"))
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --time=01:00:00", "module load cuda"):
        assert line in text.splitlines(), line  # the config's time wins over the profile's
    srun = next(x for x in text.splitlines() if x.startswith("srun "))
    assert "--num_processes 8 --num_machines 2" in srun and "--multi_gpu" in srun
    assert "--machine_rank $SLURM_NODEID" in srun and "--main_process_ip $MAIN_IP" in srun
    path = tmp_path / "job.sbatch"
    path.write_text(text)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_a_duplicate_key_in_the_slurm_profile_is_refused_naming_file_and_line(tmp_path, monkeypatch):
    profile = tmp_path / "slurm.yaml"
    profile.write_text("partition: gpu\naccount: lab\npartition: debug\n")
    monkeypatch.setenv("LABKIT_SLURM_PROFILE", str(profile))
    cfg = RunConfig(**{**TINY, "name": "dup", "runs_root": str(tmp_path / "runs")})
    with pytest.raises(ConfigError, match=r"slurm.yaml:3: partition: duplicate key \(first at line 1\)"):
        slurm.options(cfg)


def test_a_slurm_run_without_slurm_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    cfg = RunConfig(**{**TINY, "name": "nowhere", "runs_root": str(tmp_path / "runs")})
    with pytest.raises(ConfigError, match="backend: slurm needs sbatch"):
        launch(cfg, backend="slurm")
    assert not cfg.run_dir.exists()
