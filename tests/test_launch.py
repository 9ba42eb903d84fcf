"""The launcher: real `accelerate launch` background runs of the tiny model, read live from their files."""

import json
import os
import signal
import subprocess
import sys

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import launch_command_parser
from waiting import wait_for

from labkit import runfiles
from labkit.config import ConfigError, RunConfig
from labkit.launch import DIED, TEMPLATES, Run, launch, launch_command, runs, write_multinode

TINY = dict(model="tiny", datasets=["skills"], effective_batch_size=8, max_tokens_per_device=512,
            max_seq_len=256, learning_rate=1e-3, seed=3, distributed={"cpu": True})


@pytest.fixture
def tiny_cfg(tmp_path, tiny_dir, monkeypatch):
    # Two runs share two cores: one thread each.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    def make(name: str, **kw) -> RunConfig:
        return RunConfig(**{**TINY, "name": name, "runs_root": str(tmp_path / "runs"), **kw})

    yield make
    for run in runs(tmp_path / "runs"):  # a failed test must not leave training processes behind
        if run.is_alive():
            run.kill(grace=2)



def test_two_runs_train_at_once_one_is_stopped_the_other_finishes(tiny_cfg):
    long = launch(tiny_cfg("long", epochs=5))
    short = launch(tiny_cfg("short", max_steps=6))
    assert long.status()["state"] == "pending"
    assert long.launcher()["command"][-1].endswith("long/config.yaml")
    assert long.launcher()["command"] != short.launcher()["command"]  # own port each

    wait_for(lambda: len(long.metrics()) >= 3, what=f"3 steps of 'long':\n{long.tail()}")
    live = long.metrics()
    assert long.status()["state"] == "running" and long.is_alive()
    assert list(live["step"]) == list(range(1, len(live) + 1))
    assert {"loss", "grad_norm", "samples", "lr"} <= set(live.columns)

    stopped = long.stop(timeout=180, reason="enough")
    assert stopped["state"] == "stopped" and "enough" in stopped["stop_reason"]
    last = long.metrics()["step"].iloc[-1]
    ckpt = json.loads((long.checkpoints()[-1] / "checkpoint.json").read_text())
    assert ckpt["step"] == last == stopped["step"]
    assert not long.is_alive()

    done = short.wait(timeout=300)
    assert done["state"] == "finished", short.tail(40)
    assert list(short.metrics()["step"]) == [1, 2, 3, 4, 5, 6]
    assert (short.dir / "final" / "config.json").is_file()
    log = (short.dir / "train.log").read_text()
    assert "[labkit] step 1/6 (17%) · samples 8 · loss " in log and "[labkit] step 6/6 (100%)" in log
    assert "\r" not in log  # plain lines in a log file, no progress-bar redraws
    assert "[labkit]" in short.tail(100)

    found = runs(short.dir.parent)
    assert [r.name for r in found] == ["short", "long"]  # newest first
    assert found[0] == short and found[0].config.max_steps == 6


def test_stop_right_after_launch_still_stops_the_run(tiny_cfg):
    # The trainer deletes stale STOP files when it starts: stop() must keep asking until it is heard.
    run = launch(tiny_cfg("early", epochs=5))
    status = run.stop(timeout=240, reason="changed my mind")
    assert status["state"] == "stopped" and "changed my mind" in status["stop_reason"], run.tail(40)
    assert status["step"] <= 3


def test_stop_kills_a_run_that_does_not_stop_in_time(tiny_cfg):
    run = launch(tiny_cfg("stubborn", epochs=5))
    status = run.stop(timeout=0, reason="now")
    assert status["state"] == "stopped" and status["stop_reason"] == "killed: did not stop within 0s (now)"
    assert not run.is_alive() and run.status()["state"] == "stopped"


def test_a_run_killed_with_sigkill_reads_as_failed(tiny_cfg):
    run = launch(tiny_cfg("doomed", epochs=5))
    wait_for(lambda: run.status().get("state") == "running" and run.status().get("pid"),
             what=f"'doomed' to start:\n{run.tail()}")
    os.kill(run.status()["pid"], signal.SIGKILL)  # as the OOM killer would
    wait_for(lambda: not run.is_alive(), timeout=60, what="the process group to exit")
    status = Run(run.dir).status()
    assert status["state"] == "failed" and status["error"].startswith(DIED)
    assert runfiles.read_status(run.dir)["state"] == "running"  # the files are left as the trainer left them


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", "/abs"])
def test_unsafe_run_names_are_rejected_before_anything_starts(tiny_cfg, tmp_path, name):
    with pytest.raises(ConfigError, match="is not a safe run name"):
        launch(tiny_cfg("ok"), name=name)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "escape").exists()


