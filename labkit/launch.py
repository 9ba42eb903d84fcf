"""Start training runs in the background, and find, watch and stop them again.

The notebook never trains: `launch` writes RUN_DIR/config.yaml and starts `accelerate launch -m labkit.train`
as a detached process group, so a kernel restart neither kills the run nor loses it. A `Run` is only a
run directory: everything it reports comes from the plain files of docs/run-dir.md, plus a liveness check
of the processes, so a run that died without a final status shows as failed instead of running forever.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from labkit import gpus as gpus_mod
from labkit import liveness, rendezvous, rundirs, runfiles, slurm
from labkit.config import ConfigError, RunConfig, load_config

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = REPO / "templates"
LAUNCHER = "launcher.json"
LOG = "train.log"
DIED = liveness.DIED

# Popen objects of the runs this interpreter started: a child that exited stays a zombie (and looks
# alive to os.kill) until it is reaped, so for our own children we ask Popen.poll instead.
_children: dict[Path, subprocess.Popen] = {}


# -- the accelerate command line -----------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now, so two runs on one machine do not fight over the rendezvous."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def accelerate_config(name: str) -> Path:
    """`fsdp`, `fsdp.yaml` (a file under templates/accelerate/) or any path to an accelerate config."""
    for p in (Path(name).expanduser(), TEMPLATES / "accelerate" / name, TEMPLATES / "accelerate" / f"{name}.yaml"):
        if p.is_file():
            return p.resolve()
    known = ", ".join(sorted(p.stem for p in (TEMPLATES / "accelerate").glob("*.yaml")))
    raise ConfigError(f"distributed.accelerate_config: {name!r} is neither a file nor a template ({known})")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def launch_command(cfg: RunConfig, config_path: str | Path, port: int | None = None,
                   machine_rank: int | str | None = None, main_ip: str | None = None,
                   cuda: bool | None = None) -> list[str]:
    """`python -m accelerate.commands.launch ... -m labkit.train CONFIG` for this config.

    accelerate only starts the processes (torchrun underneath, one per GPU or N on CPU); the trainer
    sets up the process group and shards the model itself from `distributed.strategy` (labkit.sharding),
    so `fsdp` runs FSDP2 on CPU/gloo exactly as on GPUs/NCCL, with the blocks of any architecture.
    `num_processes` is the total over all machines, as in accelerate. `machine_rank` and `main_ip` may be
    shell expressions (`$SLURM_PROCID`) for the scripts `write_multinode` writes. A single-node run
    rendezvous on 127.0.0.1 (other machines connect only to multi-node runs, at main_process_ip).
    """
    d = cfg.distributed
    cuda = _has_cuda() if cuda is None else cuda
    cpu = d.cpu or not cuda
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if d.accelerate_config:
        path = accelerate_config(d.accelerate_config)
        kind = _accelerate_distributed_type(path)
        if kind not in (None, "NO", "MULTI_GPU", "MULTI_CPU"):
            raise ConfigError(f"distributed.accelerate_config: {path} asks accelerate for {kind}, but labkit shards "
                              "the model itself: use a MULTI_GPU/MULTI_CPU file and set distributed.strategy")
        # The file sets what accelerate needs to start processes; the flags below win over it.
        cmd += ["--config_file", str(path)]
    # accelerate's `--cpu` starts a single process whatever `--num_processes` says; several processes need
    # its torchrun path (`--multi_gpu`), which the trainer turns into gloo when it has no GPU.
    if d.num_processes > 1:
        cmd.append("--multi_gpu")
    elif cpu:
        cmd.append("--cpu")
    cmd += ["--num_processes", str(d.num_processes), "--num_machines", str(d.num_machines)]
    # The trainer applies mixed precision itself (labkit.sharding); accelerate's flag is informational.
    cmd += ["--mixed_precision", "no" if cpu else (d.mixed_precision if d.mixed_precision != "auto" else "bf16")]
    cmd += ["--dynamo_backend", "no"]
    if d.num_machines > 1:
        cmd += ["--machine_rank", str(d.machine_rank if machine_rank is None else machine_rank),
                "--main_process_ip", str(main_ip or d.main_process_ip)]
    else:
        cmd += ["--main_process_ip", "127.0.0.1"]
    cmd += ["--main_process_port", str(port or d.main_process_port), "-m", "labkit.train", str(config_path)]
    return cmd


def _accelerate_distributed_type(path: Path) -> str | None:
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    return str(data.get("distributed_type")) if isinstance(data, dict) and data.get("distributed_type") else None


def _loopback_interface() -> str:
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in ("lo", "lo0") if n in names), "lo")


def _child_env(cpu: bool = False, gpus: list[str] | None = None, single_node: bool = True) -> dict[str, str]:
    """The trainer's environment: its own GPUs (`gpus`), this checkout importable, and for runs on one
    machine every rendezvous and collective socket on the loopback interface, so nothing listens on
    the network (multi-machine runs bind where their config says)."""
    env = dict(os.environ)
    if cpu:
        # A CPU run on a GPU machine: hide the GPUs so the torchrun path cannot pick NCCL.
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    env.pop(gpus_mod.GPUS_ENV, None)  # the trainer must not schedule again
    env.pop(rendezvous.HOST_ENV, None)
    if single_node:
        env["MASTER_ADDR"] = "127.0.0.1"
        env[rendezvous.HOST_ENV] = "127.0.0.1"  # labkit.rendezvous binds torchelastic's store there
        loopback = _loopback_interface()
        env["GLOO_SOCKET_IFNAME"] = loopback
        env.setdefault("NCCL_SOCKET_IFNAME", loopback)
    # The trainer must import this labkit even when it is not installed (a checkout on PYTHONPATH).
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


# -- launching -----------------------------------------------------------------------------------

BACKENDS = ("local", "slurm")
BACKEND_ENV = "LABKIT_BACKEND"


def as_config(config: RunConfig | str | Path, overrides: dict[str, Any]) -> RunConfig:
    if isinstance(config, RunConfig):
        return config.with_updates(**overrides) if overrides else config
    return load_config(config, overrides)


def launch(config: RunConfig | str | Path, overwrite: bool = False, backend: str | None = None,
           on_exists: Literal["refuse", "rename"] = "refuse", **overrides: Any) -> Run:
    """Validate, write RUN_DIR/config.yaml and start training in the background; returns at once.

    Overrides are config fields (`name="lr3e-4"`, `**{"distributed.num_processes": 2}`). An existing run
    directory is continued when `resume` is set, moved to RUNS/.trash/ with `overwrite`, and otherwise
    refused, or with `on_exists="rename"` the new run takes the next free name (`labkit.rundirs.claim_run_dir`,
    called only once every check has passed). A live run is never touched.

    `backend="local"` trains on this machine: a run that needs GPUs gets its own (labkit.gpus) and
    waits, state `pending` with its `pending_reason`, while they are taken. `backend="slurm"` submits
    the run as a Slurm job (labkit.slurm); the returned `Run` works the same on both. Default:
    $LABKIT_BACKEND, else local (sweeps with `backend: slurm` set it for their run notebooks).
    """
    backend = backend or os.environ.get(BACKEND_ENV) or "local"
    if backend not in BACKENDS:
        raise ConfigError(f"backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    cfg = as_config(config, overrides)
    problems = cfg.check()
    d = cfg.distributed
    if backend == "local" and d.num_machines > 1 and not d.main_process_ip:
        problems.append("distributed.main_process_ip: multi-machine runs need machine 0's address "
                        "(or use backend='slurm', or write_multinode for per-node scripts)")
    if d.num_processes % d.num_machines:
        problems.append(f"distributed.num_processes ({d.num_processes}) is the total over all machines and "
                        f"must divide evenly by distributed.num_machines ({d.num_machines})")
    node = gpus_mod.node_gpus() if backend == "local" else []
    n_gpus = gpus_mod.gpus_needed(d.num_processes, d.num_machines, d.cpu, node)
    if n_gpus > len(node):
        problems.append(f"distributed.num_processes: the run needs {n_gpus} GPUs, this node has {len(node)} "
                        f"({','.join(node)}; {gpus_mod.GPUS_ENV} or CUDA_VISIBLE_DEVICES choose them)")
    if backend == "slurm":
        if not slurm.available():
            problems.append("backend: slurm needs sbatch, squeue, scontrol and scancel on PATH (a Slurm login node)")
        try:
            slurm.options(cfg)
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError("\n  - ".join([f"run {cfg.name!r} cannot start:", *problems]))
    cfg = rundirs.claim_run_dir(cfg, overwrite=overwrite, on_exists=on_exists)  # never deletes a run: labkit/rundirs.py
    run_dir = cfg.run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # check() catches the knowable cases; a race or a full disk lands here
        raise ConfigError(f"runs_root: cannot create {run_dir}: {e.strerror or e}") from None
    config_path = cfg.save(run_dir / "config.yaml")
    (run_dir / runfiles.STOP).unlink(missing_ok=True)
    (run_dir / LAUNCHER).unlink(missing_ok=True)  # an old run's placement must not count as this one's
    now = time.time()
    runfiles.write_json_atomic(run_dir / runfiles.STATUS, {
        "state": "pending", "pid": None, "step": 0, "samples": 0, "total_steps": None, "total_samples": None,
        "started_at": None, "updated_at": now, "ended_at": None, "error": None, "stop_reason": None,
        "launched_at": now})

    if backend == "slurm":
        try:
            slurm.submit(cfg, config_path, _slurm_command(cfg, config_path))
        except slurm.SlurmError as e:  # the run dir must not stay `pending` for a job that never was
            runfiles.update_status(run_dir, state="failed", error=f"not submitted: {e}", ended_at=time.time())
            raise
        return Run(run_dir)
    run_id = uuid.uuid4().hex  # marks every process of this launch (liveness.run_processes)
    if n_gpus == 0:
        _start(cfg, run_dir, config_path, None, now, run_id)
    else:
        gpus_mod.place(run_dir, n_gpus, now, gpus=node,
                       start=lambda given: _start(cfg, run_dir, config_path, given, now, run_id),
                       queue=lambda reason: _start_waiter(run_dir, n_gpus, now, reason, run_id))
    return Run(run_dir)


def _start(cfg: RunConfig, run_dir: Path, config_path: Path, gpus: list[str] | None, queued_at: float,
           run_id: str, exec_here: bool = False) -> None:
    """Start the trainer (or, with `exec_here`, become it) and record where it runs in launcher.json."""
    d = cfg.distributed
    port = d.main_process_port if d.num_machines > 1 else free_port()
    cmd = launch_command(cfg, config_path, port=port)
    env = _child_env(d.cpu, gpus, single_node=d.num_machines == 1)
    env[liveness.RUN_ENV] = run_id
    if d.num_machines > 1 and d.main_process_ip:
        env[rendezvous.HOST_ENV] = d.main_process_ip  # machine 0 serves the store there only
    if rendezvous.HOST_ENV in env and cmd[1:3] == ["-m", "accelerate.commands.launch"]:
        cmd[2] = "labkit.rendezvous"  # the same launcher, its rendezvous store bound to that address
    info = {"backend": "local", "host": socket.gethostname(), "node": socket.gethostname(), "job_id": None,
            "run_id": run_id, "gpus": gpus, "gpus_needed": len(gpus) if gpus else 0, "port": port, "queued_at": queued_at,
            "launched_at": queued_at, "started_at": time.time(), "cwd": os.getcwd(), "command": cmd,
            "env": {k: env[k] for k in ("CUDA_VISIBLE_DEVICES", "MASTER_ADDR") if k in env}}
    if exec_here:
        # A queued run's waiter becomes the trainer: same pid and process group, so nothing changes hands.
        runfiles.write_json_atomic(run_dir / LAUNCHER, {**Run(run_dir).launcher(), **info, "pending_reason": None})
        sys.stdout.write(f"$ {shlex.join(cmd)}\n")
        sys.stdout.flush()
        os.execve(cmd[0], cmd, env)
    with (run_dir / LOG).open("ab") as log:
        log.write(f"$ {shlex.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=os.getcwd(), env=env, start_new_session=True)
    _children[run_dir.resolve()] = proc
    # The trainer owns status.json from now on; what the launcher knows goes into its own file.
    runfiles.write_json_atomic(run_dir / LAUNCHER, {
        **info, "pid": proc.pid, "pgid": proc.pid, "pid_start": liveness.start_time(proc.pid)})


def _start_waiter(run_dir: Path, n_gpus: int, queued_at: float, reason: str, run_id: str) -> None:
    """A detached process that waits for the run's GPUs and then becomes its trainer (`_wait_and_start`):
    it survives a notebook restart, and killing it (Run.kill) takes the run out of the queue."""
    cmd = [sys.executable, "-m", "labkit.launch", "--start-queued", str(run_dir.resolve())]
    env = _child_env(single_node=False)  # the trainer's own environment is made when it starts
    env.update({k: v for k, v in os.environ.items() if k == gpus_mod.GPUS_ENV})  # the waiter schedules
    env[liveness.RUN_ENV] = run_id
    with (run_dir / LOG).open("ab") as log:
        log.write(f"[labkit] queued: {reason}\n".encode())
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=os.getcwd(), env=env, start_new_session=True)
    _children[run_dir.resolve()] = proc
    runfiles.write_json_atomic(run_dir / LAUNCHER, {
        "backend": "local", "host": socket.gethostname(), "node": socket.gethostname(), "job_id": None,
        "run_id": run_id, "gpus": None, "gpus_needed": n_gpus, "queued_at": queued_at, "launched_at": queued_at,
        "pending_reason": reason, "cwd": os.getcwd(), "command": cmd,
        "pid": proc.pid, "pgid": proc.pid, "pid_start": liveness.start_time(proc.pid)})


def _wait_and_start(run_dir: Path, poll: float = 1.0) -> int:
    """The waiter's loop: start when `labkit.gpus.place` gives the run its GPUs; a STOP file ends it."""
    run_dir = Path(run_dir)
    deadline = time.time() + 30
    while Run(run_dir).launcher().get("pid") != os.getpid():  # launch() records us just after we start
        if time.time() > deadline:
            print(f"[labkit] {run_dir}: launcher.json does not name this waiter; giving up", flush=True)
            return 1
        time.sleep(0.05)
    cfg = load_config(run_dir / "config.yaml")
    info = Run(run_dir).launcher()
    n, queued_at = int(info["gpus_needed"]), float(info["queued_at"])
    last_reason = info.get("pending_reason")
    while True:
        stop = run_dir / runfiles.STOP
        if stop.exists():
            reason = stop.read_text().strip() or "stop requested"
            runfiles.update_status(run_dir, state="stopped", stop_reason=f"{reason} (while queued)",
                                   ended_at=time.time())
            print(f"[labkit] stopped while queued: {reason}", flush=True)
            return 0

        def record(reason: str) -> None:
            nonlocal last_reason
            if reason != last_reason:
                runfiles.write_json_atomic(run_dir / LAUNCHER, {**Run(run_dir).launcher(), "pending_reason": reason})
                last_reason = reason

        # Becomes the trainer inside the lock, once the GPUs are recorded: exec closes the lock file
        # (it is not inherited), which releases the lock.
        gpus_mod.place(run_dir, n, queued_at, queue=record,
                       start=lambda given: _start(cfg, run_dir, run_dir / "config.yaml", given, queued_at,
                                                  info["run_id"], exec_here=True))
        time.sleep(poll)


