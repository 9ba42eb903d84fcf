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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from labkit import rundirs, runfiles
from labkit.config import ConfigError, RunConfig, load_config

if TYPE_CHECKING:
    from labkit.store import Store

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = REPO / "templates"
LAUNCHER = "launcher.json"
LOG = "train.log"
DIED = "process exited without a final status (see train.log)"

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

    `num_processes` is the total over all machines, as in accelerate. `machine_rank` and `main_ip`
    may be shell expressions (`$SLURM_PROCID`) for the scripts `write_multinode` writes.
    """
    d = cfg.distributed
    cuda = _has_cuda() if cuda is None else cuda
    cpu = d.cpu or not cuda
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    # accelerate's `--cpu` starts a single process whatever `--num_processes` says; several CPU
    # processes need its torchrun path (`--multi_gpu`), which picks gloo when no GPU is visible.
    cpu_flag = "--multi_gpu" if d.num_processes > 1 else "--cpu"
    if d.accelerate_config:
        # The file chooses the backend; flags below only set sizes and addresses (they win over the file).
        cmd += ["--config_file", str(accelerate_config(d.accelerate_config))]
        if cpu:
            cmd.append(cpu_flag)
    elif cpu:
        cmd.append(cpu_flag)
    elif d.strategy == "fsdp":
        # As templates/accelerate/fsdp.yaml: FSDP2, fully sharded, one unit per decoder layer.
        cmd += ["--use_fsdp", "--fsdp_version", "2", "--fsdp_reshard_after_forward", "true",
                "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer",
                "--fsdp_state_dict_type", "SHARDED_STATE_DICT"]
    elif d.num_processes > 1:
        cmd.append("--multi_gpu")
    cmd += ["--num_processes", str(d.num_processes), "--num_machines", str(d.num_machines)]
    if cpu:
        cmd += ["--mixed_precision", "no"]
    elif d.mixed_precision != "auto":
        cmd += ["--mixed_precision", d.mixed_precision]
    cmd += ["--dynamo_backend", "no"]
    if d.num_machines > 1:
        cmd += ["--machine_rank", str(d.machine_rank if machine_rank is None else machine_rank),
                "--main_process_ip", str(main_ip or d.main_process_ip)]
    cmd += ["--main_process_port", str(port or d.main_process_port), "-m", "labkit.train", str(config_path)]
    return cmd


def _child_env(cpu: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    if cpu:
        # A CPU run on a GPU machine: hide the GPUs so the torchrun path cannot pick NCCL.
        env["CUDA_VISIBLE_DEVICES"] = ""
    # The trainer must import this labkit even when it is not installed (a checkout on PYTHONPATH).
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


# -- launching -----------------------------------------------------------------------------------


def as_config(config: RunConfig | str | Path, overrides: dict[str, Any]) -> RunConfig:
    if isinstance(config, RunConfig):
        return config.with_updates(**overrides) if overrides else config
    return load_config(config, overrides)


def launch(config: RunConfig | str | Path, overwrite: bool = False, **overrides: Any) -> Run:
    """Validate, write RUN_DIR/config.yaml and start training in the background; returns at once.

    Overrides are config fields (`name="lr3e-4"`, `**{"distributed.num_processes": 2}`). An existing run
    directory is continued when `resume` is set, moved to RUNS/.trash/ with `overwrite`, and otherwise
    refused (`labkit.rundirs.claim_run_dir`). A live run is never touched.
    """
    cfg = as_config(config, overrides)
    problems = cfg.check()
    if cfg.distributed.num_machines > 1 and not cfg.distributed.main_process_ip:
        problems.append("distributed.main_process_ip: multi-machine runs need machine 0's address "
                        "(or use write_multinode for per-node scripts and Slurm)")
    if problems:
        raise ConfigError("\n  - ".join([f"run {cfg.name!r} cannot start:", *problems]))
    cfg = rundirs.claim_run_dir(cfg, overwrite=overwrite)  # never deletes a run: labkit/rundirs.py
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = cfg.save(run_dir / "config.yaml")
    (run_dir / runfiles.STOP).unlink(missing_ok=True)
    now = time.time()
    runfiles.write_json_atomic(run_dir / runfiles.STATUS, {
        "state": "pending", "pid": None, "step": 0, "samples": 0, "total_steps": None, "total_samples": None,
        "started_at": None, "updated_at": now, "ended_at": None, "error": None, "stop_reason": None,
        "launched_at": now})

    port = cfg.distributed.main_process_port if cfg.distributed.num_machines > 1 else free_port()
    cmd = launch_command(cfg, config_path, port=port)
    with (run_dir / LOG).open("ab") as log:
        log.write(f"$ {shlex.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=os.getcwd(), env=_child_env(cfg.distributed.cpu), start_new_session=True)
    _children[run_dir.resolve()] = proc
    # The trainer owns status.json from now on; what the launcher knows goes into its own file.
    runfiles.write_json_atomic(run_dir / LAUNCHER, {
        "pid": proc.pid, "pgid": proc.pid, "host": socket.gethostname(), "launched_at": now,
        "cwd": os.getcwd(), "command": cmd})
    return Run(run_dir)


# -- a run, from its directory ---------------------------------------------------------------------


def _signal_reaches(send: Callable[[int, int], None], ident: int | None) -> bool:
    """Signal 0 probes a process (os.kill) or process group (os.killpg) without touching it."""
    if not ident:
        return False
    try:
        send(ident, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _pid_alive(pid: int | None) -> bool:
    return _signal_reaches(os.kill, pid)


def _group_alive(pgid: int | None) -> bool:
    return _signal_reaches(os.killpg, pgid)


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
        """Whether any process of this run still exists (on this host)."""
        child = _children.get(self.dir.resolve())
        if child is not None and child.poll() is None:
            return True
        launcher = self.launcher()
        status = runfiles.read_status(self.dir)
        if launcher.get("host") not in (None, socket.gethostname()):
            # Started on another machine: its processes are not ours to see, so trust its status.
            return status.get("state") in ("running", "pending")
        if _group_alive(launcher.get("pgid")):
            return True
        if not launcher and status.get("state") == "pending" and time.time() - (status.get("launched_at") or 0) < 10:
            return True  # launch() is between writing status.json and launcher.json
        # A trainer started some other way (`python -m labkit.train`, a test) has only its pid.
        return status.get("state") == "running" and _pid_alive(status.get("pid"))

    def status(self) -> dict[str, Any]:
        """status.json, except that a running/pending run whose processes are gone reads as failed."""
        status = runfiles.read_status(self.dir)
        if status.get("state") in ("running", "pending") and not self.is_alive():
            status = {**status, "state": "failed", "error": DIED}
        return status

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
        if launcher.get("host") not in (None, socket.gethostname()):
            raise RuntimeError(f"run {self.name!r} was started on {launcher['host']}: kill it there, "
                               "or stop it with a STOP file (Run.stop)")
        pgid, pid = launcher.get("pgid"), status.get("pid")
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                if pgid:
                    os.killpg(pgid, sig)
                elif pid:
                    os.kill(pid, sig)
            except ProcessLookupError:
                pass
            end = time.time() + (grace if sig == signal.SIGTERM else 10)
            while time.time() < end and self.is_alive():
                time.sleep(0.2)
            if not self.is_alive():
                break
        status = runfiles.read_status(self.dir)
        if status.get("state") not in runfiles.FINAL_STATES:
            status = runfiles.update_status(self.dir, state="stopped", stop_reason=reason, ended_at=time.time())
        return status


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


def overview(root: str | Path = "runs", early: bool = True, store: Store | None = None) -> pd.DataFrame:
    """One row per run, newest first: state (with liveness), step, samples, last loss, and the early score
    over the first 100 steps from `labkit.store` (higher is better; see `Store.early_dynamics`).
    `store`: a Store of `root` to reuse (a new one otherwise)."""
    rows = []
    for run in runs(root):
        s = run.status()
        rows.append({"name": run.name, "state": s.get("state"), "step": s.get("step"),
                     "total_steps": s.get("total_steps"), "samples": s.get("samples"), "loss": s.get("loss")})
    df = pd.DataFrame(rows, columns=["name", "state", "step", "total_steps", "samples", "loss"])
    if early and len(df):
        if store is None:
            from labkit.store import Store

            store = Store(root)
        scores = store.early_dynamics()[["run_id", "early_score"]].rename(columns={"run_id": "name"})
        df = df.merge(scores, how="left", on="name")
    return df


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
