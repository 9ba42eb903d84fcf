"""GPU slots on one node, without GPUs: LABKIT_GPUS names four, the runs train on CPU but each one
gets its CUDA_VISIBLE_DEVICES set and recorded, and the scheduler's decisions are checked against
what the live trainer processes really have in their environment (/proc/PID/environ)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from notebook_files import parameterized_notebook
from waiting import wait_for

from labkit import gpus, runfiles, sweep
from labkit.config import ConfigError, RunConfig
from labkit.launch import Run, launch, runs
from labkit.liveness import run_processes, start_time

TINY = dict(model="tiny", datasets=["skills"], effective_batch_size=8, max_tokens_per_device=512, max_seq_len=128,
            learning_rate=1e-3, seed=3, save_final=False, keep_checkpoints=1)


@pytest.fixture
def four_gpus(monkeypatch):
    monkeypatch.setenv("LABKIT_GPUS", "0,1,2,3")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture
def sleepers():
    procs = []

    def start() -> subprocess.Popen:
        procs.append(subprocess.Popen(["sleep", "300"], start_new_session=True))
        return procs[-1]

    yield start
    for p in procs:
        p.kill()
        p.wait()


def holder(root: Path, name: str, proc: subprocess.Popen, gpu_ids: list[str] | None, needed: int = 0,
           queued_at: float = 0.0) -> Path:
    """A run dir whose launcher.json says `proc` holds `gpu_ids` (or waits for `needed`)."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    runfiles.write_json_atomic(run_dir / "launcher.json", {
        "backend": "local", "host": socket.gethostname(), "pid": proc.pid, "pgid": proc.pid,
        "pid_start": start_time(proc.pid), "gpus": gpu_ids, "gpus_needed": needed or len(gpu_ids or []),
        "queued_at": queued_at})
    return run_dir


# -- the policy ---------------------------------------------------------------------------------


def test_plan_packs_runs_oldest_first_and_backfills_small_ones():
    held = {"a": ["0"]}
    queue = [(1.0, "big", 4), (2.0, "two", 2), (3.0, "one", 1), (4.0, "one-more", 1)]
    assert gpus.plan(["0", "1", "2", "3"], held, queue) == {"two": ["1", "2"], "one": ["3"]}
    assert gpus.plan(["0", "1", "2", "3"], {}, queue) == {"big": ["0", "1", "2", "3"]}


def test_node_gpus_come_from_labkit_gpus_then_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    monkeypatch.delenv("LABKIT_GPUS", raising=False)
    assert gpus.node_gpus() == ["4", "5"]
    monkeypatch.setenv("LABKIT_GPUS", "0, 1,2")
    assert gpus.node_gpus() == ["0", "1", "2"]
    monkeypatch.setenv("LABKIT_GPUS", "")
    assert gpus.node_gpus() == []


def test_assignments_are_found_again_from_the_run_dirs_and_a_dead_run_frees_its_gpus(tmp_path, sleepers,
                                                                                     four_gpus):
    root = tmp_path / "runs"
    a = sleepers()
    holder(root, "a", a, ["0", "1"])
    holder(root, "b", sleepers(), ["2"])
    me = root / "me"
    me.mkdir()
    started: list[list[str]] = []
    placed = gpus.place(me, 3, time.time(), start=started.append, gpus=["0", "1", "2", "3"])
    assert placed.gpus is None and not started
    assert placed.reason == "waiting for 3 GPUs: 1 of 4 free (a has 0,1, b has 2)"
    assert gpus.usage(root)["owner"] == {"0": "a", "1": "a", "2": "b", "3": None}  # what the Board shows
    a.kill()
    a.wait()  # as kill -9 leaves it: launcher.json still names GPUs 0,1
    placed = gpus.place(me, 3, time.time(), start=started.append, gpus=["0", "1", "2", "3"])
    assert placed.gpus == started[0] == ["0", "1", "3"]


