"""`labkit` on real run directories of real background runs."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from labkit.cli import main
from labkit.launch import Run, runs

CONFIG = dict(model="tiny", datasets=["skills"], effective_batch_size=8, max_tokens_per_device=512,
              max_seq_len=256, learning_rate=1e-3, distributed={"cpu": True})


@pytest.fixture
def config_file(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "name": "cli", "runs_root": str(tmp_path / "runs")}))
    yield path
    for run in runs(tmp_path / "runs"):  # a failed test must not leave training processes behind
        if run.is_alive():
            run.kill(grace=2)


def test_run_ls_stop_compare_tail(config_file, tmp_path, capsys):
    root = str(tmp_path / "runs")
    assert main(["run", str(config_file), "--set", "name=quick", "--set", "max_steps=3", "--wait"]) == 0
    assert "quick: finished at step 3" in capsys.readouterr().out

    assert main(["run", str(config_file), "--set", "name=slow", "--set", "epochs=5"]) == 0
    assert "started slow" in capsys.readouterr().out
    slow = Run(tmp_path / "runs" / "slow")
    deadline = time.time() + 240
    while len(slow.metrics()) < 2 and time.time() < deadline:
        time.sleep(0.3)

    assert main(["ls", "--root", root]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split()[:4] == ["name", "state", "step", "total_steps"]
    assert listing[1].split()[:2] == ["slow", "running"] and listing[2].split()[:3] == ["quick", "finished", "3"]

    assert main(["stop", "slow", "--root", root, "--reason", "from the shell"]) == 0
    assert "slow: stopped at step" in capsys.readouterr().out
    assert slow.status()["stop_reason"] == "STOP file: from the shell"

    assert main(["compare", "quick", "slow", "--root", root, "--first-steps", "2"]) == 0
    table = capsys.readouterr().out
    assert "quick" in table and "slow" in table

    assert main(["tail", "quick", "--root", root, "-n", "5"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 5


def test_bad_input_exits_2_with_a_clear_message(config_file, tmp_path, capsys):
    assert main(["run", str(config_file), "--set", "name=../x"]) == 2
    assert "'../x' is not a safe run name" in capsys.readouterr().err
    assert main(["stop", "ghost", "--root", str(tmp_path / "runs")]) == 2
    assert "no run 'ghost'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", str(config_file), "--set", "novalue"])
    assert not (tmp_path / "runs").exists()


def test_python_dash_m_labkit_is_the_cli(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    out = subprocess.run([sys.executable, "-m", "labkit", "ls", "--root", str(tmp_path)],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "(no runs)"
    helptext = subprocess.run([sys.executable, "-m", "labkit", "--help"], capture_output=True, text=True, env=env)
    for sub in ("run", "ls", "stop", "compare", "tail", "sync"):
        assert f"    {sub} " in helptext.stdout
