"""A dead trainer is seen as dead: pid plus process start time, so a recycled pid cannot fool it.

The runs are real (`accelerate launch` of the tiny model, killed with SIGKILL as the OOM killer
would); the recycled pids are real live processes (`sleep`) standing where a trainer's pid was.
"""

import os
import signal
import subprocess
import time

import pytest
from waiting import wait_for

from labkit import runfiles
from labkit.launch import Run, launch, runs
from labkit.table import runs_table

TINY = dict(model="tiny", datasets=["skills"], effective_batch_size=8, max_tokens_per_device=512,
            max_seq_len=256, learning_rate=1e-3, seed=3, distributed={"cpu": True})



def ticks(pid: int) -> int:
    raw = open(f"/proc/{pid}/stat", "rb").read()
    return int(raw[raw.rfind(b")") + 2:].split()[19])


@pytest.fixture
def stranger():
    """A live process that is not a trainer, standing in for whoever got a dead trainer's pid."""
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


def fake_run(tmp_path, status: dict, launcher: dict | None = None):
    run_dir = tmp_path / "runs" / "ghost"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("name: ghost\n")
    runfiles.write_json_atomic(run_dir / runfiles.STATUS, status)
    if launcher is not None:
        runfiles.write_json_atomic(run_dir / "launcher.json", launcher)
    (run_dir / runfiles.METRICS).write_text("".join(f'{{"step": {s}, "loss": 1.0}}\n' for s in range(1, 8)))
    return run_dir


@pytest.mark.slow
def test_a_trainer_killed_with_sigkill_reads_as_died_with_its_last_step(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    from labkit.config import RunConfig

    run = launch(RunConfig(**TINY, name="doomed", epochs=20, runs_root=str(tmp_path / "runs")))
    try:
        wait_for(lambda: len(run.metrics()) >= 2, what=f"'doomed' to train:\n{run.tail()}")
        os.kill(runfiles.read_status(run.dir)["pid"], signal.SIGKILL)
        wait_for(lambda: not run.is_alive(), timeout=60, what="the run's processes to exit")
        last = int(run.metrics()["step"].iloc[-1])
        status = Run(run.dir).status()  # a fresh Run, as after a notebook restart
        assert status["state"] == "failed" and status["died"] is True
        assert status["step"] == last and f"died at step {last}" in status["error"]
        row = runs_table(run.dir.parent).iloc[0]  # what `labkit ls` prints
        assert row["state"] == "failed" and row["step"] == last
        assert runfiles.read_status(run.dir)["state"] == "running"  # the trainer's file is left as it was
    finally:
        for r in runs(tmp_path / "runs"):
            if r.is_alive():
                r.kill(grace=2)


def test_a_recycled_pid_with_another_start_time_is_not_the_trainer(tmp_path, stranger):
    run_dir = fake_run(tmp_path, {"state": "running", "pid": stranger.pid, "pid_start": ticks(stranger.pid) - 50,
                                  "started_at": time.time() - 5, "step": 7})
    status = Run(run_dir).status()
    assert status["state"] == "failed" and status["died"] and status["step"] == 7
    assert not Run(run_dir).is_alive()


def test_a_pid_that_started_after_the_trainer_did_is_not_the_trainer(tmp_path, stranger):
    # A trainer that recorded no start time: its pid now belongs to a process younger than the run.
    run_dir = fake_run(tmp_path, {"state": "running", "pid": stranger.pid, "started_at": time.time() - 3600,
                                  "step": 7})
    assert Run(run_dir).status()["state"] == "failed"


def test_a_recycled_process_group_id_is_not_the_runs_group(tmp_path, stranger):
    run_dir = fake_run(tmp_path, {"state": "running", "pid": None, "step": 7, "started_at": time.time() - 60},
                       {"backend": "local", "host": os.uname().nodename, "pid": stranger.pid, "pgid": stranger.pid,
                        "pid_start": ticks(stranger.pid) + 1, "launched_at": time.time() - 60})
    assert Run(run_dir).status()["state"] == "failed"
    before = Run(run_dir).kill(grace=1)
    assert stranger.poll() is None, "kill() signalled a process that is not the run's"
    assert before["state"] == "stopped"


def test_a_live_trainer_with_its_own_start_time_reads_running(tmp_path, stranger):
    run_dir = fake_run(tmp_path, {"state": "running", "pid": stranger.pid, "pid_start": ticks(stranger.pid),
                                  "started_at": time.time(), "step": 7})
    assert Run(run_dir).status()["state"] == "running" and Run(run_dir).is_alive()
    stranger.kill()
    stranger.wait()
    assert Run(run_dir).status()["state"] == "failed"


def test_effective_state_is_the_one_function_for_other_views(tmp_path, stranger):
    from labkit.liveness import effective_state, effective_status, identity

    me = identity()
    assert me["pid"] == os.getpid() and me["pid_start"] == ticks(os.getpid())
    run_dir = fake_run(tmp_path, {"state": "running", **identity(stranger.pid), "started_at": time.time()})
    assert effective_state(run_dir) == "running"
    stranger.kill()
    stranger.wait()
    assert effective_state(run_dir) == "failed" and effective_status(run_dir)["step"] == 7
    runfiles.update_status(run_dir, state="finished")
    assert effective_state(run_dir) == "finished"


@pytest.mark.slow
def test_workers_orphaned_by_a_killed_launcher_keep_the_run_alive_until_kill_ends_them(tmp_path, tiny_dir,
                                                                                    monkeypatch):
    # torchrun starts every worker in a session of its own: a kill -9 of the launcher leaves them running.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    from labkit.config import RunConfig
    from labkit.liveness import run_processes, start_time

    run = launch(RunConfig(**{**TINY, "distributed": {"cpu": True, "num_processes": 2}}, name="orphans",
                           epochs=20, runs_root=str(tmp_path / "runs")))
    try:
        wait_for(lambda: len(run.metrics()) >= 1, what=f"'orphans' to train:\n{run.tail()}")
        launcher = run.launcher()
        os.kill(launcher["pgid"], signal.SIGKILL)
        time.sleep(1)
        workers = run_processes(launcher["run_id"], max_age=0)
        assert len(workers) == 2 and launcher["pgid"] not in workers
        assert Run(run.dir).is_alive() and Run(run.dir).status()["state"] == "running"
        assert run.kill(grace=2)["state"] == "stopped"
        assert run_processes(launcher["run_id"], max_age=0) == []
        assert all(start_time(p) is None for p in workers)  # gone (or zombies, if nobody reaps orphans here)
    finally:
        for r in runs(tmp_path / "runs"):
            if r.is_alive():
                r.kill(grace=2)