# -- a run, from its directory ---------------------------------------------------------------------


class Run:
    """A run directory: its config, status, metrics and log, and control of its processes."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.name = self.dir.name
        self._metrics_file: tuple[int, int] = (0, 0)  # (inode, bytes parsed)
        self._metrics_rows: dict[int, dict[str, Any]] = {}
        self._metrics_lock = threading.Lock()  # a monitor thread and the notebook may read at once

    def __repr__(self) -> str:
        s = self.status()
        return f"Run({str(self.dir)!r}, state={s.get('state')!r}, step={s.get('step')})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Run) and self.dir.resolve() == other.dir.resolve()

    def __hash__(self) -> int:
        return hash(self.dir.resolve())

    @property
    def config(self) -> RunConfig:
        return load_config(self.dir / "config.yaml")

    def launcher(self) -> dict[str, Any]:
        return runfiles.read_json(self.dir / LAUNCHER)

    # -- liveness ----------------------------------------------------------------------------------

    def is_alive(self) -> bool:
        """Whether any process of this run still exists (this host; a Slurm job that is pending or running).
        A run on another host, not visible from here, is alive while its status says so."""
        child = _children.get(self.dir.resolve())
        if child is not None and child.poll() is None:
            return True
        status = runfiles.read_status(self.dir)
        found = liveness.alive(self.dir, self.launcher(), status)
        return status.get("state") in ("running", "pending") if found is None else found

    def status(self) -> dict[str, Any]:
        """status.json, except that a running/pending run whose processes are gone reads as failed (with
        `died`, see labkit.liveness); with `placement` (where it runs) and, while queued, `pending_reason`."""
        return {**liveness.effective_status(self.dir), "placement": self.placement()}

    def placement(self) -> dict[str, Any]:
        """Where the run is placed: `backend` (local/slurm), `node`, `gpus`, `job_id`, `port`, and while
        it waits `pending_reason` (from launcher.json; the Slurm backend adds the job's state)."""
        info = self.launcher()
        keys = ("backend", "node", "gpus", "gpus_needed", "job_id", "port", "queued_at", "started_at",
                "pending_reason", "nodes", "partition")
        out = {k: info.get(k) for k in keys}
        out["backend"] = out["backend"] or ("local" if info else None)
        if out["backend"] == "slurm":
            job = runfiles.read_json(self.dir / "slurm-job.json")  # written by the job where it runs
            out.update({k: job[k] for k in ("node", "nodes", "gpus") if job.get(k)})
            if isinstance(out["gpus"], str):
                out["gpus"] = out["gpus"].split(",")
        return out

    def state(self) -> str | None:
        return self.status().get("state")

    # -- files -------------------------------------------------------------------------------------

    def metrics(self) -> pd.DataFrame:
        """One row per optimizer step, read live; only the bytes added since the last call are parsed."""
        with self._metrics_lock:
            return self._read_metrics()

    def _read_metrics(self) -> pd.DataFrame:
        path = self.dir / runfiles.METRICS
        try:
            fh = path.open("rb")
        except FileNotFoundError:
            self._metrics_file, self._metrics_rows = (0, 0), {}
            return pd.DataFrame(columns=["step"])
        with fh:
            st = os.fstat(fh.fileno())
            inode, pos = self._metrics_file
            if st.st_ino != inode or st.st_size < pos:  # replaced (a resume rewrites it): read it all again
                pos, self._metrics_rows = 0, {}
            fh.seek(pos)
            chunk = fh.read(st.st_size - pos)
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a torn last line is read again next time
        self._metrics_file = (st.st_ino, pos + len(complete))
        for line in complete.splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                self._metrics_rows[row["step"]] = row  # after a resume the newest row of a step wins
        rows = [self._metrics_rows[s] for s in sorted(self._metrics_rows)]
        return pd.DataFrame(rows) if rows else pd.DataFrame(columns=["step"])

    def tail(self, n: int = 20) -> str:
        """The last `n` lines of train.log."""
        path = self.dir / LOG
        if n <= 0 or not path.exists():
            return ""
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            end = fh.tell()
            block = 8192
            data = b""
            while end > 0 and data.count(b"\n") <= n:
                start = max(0, end - block)
                fh.seek(start)
                data = fh.read(end - start) + data
                end = start
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-n:])

    def checkpoints(self) -> list[Path]:
        return runfiles.checkpoints(self.dir)

    # -- control -----------------------------------------------------------------------------------

    def wait(self, timeout: float | None = None, poll: float = 1.0) -> dict[str, Any]:
        """Block until the run reaches a final state; returns its status."""
        deadline = None if timeout is None else time.time() + timeout
        while True:
            status = self.status()
            if status.get("state") in runfiles.FINAL_STATES:
                child = _children.get(self.dir.resolve())
                if child is not None:
                    try:  # the trainer writes its final status just before it exits
                        child.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        pass
                # Its other processes (torchrun workers, the rendezvous server) follow within moments:
                # a run that reads final is done only once nothing of it is left.
                gone = time.time() + 30
                while self.is_alive() and time.time() < gone:
                    time.sleep(0.2)
                return self.status()
            if deadline is not None and time.time() > deadline:
                raise TimeoutError(f"run {self.name!r} still {status.get('state')} after {timeout}s")
            time.sleep(poll)

    def stop(self, timeout: float = 120, reason: str = "user") -> dict[str, Any]:
        """Ask the trainer to save a checkpoint and stop (STOP file); kill the processes after `timeout` s."""
        deadline = time.time() + timeout
        while True:
            status = self.status()
            if status.get("state") in runfiles.FINAL_STATES:
                return self.wait(timeout=30)
            # The trainer removes stale STOP files when it starts, so keep one in place until it is gone.
            if not (self.dir / runfiles.STOP).exists():
                runfiles.request_stop(self.dir, reason)
            if time.time() > deadline:
                return self.kill(reason=f"killed: did not stop within {timeout:g}s ({reason})")
            time.sleep(0.5)

    def kill(self, reason: str = "killed", grace: float = 10.0) -> dict[str, Any]:
        """SIGTERM the run's processes, SIGKILL them after `grace` s, and mark the run stopped."""
        status = runfiles.read_status(self.dir)
        if status.get("state") in runfiles.FINAL_STATES:
            return self.status()  # nothing to kill; its old pids may belong to other processes by now
        launcher = self.launcher()
        if launcher.get("backend") == "slurm":
            slurm.cancel(launcher["job_id"])
            end = time.time() + grace + 30
            while time.time() < end and self.is_alive():
                time.sleep(0.5)
            status = runfiles.read_status(self.dir)
            if status.get("state") not in runfiles.FINAL_STATES:
                status = runfiles.update_status(self.dir, state="stopped", stop_reason=reason, ended_at=time.time())
            return status
        if launcher.get("host") not in (None, socket.gethostname()):
            raise RuntimeError(f"run {self.name!r} was started on {launcher['host']}: kill it there, "
                               "or stop it with a STOP file (Run.stop)")
        pgid, pid = launcher.get("pgid"), status.get("pid")
        for sig in (signal.SIGTERM, signal.SIGKILL):
            liveness.rescan()
            if not self.is_alive():
                break  # and never signal a recycled pid: it is someone else's process now
            # The launcher's group, and processes of this launch outside it (torchrun's workers have
            # sessions of their own: orphaned by a dead launcher, only their mark finds them).
            targets = [(os.killpg, pgid)] if pgid and liveness.group_alive(pgid, launcher.get("pid_start")) else \
                [] if pgid else [(os.kill, pid)]
            targets += [(os.kill, p) for p in liveness.run_processes(launcher.get("run_id"), max_age=0)]
            for send, ident in targets:
                try:
                    send(ident, sig)
                except (ProcessLookupError, TypeError):
                    pass
            end = time.time() + (grace if sig == signal.SIGTERM else 10)
            while time.time() < end and self.is_alive():
                time.sleep(0.2)
                liveness.rescan()
            if not self.is_alive():
                break
        status = runfiles.read_status(self.dir)
        if status.get("state") not in runfiles.FINAL_STATES:
            status = runfiles.update_status(self.dir, state="stopped", stop_reason=reason, ended_at=time.time())
        return status