def test_a_queued_run_ahead_keeps_its_turn(tmp_path, sleepers):
    root = tmp_path / "runs"
    holder(root, "a", sleepers(), ["0", "1"])
    holder(root, "first", sleepers(), None, needed=2, queued_at=1.0)  # queued before us, fits in 2,3
    me = root / "me"
    me.mkdir()
    placed = gpus.place(me, 2, 2.0, start=lambda g: None, gpus=["0", "1", "2", "3"])
    assert placed.gpus is None and "1 other run queued" in placed.reason


def test_a_run_needing_more_gpus_than_the_node_has_is_refused_before_it_starts(tmp_path, four_gpus):
    with pytest.raises(ConfigError, match="the run needs 8 GPUs, this node has 4"):
        launch(RunConfig(**TINY, name="huge", runs_root=str(tmp_path / "runs"), distributed={"num_processes": 8}))
    assert not (tmp_path / "runs" / "huge").exists()


def test_cpu_runs_take_no_gpu_slot(tmp_path, tiny_dir, four_gpus):
    run = launch(RunConfig(**TINY, name="cpu", max_steps=1, runs_root=str(tmp_path / "runs"),
                           distributed={"cpu": True}))
    assert run.placement()["gpus"] is None and run.launcher()["env"]["CUDA_VISIBLE_DEVICES"] == ""
    assert run.wait(timeout=300)["state"] == "finished", run.tail(30)


# -- a sweep of six runs on four GPUs -------------------------------------------------------------


def _cvd(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"CUDA_VISIBLE_DEVICES="):
            return item.split(b"=", 1)[1].decode()
    return None


def _cmdline(pid: int) -> str:
    try:
        return f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return f"{pid}: gone"


class GpuWatch(threading.Thread):
    """Samples which GPUs every live process of every run has, as the kernel sees its environment."""

    def __init__(self, root: Path):
        super().__init__(daemon=True)
        self.root, self.seen, self.clashes, self.done = root, {}, [], threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            owner: dict[str, str] = {}
            for path in self.root.glob("*/launcher.json"):
                # Every process of the launch: torchrun's workers run in sessions of their own.
                for pid in run_processes(runfiles.read_json(path).get("run_id"), max_age=0):
                    cvd = _cvd(pid)
                    if not cvd or start_time(pid) is None:
                        continue
                    name = path.parent.name
                    self.seen.setdefault(name, set()).add(cvd)
                    for g in cvd.split(","):
                        if owner.setdefault(g, name) != name:
                            self.clashes.append((g, owner[g], name))


