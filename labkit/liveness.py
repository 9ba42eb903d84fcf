"""Whether a run's processes still exist, and the state a run really is in.

A run that was killed with -9 (the OOM killer, a preempted node) never writes a final status:
status.json says `running` forever. Everyone who shows a state (`Run.status()`, `labkit ls`,
`labkit stop`, the store) therefore asks `effective_status(run_dir)` instead of reading the file.

A process is identified by its pid *and* its start time (field 22 of /proc/PID/stat, in clock
ticks since boot), recorded when it starts: pids are recycled, and a live stranger holding the
trainer's old pid must not keep a dead run `running`. Without /proc (macOS) only the pid is
checked. Runs placed on Slurm are judged by their job's state (labkit.slurm), runs started on
another host by their files alone (their processes are not visible from here).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from labkit import runfiles, slurm

LAUNCHER = "launcher.json"
# launch() writes status.json (pending) a moment before launcher.json: a run in that window is alive.
LAUNCH_WINDOW_S = 10.0
DIED = "died at step"  # how the error of a dead run begins
RUN_ENV = "LABKIT_RUN_ID"  # set for every process of a local launch (see run_processes)


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (which may hold spaces and parentheses), or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return raw[raw.rfind(b")") + 2:].decode().split()


def has_proc() -> bool:
    return Path("/proc/self/stat").exists()


def start_time(pid: int | None) -> int | None:
    """The process's start time in clock ticks since boot, or None when there is no such process
    (or it is a zombie: exited, not yet reaped)."""
    if not pid:
        return None
    fields = _stat_fields(int(pid))
    if fields is None or fields[0] in ("Z", "X"):  # fields[0] is field 3 (state)
        return None
    return int(fields[19])  # field 22


def _start_wall(ticks: int) -> float:
    """Unix time at which a process with start time `ticks` started."""
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


def identity(pid: int | None = None) -> dict[str, Any]:
    """`{"pid": ..., "pid_start": ...}` of a process (default: this one), to record when it starts."""
    pid = pid or os.getpid()
    return {"pid": pid, "pid_start": start_time(pid)}


def _probe(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def process_alive(pid: int | None, pid_start: int | None = None, started_before: float | None = None) -> bool:
    """Whether `pid` is still the process recorded: same start time (`pid_start`), or, with only a
    wall-clock time known (`started_before`: the process existed then), one that started before it."""
    if not pid:
        return False
    if not has_proc():
        return _probe(int(pid))
    ticks = start_time(pid)
    if ticks is None:
        return False
    if pid_start is not None:
        return ticks == int(pid_start)
    if started_before is not None:
        return _start_wall(ticks) <= started_before + 2.0  # tick rounding and clock steps
    return True


def group_alive(pgid: int | None, leader_start: int | None = None) -> bool:
    """Whether the process group led by `pgid` still has members.

    The group outlives its leader (accelerate's children keep running when the launcher is killed),
    and the kernel does not hand out a pid still in use as a group id: so the group is ours while it
    exists, unless its id now belongs to a new process (a recycled pid, another start time).
    """
    if not pgid:
        return False
    try:
        os.killpg(int(pgid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if leader_start is None or not has_proc():
        return True
    ticks = start_time(pgid)
    if ticks is None:
        # Leader gone (or a zombie): the members left are ours, unless they are zombies too.
        return any(start_time(p) is not None for p in group_members(int(pgid)))
    return ticks == int(leader_start)


_scan: tuple[float, dict[str, list[int]]] = (0.0, {})


def run_processes(run_id: str | None, max_age: float = 1.0) -> list[int]:
    """Live processes carrying `LABKIT_RUN_ID=run_id` in their environment: every process a launch
    started, however it was spawned. torchrun starts each worker in a session of its own, so after
    a kill -9 of the launcher its workers live on outside the launcher's process group (holding
    their GPUs); this finds them. One scan of /proc serves all runs for `max_age` seconds."""
    global _scan
    if not run_id or not has_proc():
        return []
    taken, table = _scan
    if time.monotonic() - taken > max_age:
        needle = f"{RUN_ENV}=".encode()
        table = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                data = Path(f"/proc/{entry.name}/environ").read_bytes()
            except OSError:
                continue
            at = data.find(needle)
            while at > 0 and data[at - 1] != 0:  # only at the start of an entry
                at = data.find(needle, at + 1)
            if at < 0 or start_time(int(entry.name)) is None:
                continue
            end = data.find(b"\0", at)
            value = data[at + len(needle): end if end >= 0 else None].decode(errors="replace")
            table.setdefault(value, []).append(int(entry.name))
        _scan = (time.monotonic(), table)
    return list(table.get(run_id, []))


def rescan() -> None:
    """Make the next run_processes() read /proc again."""
    global _scan
    _scan = (0.0, {})


def group_members(pgid: int) -> list[int]:
    """Pids of the processes in group `pgid` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and int(fields[2]) == pgid:  # field 5: pgrp
                out.append(int(entry.name))
    return out


