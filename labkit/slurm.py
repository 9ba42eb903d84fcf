"""Runs as Slurm jobs: submit, watch, stop and cancel, with the run directory as the only interface.

Why labkit drives `sbatch`/`squeue`/`scontrol`/`scancel` itself instead of using submitit: a labkit
run is already a shell command (`accelerate launch ... -m labkit.train CONFIG`) that talks to the
world only through its run directory, so there is no Python callable to pickle, and nothing for a
second results folder to hold. What the Board needs from Slurm is exactly what the commands print:
the pending reason, the node list, the final state and exit code. A multi-node run needs one
`accelerate launch` per node under `srun` (accelerate's own multi-node rendezvous), which is a
three-line batch script; and the CLI works with every Slurm version and site wrapper, without one
more dependency on the login node.

One job per run. The batch script is kept as RUN_DIR/slurm.sbatch and its output appended to
RUN_DIR/train.log; the job id goes into RUN_DIR/launcher.json (`backend: slurm`). Metrics are read
live from the shared filesystem as for local runs; `Run.stop()` writes the STOP file (the trainer
checkpoints and exits, the job ends), `Run.kill()` is `scancel` (Slurm's SIGTERM, then SIGKILL).

Partition, account, QoS, time, GPUs per node, CPUs and memory come from the run config's `slurm:`
section; fields it leaves unset come from the cluster profile, a YAML file of the same fields at
$LABKIT_SLURM_PROFILE (default ~/.config/labkit/slurm.yaml).
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from labkit import runfiles
from labkit.config import ConfigError, RunConfig, Slurm, read_mapping

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "templates" / "slurm" / "run.sbatch"
SCRIPT = "slurm.sbatch"
LAUNCHER = "launcher.json"
PROFILE_ENV = "LABKIT_SLURM_PROFILE"
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
          "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"}
_CACHE_S = 2.0  # a Board polling fifty runs must not run fifty scontrols a second
_cache: dict[str, tuple[float, dict[str, Any] | None]] = {}


class SlurmError(RuntimeError):
    """A Slurm command failed; the message has its output."""


def available() -> bool:
    return all(shutil.which(c) for c in ("sbatch", "squeue", "scontrol", "scancel"))


def profile_path() -> Path:
    return Path(os.environ.get(PROFILE_ENV) or Path.home() / ".config" / "labkit" / "slurm.yaml").expanduser()


def options(cfg: RunConfig) -> Slurm:
    """The run's Slurm options: its config's `slurm:` fields over the cluster profile's."""
    path = profile_path()
    data = read_mapping(path, "Slurm profile") if path.is_file() else {}
    data.update(cfg.slurm.model_dump(exclude_unset=True))
    try:
        opts = Slurm.model_validate(data)
    except ValueError as e:
        raise ConfigError(f"{path} + slurm: {e}") from None
    if opts.gpus_per_node is None:
        d = cfg.distributed
        opts = opts.model_copy(update={"gpus_per_node": 0 if d.cpu else d.num_processes // d.num_machines})
    return opts


def _run(cmd: list[str], timeout: float = 60) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SlurmError(f"{cmd[0]}: not found (is this a Slurm login node?)") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{shlex.join(cmd)}: no answer within {timeout:g}s") from None
    if out.returncode:
        raise SlurmError(f"{shlex.join(cmd)} failed ({out.returncode}): {(out.stderr or out.stdout).strip()}")
    return out.stdout


def script(cfg: RunConfig, command: str, opts: Slurm | None = None) -> str:
    """The batch script of a run: one task per node, each running `command` (an accelerate launch
    line that may use $SLURM_NODEID and $MAIN_IP, the job's first host)."""
    opts = opts or options(cfg)
    d = cfg.distributed
    run_dir = cfg.run_dir.resolve()
    directives = [f"--job-name=labkit-{cfg.name}", f"--nodes={d.num_machines}", "--ntasks-per-node=1",
                  f"--output={run_dir / 'train.log'}", "--open-mode=append", f"--chdir={Path.cwd()}"]
    if opts.gpus_per_node:
        directives.append(f"--gpus-per-node={opts.gpus_per_node}")
    for flag, value in (("partition", opts.partition), ("account", opts.account), ("qos", opts.qos),
                        ("time", opts.time), ("cpus-per-task", opts.cpus_per_task), ("mem", opts.mem)):
        if value is not None:
            directives.append(f"--{flag}={value}")
    directives += opts.sbatch_args
    for line in directives:
        if "\n" in line:
            raise ConfigError(f"slurm: an sbatch option may not contain a newline: {line!r}")
    single = d.num_machines == 1
    values = {
        "directives": "\n".join(f"#SBATCH {line}" for line in directives),
        "setup": "\n".join(opts.setup),
        "run_dir": shlex.quote(str(run_dir)),
        "pythonpath": shlex.quote(str(REPO)),
        "python": shlex.quote(sys.executable),
        # One node: every rendezvous socket on loopback (as for local runs); several: machine 0's address.
        "rendezvous": ("export MASTER_ADDR=127.0.0.1 LABKIT_RDZV_HOST=127.0.0.1 GLOO_SOCKET_IFNAME=lo "
                       "NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-lo}" if single else "export MASTER_ADDR=$MAIN_IP"),
        "command": command.replace("'", "'\\''"),
    }
    text = TEMPLATE.read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def submit(cfg: RunConfig, config_path: Path, command: str) -> str:
    """Write RUN_DIR/slurm.sbatch, submit it, record the job in launcher.json; returns the job id."""
    if not available():
        raise SlurmError("sbatch/squeue/scontrol/scancel not found: the Slurm backend needs a Slurm login node")
    opts = options(cfg)
    run_dir = cfg.run_dir
    path = run_dir / SCRIPT
    path.write_text(script(cfg, command, opts))
    now = time.time()
    out = _run(["sbatch", "--parsable", str(path)])
    job_id = out.strip().split(";")[0]
    runfiles.write_json_atomic(run_dir / LAUNCHER, {
        "backend": "slurm", "job_id": job_id, "host": socket.gethostname(), "launched_at": now,
        "queued_at": now, "submitted_at": now, "script": str(path), "command": command,
        "partition": opts.partition, "nodes": cfg.distributed.num_machines,
        "gpus_per_node": opts.gpus_per_node, "cwd": os.getcwd(), "config": str(config_path)})
    return job_id


def _parse_scontrol(text: str) -> dict[str, str]:
    """`scontrol show job -o`: one line of Key=Value fields (values may hold spaces only in a few
    keys we do not read)."""
    fields = {}
    for token in text.split():
        key, sep, value = token.partition("=")
        if sep:
            fields[key] = value
    return fields


def job_info(job_id: str | int | None, fresh: bool = False) -> dict[str, Any] | None:
    """The job's state from Slurm: {state, reason, active, exit_code, nodes}; None when Slurm no longer
    knows it (it ended longer ago than MinJobAge and there is no accounting) or cannot be asked."""
    if not job_id:
        return None
    key = str(job_id)
    hit = _cache.get(key)
    if hit and not fresh and time.time() - hit[0] < _CACHE_S:
        return hit[1]
    info = None
    try:
        fields = _parse_scontrol(_run(["scontrol", "show", "job", "-o", key], timeout=30))
        if fields.get("JobState"):
            info = {"state": fields["JobState"], "reason": fields.get("Reason"),
                    "exit_code": fields.get("ExitCode"),
                    "nodes": None if fields.get("NodeList") in (None, "(null)") else fields["NodeList"]}
    except SlurmError:
        pass
    if info is None and shutil.which("sacct"):
        try:
            line = _run(["sacct", "-n", "-P", "-X", "-j", key, "-o", "State,ExitCode,Reason,NodeList"],
                        timeout=30).strip().splitlines()
            if line:
                state, exit_code, reason, nodes = (line[0].split("|") + ["", "", "", ""])[:4]
                info = {"state": state.split()[0], "reason": reason, "exit_code": exit_code, "nodes": nodes}
        except SlurmError:
            pass
    if info is not None:
        info["active"] = info["state"] in ACTIVE
    _cache[key] = (time.time(), info)
    return info


def cancel(job_id: str | int) -> None:
    _run(["scancel", str(job_id)])
    _cache.pop(str(job_id), None)


def _log_error(run_dir: Path, lines: int = 200) -> str | None:
    """The most telling line of a failed job's log: the last exception or error line."""
    path = run_dir / "train.log"
    if not path.exists():
        return None
    tail = path.read_text(errors="replace").splitlines()[-lines:]
    for line in reversed(tail):
        text = line.strip()
        if text and ("Error" in text or "error:" in text or "Exception" in text):
            return text[:500]
    return next((t.strip()[:500] for t in reversed(tail) if t.strip()), None)


def effective_status(run_dir: Path, status: dict[str, Any], launcher: dict[str, Any]) -> dict[str, Any]:
    """A Slurm run's status: the trainer's status.json while it has one, `pending` with Slurm's reason
    while queued, `failed` with the job's error when the job ended without a final status."""
    if status.get("state") in runfiles.FINAL_STATES:
        return status
    job = job_info(launcher.get("job_id"))
    if job is None:
        return status  # Slurm cannot tell: trust the files
    status = {**status, "job_state": job["state"]}
    if job["state"] == "PENDING":
        return {**status, "state": "pending", "pending_reason": f"Slurm: {job['reason'] or 'queued'}"}
    if job["active"]:
        return status
    error = _log_error(run_dir)
    step = status.get("step") or 0
    return {**status, "state": "failed", "died": True,
            "error": f"Slurm job {launcher.get('job_id')} ended {job['state']} (exit code {job['exit_code']}) "
                     f"at step {step} without a final status" + (f": {error}" if error else "")}
