"""Checkpoints and final/: resume state apart from the export, bf16 exports, atomic writes and prunes,
and kill -9 at the worst moments (tests/train_worker.py kills the trainer's process group there)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from trainer_runs import TINY_EXACT, WORKER, tiny_exact

from labkit import checkpoint, runfiles
from labkit.config import RunConfig
from labkit.evaluate import resolve_target
from labkit.launch import _child_env, free_port, launch_command
from labkit.train import checkpoints, train

ROOT = Path(__file__).resolve().parent.parent


def cfg_for(tmp_path, **kw) -> RunConfig:
    return tiny_exact(tmp_path, **{"name": "c", "effective_batch_size": 16, **kw})


def save(cfg: RunConfig) -> Path:
    return cfg.save(cfg.run_dir / "config.yaml")


def run_worker(cfg: RunConfig, *extra: str) -> subprocess.CompletedProcess:
    path = cfg.save(cfg.run_dir / "config.yaml")
    env = {**_child_env(cpu=True), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(WORKER), str(path), *extra], capture_output=True, text=True,
                          timeout=600, env=env, cwd=ROOT, start_new_session=True)


def dtypes(directory: Path) -> set[str]:
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return {str(f.get_slice(k).get_dtype()) for k in f.keys()}


def test_a_checkpoint_holds_resume_state_apart_from_one_bf16_export(tmp_path):
    cfg = cfg_for(tmp_path, max_steps=2, save_every_samples=32)
    assert train(cfg)["state"] == "finished"
    (ckpt,) = checkpoints(cfg.run_dir)
    assert (ckpt / "resume" / ".metadata").is_file() and (ckpt / "resume" / "rng-rank0.pt").is_file()
    assert list(ckpt.glob("*.safetensors")) == [ckpt / "model.safetensors"]  # the export, once
    assert not list((ckpt / "resume").glob("*.safetensors"))
    assert dtypes(ckpt) == {"BF16"} and dtypes(cfg.run_dir / "final") == {"BF16"}
    assert json.loads((cfg.run_dir / "final" / "checkpoint.json").read_text())["step"] == 2


def test_export_dtype_float32_is_honoured(tmp_path):
    cfg = cfg_for(tmp_path, max_steps=1, export_dtype="float32")
    assert train(cfg)["state"] == "finished"
    assert dtypes(cfg.run_dir / "final") == {"F32"}


def test_kill_9_while_final_is_written_never_gives_evaluation_a_torn_final(tmp_path):
    # The newest checkpoint is at max_steps: the resume below must train no extra step.
    cfg = cfg_for(tmp_path, max_steps=4, save_every_samples=32)
    proc = run_worker(cfg, "--kill-in", "final")
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert (cfg.run_dir / ".tmp-final").is_dir() and not (cfg.run_dir / "final").exists()
    assert resolve_target(cfg.run_dir).checkpoint.name == "step-00000004"
    resumed = train(cfg.with_updates(resume=True))
    assert resumed["state"] == "finished" and resumed["step"] == 4
    assert [r["step"] for r in runfiles.read_metrics(cfg.run_dir)] == [1, 2, 3, 4]
    assert not (cfg.run_dir / ".tmp-final").exists()
    assert resolve_target(cfg.run_dir).checkpoint.name == "final"


def test_a_final_dir_without_its_completion_marker_is_never_evaluated(tmp_path):
    cfg = cfg_for(tmp_path, max_steps=2, save_every_samples=32)
    assert train(cfg)["state"] == "finished"
    (cfg.run_dir / "final" / "checkpoint.json").unlink()  # as an old trainer killed mid-write left it
    assert resolve_target(cfg.run_dir).checkpoint.name == "step-00000002"


def test_kill_9_while_pruning_leaves_no_half_deleted_checkpoint(tmp_path):
    cfg = cfg_for(tmp_path, max_steps=4, save_every_samples=16, keep_checkpoints=1)
    proc = run_worker(cfg, "--kill-in", "prune")
    assert proc.returncode == -9, proc.stderr[-3000:]
    root = cfg.run_dir / "checkpoints"
    assert [p.name for p in checkpoints(cfg.run_dir)] == ["step-00000002"]
    assert [p.name for p in root.iterdir() if p.name.startswith("step-")] == ["step-00000002"]
    assert [p for p in root.iterdir() if p.name.startswith(".trash-step-00000001")]
    assert train(cfg.with_updates(resume=True))["state"] == "finished"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004"]


def test_leftovers_of_older_trainers_are_cleaned_at_start(tmp_path):
    run = tmp_path / "r"
    for name in ("step-00000003", ".tmp-step-00000004", ".trash-step-00000001-9"):
        (run / "checkpoints" / name).mkdir(parents=True)
        (run / "checkpoints" / name / "model.safetensors").write_text("x")
    (run / ".tmp-final").mkdir()
    good = run / "checkpoints" / "step-00000002"
    good.mkdir()
    (good / "checkpoint.json").write_text("{}")
    removed = {p.name for p in checkpoint.clean_leftovers(run)}
    assert removed == {"step-00000003", ".tmp-step-00000004", ".trash-step-00000001-9", ".tmp-final"}
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002"]


def test_a_run_stopped_early_skips_the_final_export_unless_asked(tmp_path):
    for ask in (False, True):
        cfg = cfg_for(tmp_path, name=f"stop-{ask}", save_final_on_stop=ask,
                      early_stop={"grad_norm_max": 1e-6, "grad_norm_patience": 1})
        final = train(cfg)
        assert final["state"] == "stopped" and final["step"] == 1
        assert checkpoint.is_complete(cfg.run_dir / "final") is ask
        assert checkpoints(cfg.run_dir)  # still resumable


def fsdp_worker(configs: list[Path], *extra: str) -> subprocess.CompletedProcess:
    cfg = RunConfig(datasets=["skills"], distributed={"cpu": True, "num_processes": 2})
    cmd = launch_command(cfg, "unused", port=free_port(), cuda=False)[:-3] + [str(WORKER), *map(str, configs),
                                                                              *extra]
    env = {**_child_env(cpu=True), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT,
                          start_new_session=True)


@pytest.mark.slow
def test_kill_9_under_fsdp_at_an_epoch_and_a_phase_boundary_then_resume_on_one_rank(tmp_path):
    """Phase 0: 2 epochs of 3 steps, phase 1: 1 epoch; checkpoints at steps 3 (epoch boundary) and 6 (phase
    boundary). Killed at the start of steps 5 and 8, resumed on 2 ranks, then on 1 (another world size)."""
    kw = dict(TINY_EXACT, datasets=[], phases=[{"datasets": ["eval_exact"], "epochs": 2}, {"datasets": ["eval_exact"]}],
              effective_batch_size=40, save_every_samples=120, keep_checkpoints=3,
              distributed={"cpu": True, "num_processes": 2, "strategy": "fsdp"})
    ref = RunConfig(name="ref", runs_root=str(tmp_path), **kw)
    crash = RunConfig(name="crash", runs_root=str(tmp_path), **kw)
    first = fsdp_worker([save(ref), save(crash)], "--fault-run", "crash", "--kill-at-step", "5")
    assert first.returncode != 0, first.stderr[-3000:]
    assert runfiles.read_status(ref.run_dir)["state"] == "finished", first.stderr[-3000:]
    assert [r["step"] for r in runfiles.read_metrics(crash.run_dir)] == [1, 2, 3, 4]
    assert checkpoint.read_position(checkpoints(crash.run_dir)[-1])["step"] == 3
    second = fsdp_worker([save(crash.with_updates(resume=True))], "--kill-at-step", "8")
    assert second.returncode != 0
    assert [r["step"] for r in runfiles.read_metrics(crash.run_dir)] == list(range(1, 8)), second.stderr[-3000:]
    pos = checkpoint.read_position(checkpoints(crash.run_dir)[-1])
    assert (pos["step"], pos["samples"], pos["phase"], pos["epoch"], pos["step_in_epoch"]) == (6, 240, 0, 1, 3)
    last = train(crash.with_updates(resume=True, **{"distributed.num_processes": 1}))
    assert last["state"] == "finished" and last["step"] == 9
    lines = (crash.run_dir / runfiles.METRICS).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 10))  # each step once
    got, want = runfiles.read_metrics(crash.run_dir), runfiles.read_metrics(ref.run_dir)
    assert [r["phase"] for r in got] == [0] * 6 + [1] * 3
    for a, b in zip(got, want):
        assert (a["samples"], a["lr"]) == (b["samples"], b["lr"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), a["step"]
