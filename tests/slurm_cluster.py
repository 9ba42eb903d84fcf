"""A real single-node Slurm for the tests: munged, slurmctld and slurmd on this host, as root.

Debian's `slurm-wlm` and `munge` packages (`.ci/run` installs them). Everything lives in a temp
dir (config, state, logs, munge socket) and on free ports; clients find it through $SLURM_CONF,
which the jobs and the run notebooks inherit. The partition oversubscribes the node's few cores
(OverSubscribe=FORCE) so that a 4-run sweep runs all at once on a 2-core CI machine, as it would
on four nodes. Skipped, with the reason, when the binaries are missing or we are not root.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "scancel")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_line() -> str:
    """This host as slurmd sees it (`slurmd -C`): real CPUs and memory, so the node is not drained."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("NodeName="))
    return line + " NodeAddr=127.0.0.1 State=UNKNOWN"


def _kill_pidfile(path: Path) -> None:
    try:
        os.kill(int(path.read_text().strip()), signal.SIGTERM)
    except (OSError, ValueError):
        pass


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    missing = [d for d in DAEMONS if not shutil.which(d)]
    if missing:
        pytest.skip(f"no Slurm here ({', '.join(missing)} not found): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("the test Slurm runs its daemons as root")
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "munge"):
        (d / sub).mkdir()
    os.chmod(d / "munge", 0o700)
    key = d / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o600)
    sock = d / "munge" / "munge.socket"
    node_line = _node_line()
    node = node_line.split()[0].split("=", 1)[1]
    conf = d / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=labkit-test", f"SlurmctldHost={node}(127.0.0.1)",
        "SlurmUser=root", "SlurmdUser=root",
        f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={sock}",
        f"StateSaveLocation={d / 'state'}", f"SlurmdSpoolDir={d / 'spool'}",
        f"SlurmctldPidFile={d / 'slurmctld.pid'}", f"SlurmdPidFile={d / 'slurmd.pid'}",
        f"SlurmctldLogFile={d / 'slurmctld.log'}", f"SlurmdLogFile={d / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/backfill", "ReturnToService=2", "MpiDefault=none",
        "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        "InactiveLimit=0", "MinJobAge=600", "KillWait=10", "SlurmdTimeout=60", "SlurmctldTimeout=60",
        "SchedulerParameters=sched_interval=2",
        node_line,
        f"PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:8", ""]))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)

    def run(*cmd: str) -> None:
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=60)

    try:
        run("munged", "--force", f"--socket={sock}", f"--key-file={key}", f"--log-file={d / 'munged.log'}",
            f"--pid-file={d / 'munged.pid'}", f"--seed-file={d / 'munge' / 'seed'}")
        run("slurmctld", "-f", str(conf))
        run("slurmd", "-f", str(conf), "-N", node)
        deadline = time.time() + 60
        state = ""
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True)
            state = out.stdout.strip()
            if state == "idle":
                break
            time.sleep(0.5)
        else:
            logs = "\n".join((d / f).read_text()[-2000:] for f in ("slurmctld.log", "slurmd.log")
                             if (d / f).exists())
            pytest.fail(f"the test Slurm node did not become idle (sinfo: {state!r}):\n{logs}")
        yield {"dir": d, "conf": conf, "node": node, "env": env}
    finally:
        subprocess.run(["scancel", "--full", "--partition=test"], env=env, capture_output=True)
        deadline = time.time() + 30  # jobs' slurmstepd outlive a shutdown: let them end first
        while time.time() < deadline:
            out = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True)
            if out.returncode or not out.stdout.strip():
                break
            time.sleep(0.5)
        subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True, timeout=60)
        time.sleep(1)
        for pidfile in ("slurmd.pid", "slurmctld.pid", "munged.pid"):
            _kill_pidfile(d / pidfile)
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