def _slurm_command(cfg: RunConfig, config_path: Path) -> str:
    """The shell line every node of a Slurm job runs: `accelerate launch` with its machine rank from
    Slurm and machine 0's address (the job's first host) for the rendezvous; GPUs as Slurm gave them."""
    d = cfg.distributed
    multi = d.num_machines > 1
    cmd = launch_command(cfg, config_path, port=d.main_process_port if multi else None,
                         machine_rank="@RANK@" if multi else None, main_ip="@IP@" if multi else None,
                         cuda=bool(slurm.options(cfg).gpus_per_node) and not d.cpu)
    if not multi and "--main_process_port" in cmd:
        cmd[cmd.index("--main_process_port") + 1] = "0"  # any free port: several jobs may share a node
    if not multi and cmd[1:3] == ["-m", "accelerate.commands.launch"]:
        cmd[2] = "labkit.rendezvous"  # its store on loopback, as for local runs (the script sets the host)
    return shlex.join(cmd).replace("@RANK@", "$SLURM_NODEID").replace("@IP@", "$MAIN_IP")


def runs(root: str | Path = "runs") -> list[Run]:
    """Every run under `root` (directories with a config.yaml), newest first."""
    root = Path(root)
    if not root.is_dir():
        return []

    def launched(run: Run) -> float:
        info = run.launcher().get("launched_at") or runfiles.read_status(run.dir).get("started_at")
        return info or (run.dir / "config.yaml").stat().st_mtime

    found = [Run(p.parent) for p in root.glob("*/config.yaml")]
    return sorted(found, key=launched, reverse=True)