def test_config_problems_are_listed_and_nothing_starts(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError) as err:
        launch(tiny_cfg("bad", datasets=["skills", "no_such_data"], model=str(tmp_path / "no-model")))
    text = str(err.value)
    assert "run 'bad' cannot start" in text and "no_such_data" in text and "no config.json" in text
    assert not (tmp_path / "runs" / "bad").exists()


def test_a_finished_run_dir_is_not_reused_by_accident(tiny_cfg):
    cfg = tiny_cfg("taken")
    cfg.save(cfg.run_dir / "config.yaml")
    runfiles.write_json_atomic(cfg.run_dir / runfiles.STATUS, {"state": "finished", "step": 10})
    with pytest.raises(ConfigError, match="a finished run is already there; pick another name, set resume=True"):
        launch(cfg)
    assert runfiles.read_status(cfg.run_dir)["state"] == "finished"


def test_metrics_tolerate_a_torn_line_and_keep_the_newest_row_per_step(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    path = run_dir / runfiles.METRICS
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n{"step": 2, "loss": 2.4}\n{"step": 3, "lo')
    run = Run(run_dir)
    assert run.metrics()[["step", "loss"]].values.tolist() == [[1, 3.0], [2, 2.4]]
    with path.open("a") as fh:  # the torn line is completed by the next flush
        fh.write('ss": 2.0}\n{"step": 4, "loss": 1.9}\n')
    assert run.metrics()[["step", "loss"]].values.tolist() == [[1, 3.0], [2, 2.4], [3, 2.0], [4, 1.9]]
    tmp = path.with_name("m.tmp")  # a resume rewrites the file in place of the old one
    tmp.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.2}\n')
    os.replace(tmp, path)
    assert run.metrics()[["step", "loss"]].values.tolist() == [[1, 3.0], [2, 2.2]]


def test_tail_returns_the_last_lines_of_the_log(tmp_path):
    (tmp_path / "train.log").write_text("".join(f"line {i}\n" for i in range(5000)))
    assert Run(tmp_path).tail(3) == "line 4997\nline 4998\nline 4999"


# -- command lines and templates -------------------------------------------------------------------


@pytest.mark.parametrize("template", sorted(p.name for p in (TEMPLATES / "accelerate").glob("*.yaml")))
def test_accelerate_templates_are_valid_accelerate_configs(template):
    cfg = load_config_from_file(str(TEMPLATES / "accelerate" / template))
    assert cfg.compute_environment.value == "LOCAL_MACHINE" and cfg.num_processes >= 1
    # labkit shards the model itself (labkit.sharding): no template may hard-code a wrap class or ask
    # accelerate for FSDP, which the trainer would not use.
    assert cfg.distributed_type.value in ("MULTI_GPU", "MULTI_CPU") and not cfg.fsdp_config


@pytest.mark.parametrize("distributed, expected", [
    ({"cpu": True}, ["--cpu", "--num_processes", "1", "--mixed_precision", "no"]),
    # `--cpu` would start one process; several CPU processes go through accelerate's torchrun path.
    ({"cpu": True, "num_processes": 2}, ["--multi_gpu", "--num_processes", "2", "--mixed_precision", "no"]),
    ({"num_processes": 4}, ["--multi_gpu", "--num_processes", "4"]),
    # The trainer runs FSDP itself: accelerate starts 8 processes, on one node bound to 127.0.0.1.
    ({"num_processes": 8, "strategy": "fsdp", "mixed_precision": "bf16"},
     ["--multi_gpu", "--mixed_precision", "bf16", "--main_process_ip", "127.0.0.1"]),
    ({"num_processes": 2, "accelerate_config": "ddp"}, ["--config_file", str(TEMPLATES / "accelerate" / "ddp.yaml")]),
])
def test_launch_commands_are_accepted_by_accelerates_parser(distributed, expected):
    cfg = RunConfig(datasets=["skills"], distributed=distributed)
    cmd = launch_command(cfg, "runs/run/config.yaml", port=29555, cuda=True)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    args = launch_command_parser().parse_args(cmd[3:])
    assert args.main_process_port == 29555 and args.module and args.training_script == "labkit.train"
    flat = " ".join(cmd)
    assert " ".join(expected) in flat or all(e in cmd for e in expected)


def test_accelerate_config_name_that_does_not_exist_is_named():
    cfg = RunConfig(datasets=["skills"], distributed={"accelerate_config": "nope"})
    with pytest.raises(ConfigError, match="'nope' is neither a file nor a template"):
        launch_command(cfg, "c.yaml", cuda=True)


def _echo_python(path):
    # Let the scripts print the accelerate command line instead of running it.
    path.write_text(path.read_text().replace(sys.executable, "echo"))


def test_multinode_scripts_give_each_machine_its_rank_and_machine_0s_address(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = RunConfig(name="big", datasets=["skills"], distributed={"num_processes": 4, "num_machines": 2})
    files = write_multinode(cfg, tmp_path / "launch")
    assert [f.name for f in files] == ["node_0.sh", "node_1.sh", "labkit.sbatch"]
    assert (tmp_path / "runs" / "big" / "config.yaml").is_file()

    node1 = files[1]
    _echo_python(node1)
    out = subprocess.run(["bash", str(node1)], capture_output=True, text=True,
                         env={**os.environ, "MAIN_PROCESS_IP": "10.1.2.3"})
    assert out.returncode == 0, out.stderr
    assert "--num_processes 4 --num_machines 2" in out.stdout
    assert "--machine_rank 1 --main_process_ip 10.1.2.3 --main_process_port 29500" in out.stdout
    env = {k: v for k, v in os.environ.items() if k != "MAIN_PROCESS_IP"}
    missing = subprocess.run(["bash", str(node1)], capture_output=True, text=True, env=env)
    assert missing.returncode != 0 and "set MAIN_PROCESS_IP" in missing.stderr

    # Slurm: fake srun (runs each node's task, with its SLURM_PROCID) and scontrol (lists the hosts).
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "scontrol").write_text("#!/bin/bash\nprintf 'gpu-a\\ngpu-b\\n'\n")
    (shims / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n'
                                'for r in 0 1; do SLURM_PROCID=$r "$@"; done\n')
    for f in shims.iterdir():
        f.chmod(0o755)
    sbatch = files[2]
    text = sbatch.read_text()
    assert "#SBATCH --nodes=2" in text and "#SBATCH --gpus-per-node=2" in text
    _echo_python(sbatch)
    out = subprocess.run(["bash", str(sbatch)], capture_output=True, text=True,
                         env={**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-[a-b]"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2
    for rank, line in enumerate(lines):
        assert f"--machine_rank {rank} --main_process_ip gpu-a --main_process_port 29500" in line
        assert line.endswith("-m labkit.train runs/big/config.yaml")


# -- rendezvous on loopback -------------------------------------------------------------------------


def _listening(pids: list[int]) -> set[str]:
    """Addresses the processes' TCP sockets listen on (from /proc)."""
    import ipaddress
    import socket

    inodes = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    out = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in open(table).read().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A" and parts[9] in inodes:  # 0A: LISTEN
                raw = bytes.fromhex(parts[1].split(":")[0])
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                addr = ipaddress.ip_address(socket.inet_ntop(family, raw))
                out.add(str(getattr(addr, "ipv4_mapped", None) or addr))
    return out


def test_single_node_child_env_binds_every_rendezvous_to_loopback():
    from labkit.launch import _child_env

    env = _child_env(cpu=True)
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["LABKIT_RDZV_HOST"] == "127.0.0.1"
    assert env["GLOO_SOCKET_IFNAME"] == "lo"
    assert "LABKIT_RDZV_HOST" not in _child_env(cpu=True, single_node=False)


@pytest.mark.slow
def test_a_two_process_run_listens_on_loopback_only(tiny_cfg):
    def group_members(pgid):
        found = []
        for p in filter(str.isdigit, os.listdir("/proc")):
            try:
                if os.getpgid(int(p)) == pgid:
                    found.append(int(p))
            except ProcessLookupError:
                pass
        return found

    run = launch(tiny_cfg("ddp", epochs=20, distributed={"cpu": True, "num_processes": 2}))
    wait_for(lambda: len(run.metrics()) >= 1, what=f"'ddp' to train:\n{run.tail(40)}")
    addresses = _listening(group_members(run.launcher()["pgid"]))
    run.kill(grace=2)
    assert addresses, "no listening socket found: the test would prove nothing"
    assert addresses <= {"127.0.0.1", "::1"}, f"listens beyond loopback: {addresses}"