# -- runs ----------------------------------------------------------------------------------------


def _last_step(run_dir: Path, status: dict[str, Any]) -> int:
    """The last step the run logged: status.json's, or metrics.jsonl's when that is further (only the
    file's tail is read: a dead run is shown on every Board refresh)."""
    step = status.get("step") or 0
    try:
        with (run_dir / runfiles.METRICS).open("rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 65536))
            lines = fh.read().splitlines()
    except OSError:
        return step
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a torn last line, or the cut first one
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            return max(step, row["step"])
    return step


def alive(run_dir: str | Path, launcher: dict[str, Any] | None = None,
          status: dict[str, Any] | None = None) -> bool | None:
    """Whether the run's processes exist: True/False, or None when this host cannot tell (a run
    started on another host, or in a Slurm job whose state the scheduler no longer knows)."""
    run_dir = Path(run_dir)
    launcher = runfiles.read_json(run_dir / LAUNCHER) if launcher is None else launcher
    status = runfiles.read_status(run_dir) if status is None else status
    if launcher.get("backend") == "slurm":
        job = slurm.job_info(launcher.get("job_id"))
        return None if job is None else job["active"]
    if launcher.get("host") not in (None, socket.gethostname()):
        return None
    if launcher.get("pgid"):
        return group_alive(launcher["pgid"], launcher.get("pid_start")) or bool(run_processes(launcher.get("run_id")))
    if status.get("state") == "pending" and time.time() - (status.get("launched_at") or 0) < LAUNCH_WINDOW_S:
        return True  # launch() is between writing status.json and launcher.json
    # A trainer started some other way (`python -m labkit.train`, a test) has only its status.json.
    if status.get("pid"):
        return process_alive(status["pid"], status.get("pid_start"), status.get("started_at"))
    return False


def effective_status(run_dir: str | Path) -> dict[str, Any]:
    """status.json as it really is: a pending/running run whose processes are gone reads `failed`
    with `died: true`, the last step it logged, and an error saying so (the file is left as it was).

    Slurm runs also get `pending_reason` while queued, and the job's error when the job ended
    without a final status. This is the one function every view of a run's state should call.
    """
    run_dir = Path(run_dir)
    status = runfiles.read_status(run_dir)
    launcher = runfiles.read_json(run_dir / LAUNCHER)
    if launcher.get("pending_reason") and status.get("state") == "pending":
        status = {**status, "pending_reason": launcher["pending_reason"]}
    if launcher.get("backend") == "slurm":
        return slurm.effective_status(run_dir, status, launcher)
    if status.get("state") not in ("running", "pending"):
        return status
    if alive(run_dir, launcher, status) is False:
        step = _last_step(run_dir, status)
        pid = launcher.get("pid") or status.get("pid")
        status = {**status, "state": "failed", "died": True, "step": step,
                  "error": f"{DIED} {step}: process {pid} exited without a final status "
                           "(killed with -9, out of memory, or a crash; see train.log)"}
    return status


def effective_state(run_dir: str | Path) -> str | None:
    """The `state` of `effective_status(run_dir)`."""
    return effective_status(run_dir).get("state")