def where(placement: dict[str, Any]) -> str | None:
    """A placement in a few words: `node1 gpu 0,1`, `slurm job 42 on node1`, `queued for 2 GPUs`."""
    p = placement
    gpus = f"gpu {','.join(map(str, p['gpus']))}" if p.get("gpus") else None
    if p.get("backend") == "slurm":
        return " ".join(filter(None, [f"slurm job {p.get('job_id')}", f"on {p['node']}" if p.get("node") else None,
                                      gpus]))
    if p.get("backend") == "local" and p.get("gpus_needed") and not p.get("gpus"):
        return f"queued for {p['gpus_needed']} GPU{'s' if p['gpus_needed'] > 1 else ''}"
    return " ".join(filter(None, [p.get("node"), gpus])) or None


def get(run: str | Path | Run, root: str | Path = "runs") -> Run:
    """A run by directory or by name under `root`."""
    if isinstance(run, Run):
        return run
    for p in (Path(run), Path(root) / str(run)):
        if (p / "config.yaml").exists() or (p / runfiles.STATUS).exists():
            return Run(p)
    raise FileNotFoundError(f"no run {str(run)!r} (looked for {run}/config.yaml and {Path(root) / str(run)})")


# -- several machines ------------------------------------------------------------------------------


def _fill(template: str, values: dict[str, Any]) -> str:
    for key, value in values.items():
        template = template.replace("{{" + key + "}}", str(value))
    if "{{" in template:
        left = template[template.index("{{"): template.index("}}", template.index("{{")) + 2]
        raise ValueError(f"template placeholder {left} has no value")
    return template


