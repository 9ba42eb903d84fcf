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
    assert listing[0].split()[:4] == ["run", "state", "progress", "step"]
    assert listing[1].split()[:2] == ["slow", "running"] and listing[2].split()[:4] == ["quick", "finished", "100%", "3"]

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


def test_run_name_root_check_and_the_refusal_naming_resume_and_overwrite(config_file, tmp_path, capsys):
    other = tmp_path / "elsewhere"
    assert main(["run", str(config_file), "--name", "n1", "--root", str(other), "--check"]) == 0
    out = capsys.readouterr().out
    assert "name: n1" in out and f"would start in {other / 'n1'}" in out and not other.exists()

    assert main(["run", str(config_file), "--name", "n1", "--root", str(other), "--set", "max_steps=2",
                 "--set", "save_every_samples=8", "--wait"]) == 0
    first = Run(other / "n1")
    assert first.state() == "finished" and first.checkpoints()
    capsys.readouterr()
    # Same name again: refused, nothing touched, both ways forward named.
    assert main(["run", str(config_file), "--name", "n1", "--root", str(other)]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and first.state() == "finished"
    assert main(["run", str(config_file), "--name", "n1", "--root", str(other), "--check"]) == 2
    # --overwrite starts over and moves the old run aside instead of deleting it.
    assert main(["run", str(config_file), "--name", "n1", "--root", str(other), "--set", "max_steps=2",
                 "--set", "save_every_samples=8", "--overwrite", "--wait"]) == 0
    trashed = list((other / ".trash").glob("n1-*"))
    assert len(trashed) == 1 and (trashed[0] / "metrics.jsonl").is_file() and (trashed[0] / "checkpoints").is_dir()
    # --resume continues the run of that name.
    assert main(["run", str(config_file), "--name", "n1", "--root", str(other), "--set", "max_steps=3",
                 "--resume", "--wait"]) == 0
    assert "resuming from" in Run(other / "n1").tail(200)
    assert [r.name for r in runs(other)] == ["n1"]  # the trash is not a run


def test_ls_where_sort_and_columns(tmp_path, capsys):
    from test_table import make_run

    make_run(tmp_path, "lo", lr=1e-4)
    make_run(tmp_path, "hi", lr=1e-2, state="stopped", steps=5)
    assert main(["ls", "--root", str(tmp_path), "--sort", "learning_rate", "--columns", "learning_rate,adam_beta2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:6] == ["run", "state", "progress", "step", "learning_rate", "adam_beta2"]
    assert [ln.split()[0] for ln in lines[1:3]] == ["lo", "hi"]
    assert main(["ls", "--root", str(tmp_path), "--where", "state = 'stopped'"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [r.split()[0] for r in rows if r.strip()] == ["hi"]
    assert main(["ls", "--root", str(tmp_path), "--columns", "learning_rte"]) == 2
    assert "learning_rte" in capsys.readouterr().err


def test_sweep_set_overrides_the_base_config(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"name": "s", "base": {**CONFIG, "learning_rate": 1e-3},
                                    "axes": {"seed": [1, 2]}}))
    assert main(["sweep", str(spec), "--root", str(tmp_path / "runs"), "--set", "max_steps=7", "--dry-run"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    derived = yaml.safe_load((tmp_path / "runs" / "sweeps" / "s" / "spec.yaml").read_text())
    assert derived["base"]["max_steps"] == 7 and derived["axes"] == {"seed": [1, 2]}
    assert main(["sweep", str(spec), "--root", str(tmp_path / "runs"), "--set", "learning_rate=-1", "--dry-run"]) == 2
    assert "learning_rate" in capsys.readouterr().err


def test_sweep_progress_prints_one_line_per_start_stop_and_end(tmp_path):
    from labkit import runfiles
    from labkit.cli import SweepProgress

    lines = []
    p = SweepProgress(tmp_path, "s", ["s__a", "s__b"], out=lines.append)
    (tmp_path / "s__a").mkdir()
    (tmp_path / "s__b").mkdir()
    now = time.time()
    runfiles.write_json_atomic(tmp_path / "s__a" / runfiles.STATUS, {"state": "running", "updated_at": now})
    p.tick()
    p.tick()
    sd = tmp_path / "sweeps" / "s"
    sd.mkdir(parents=True)
    runfiles.write_json_atomic(sd / "sweep.json", {"started_at": now, "early_termination": {"decisions": [{
        "budget": 16, "axis": "samples", "stopped": ["s__a"],
        "ranking": [{"run": "s__b", "early_score": 1.5, "rank": 1}, {"run": "s__a", "early_score": 0.5, "rank": 2}]}]}})
    runfiles.write_json_atomic(tmp_path / "s__a" / runfiles.STATUS, {
        "state": "stopped", "step": 2, "total_steps": 5, "updated_at": now, "stop_reason": "STOP file: sweep"})
    p.tick()
    p.tick()
    text = [ln.split(" ", 1)[1] for ln in lines]
    assert text == ["start s__a", "stop  s__a: early score 0.5, rank 2 of 2 at 16 samples",
                    "end   s__a: stopped at step 2/5 (STOP file: sweep)"]


def test_version(capsys):
    from labkit import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"labkit {__version__}"