@pytest.mark.slow
def test_six_runs_of_1_1_2_2_1_4_gpus_share_four_gpus_and_all_finish(tmp_path, tiny_dir, four_gpus):
    root = tmp_path / "runs"
    # A run holding all four GPUs first: the sweep queues behind it until it is killed with -9.
    hog = launch(RunConfig(**TINY, name="hog", epochs=100, runs_root=str(root), distributed={"num_processes": 4}))
    assert hog.placement()["gpus"] == ["0", "1", "2", "3"]
    watch = GpuWatch(root)
    watch.start()

    parameterized_notebook(tmp_path / "launch.ipynb", "config_path = None\nruns_root = None",
                           "from labkit.config import load_config\nfrom labkit.launch import launch\n"
                           "run = launch(load_config(config_path, {'runs_root': runs_root}))\n"
                           "status = run.wait(poll=0.3)\nassert status['state'] == 'finished', run.tail(30)")
    sizes = [1, 1, 2, 2, 1, 4]
    spec = {"name": "pack", "base": {**TINY, "max_steps": 2}, "concurrency": None,
            "notebook": str(tmp_path / "launch.ipynb"),
            "runs": [{"name": f"r{i}-{n}gpu", "distributed": {"num_processes": n}} for i, n in enumerate(sizes)]}
    result: dict = {}
    t0 = time.time()
    sweeping = threading.Thread(target=lambda: result.update(df=sweep.run_sweep(spec, root, log=lambda _: None)))
    sweeping.start()
    names = [f"pack__r{i}-{n}gpu" for i, n in enumerate(sizes)]

    def all_queued() -> bool:
        return all(Run(root / n).status().get("pending_reason") for n in names)

    deadline = time.time() + 240
    while not all_queued() and time.time() < deadline:
        time.sleep(0.3)
    assert all_queued(), {n: Run(root / n).status() for n in names}
    reason = Run(root / names[5]).status()["pending_reason"]
    assert reason.startswith("waiting for 4 GPUs: 0 of 4 free (hog has 0,1,2,3)"), reason
    assert Run(root / names[5]).placement()["gpus_needed"] == 4

    # The launcher and its four workers (on a loaded machine the workers take a while to start).
    deadline = time.time() + 180
    while len(hog_processes := run_processes(hog.launcher()["run_id"], max_age=0)) < 5 and time.time() < deadline:
        time.sleep(0.3)
    assert len(hog_processes) >= 5, hog_processes
    killed_at = time.time()
    while pids := run_processes(hog.launcher()["run_id"], max_age=0):  # the whole run, with -9
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    sweeping.join(timeout=900)
    watch.done.set()
    watch.join()
    elapsed = time.time() - t0
    assert not sweeping.is_alive(), "the sweep did not end"

    assert hog.status()["state"] == "failed" and hog.status()["died"]
    df = result["df"]
    assert list(df["state"]) == ["finished"] * 6, df[["run", "state", "error"]]
    spans = {}
    for name, n in zip(names, sizes):
        info = Run(root / name).launcher()
        assert len(info["gpus"]) == n and info["env"]["CUDA_VISIBLE_DEVICES"] == ",".join(info["gpus"])
        assert watch.seen[name] == {",".join(info["gpus"])}, (name, watch.seen.get(name))  # what it really had
        assert info["started_at"] > killed_at  # nothing started on the hog's GPUs while it lived
        spans[name] = (info["started_at"], runfiles.read_status(root / name)["ended_at"], set(info["gpus"]))
    assert not watch.clashes, watch.clashes[:5]
    for a in names:  # runs that shared a GPU did not overlap in time, by their own records too
        for b in names:
            if a < b and spans[a][2] & spans[b][2]:
                assert spans[a][1] <= spans[b][0] or spans[b][1] <= spans[a][0], (a, b, spans[a], spans[b])
    print(f"six-run GPU sweep: {elapsed:.0f}s")

    def lingering() -> dict[str, list[str]]:
        return {r.name: [_cmdline(p) for p in run_processes(r.launcher().get("run_id"), max_age=0)]
                for r in runs(root) if r.is_alive()}

    # Run.wait in each notebook gives a final run's processes 30 s to exit; on a loaded 2-core box
    # the last of them may still be tearing down when the sweep returns.
    wait_for(lambda: not lingering(), timeout=30, what=lambda: f"every run's processes to exit: {lingering()}")


def test_a_queued_run_waits_in_its_own_process_and_stop_takes_it_out_of_the_queue(tmp_path, tiny_dir, four_gpus,
                                                                                  sleepers):
    root = tmp_path / "runs"
    holder(root, "busy", sleepers(), ["0", "1", "2", "3"])
    run = launch(RunConfig(**TINY, name="later", max_steps=1, runs_root=str(root), distributed={"num_processes": 1}))
    status = Run(run.dir).status()  # a fresh Run: what a restarted notebook sees
    assert status["state"] == "pending" and status["pending_reason"].startswith("waiting for 1 GPU: 0 of 4 free")
    assert run.is_alive() and run.placement()["gpus"] is None and run.placement()["gpus_needed"] == 1
    status = run.stop(timeout=60, reason="not needed")
    assert status["state"] == "stopped" and status["stop_reason"] == "not needed (while queued)"
    assert not run.is_alive() and "queued: waiting for 1 GPU" in run.tail()