def write_multinode(cfg: RunConfig, out_dir: str | Path, gpus_per_node: int | None = None,
                    time_limit: str = "24:00:00") -> list[Path]:
    """Per-node scripts `node_K.sh` and a Slurm job `labkit.sbatch` for a run over several machines.

    Every node runs the same `accelerate launch`; only `--machine_rank` differs. The scripts expect the
    same checkout and run directory on every node (a shared filesystem).
    """
    d = cfg.distributed
    if d.num_processes % d.num_machines:
        raise ConfigError(f"distributed.num_processes ({d.num_processes}) is the total over all machines and "
                          f"must divide evenly by distributed.num_machines ({d.num_machines})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = cfg.save(cfg.run_dir / "config.yaml")
    workdir = Path.cwd()
    port = d.main_process_port
    written = []
    ip = d.main_process_ip or "${MAIN_PROCESS_IP:?set MAIN_PROCESS_IP to the address of machine 0}"
    for rank in range(d.num_machines):
        cmd = launch_command(cfg, config_path, port=port, machine_rank=rank, main_ip="@IP@", cuda=True)
        line = shlex.join(cmd).replace("@IP@", f'"{ip}"' if not d.main_process_ip else shlex.quote(ip))
        path = out_dir / f"node_{rank}.sh"
        path.write_text("\n".join([
            "#!/usr/bin/env bash",
            f"# Run {cfg.name!r}, machine {rank} of {d.num_machines}: run node_K.sh on machine K, in any order.",
            "set -euo pipefail",
            f"cd {shlex.quote(str(workdir))}",
            f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}",
            f"exec {line}", ""]))
        path.chmod(0o755)
        written.append(path)
    # In the Slurm job each task computes its rank and the main address itself, inside single quotes.
    cmd = launch_command(cfg, config_path, port=port, machine_rank="@RANK@", main_ip="@IP@", cuda=True)
    line = shlex.join(cmd).replace("@RANK@", "$SLURM_PROCID").replace("@IP@", "$MAIN_IP")
    template = (TEMPLATES / "slurm" / "labkit.sbatch").read_text()
    sbatch = out_dir / "labkit.sbatch"
    sbatch.write_text(_fill(template, {
        "job_name": f"labkit-{cfg.name}", "nodes": d.num_machines,
        "gpus_per_node": gpus_per_node or d.num_processes // d.num_machines, "time": time_limit,
        "workdir": shlex.quote(str(workdir)), "repo": shlex.quote(str(REPO)),
        "log": cfg.run_dir.resolve() / "slurm-%j.log", "command": line.replace("'", "'\\''")}))
    written.append(sbatch)
    return written


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m labkit.launch", description="labkit's launcher, internal use.")
    ap.add_argument("--start-queued", metavar="RUN_DIR", required=True,
                    help="wait for the run's GPUs, then become its trainer (launch() starts this)")
    args = ap.parse_args(argv)
    return _wait_and_start(Path(args.start_queued))


if __name__ == "__main__":
    raise SystemExit(main())
