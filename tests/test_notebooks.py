"""Every notebook executes headless with papermill (a real python3 kernel), training the tiny model
for a few steps, and keeps the results it recorded. The tests assert on those recorded outputs.

Kernels start in notebooks/, as JupyterLab starts them: relative paths must resolve against the project.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from labkit import report

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"

TINY = {
    "model": "tiny",
    "datasets": ["knowledge"],
    "max_steps": 6,
    "effective_batch_size": 8,
    "max_tokens_per_device": 2048,
    "max_seq_len": 256,
    "learning_rate": 3.0e-3,
    "save_final": True,
    "keep_checkpoints": 1,
    "distributed": {"cpu": True},
}
QUIET = {"evaluate_tasks": [], "poll_seconds": 0.5}


def execute(name: str, out: Path, **parameters) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    report.execute(NOTEBOOKS / name, out, {"interactive": False, **parameters}, cwd=NOTEBOOKS)
    return report.recorded(out)


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def images(notebook: Path) -> int:
    nb = json.loads(notebook.read_text())
    return sum(1 for c in nb["cells"] for o in c.get("outputs", [])
               if any(m in o.get("data", {}) for m in ("image/svg+xml", "image/png")))


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_dir):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def one_run(root):
    cfg = root / "one.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "name": "one"}))
    out = root / "one" / "report.ipynb"
    rec = execute("01_run.ipynb", out, config_path=str(cfg), runs_root=str(root),
                  evaluate_tasks=["labkit_knowledge_mc", "labkit_skills_exact"], eval_limit=3, poll_seconds=0.5)
    return out, rec


@pytest.fixture(scope="module")
def grid(root):
    spec = write_spec(root / "grid.yaml", {
        "name": "grid", "base": {**TINY, "max_steps": 40}, "axes": {"learning_rate": [3e-3, 3e-2]}, "concurrency": 2,
        "early_termination": {"probe_samples": 16, "stop_fraction": 0.5}, "parameters": QUIET})
    out = root / "sweeps" / "grid" / "report.ipynb"
    return out, execute("02_sweep.ipynb", out, sweep_spec=str(spec), runs_root=str(root))


def test_run_notebook_trains_evaluates_and_records_a_summary(one_run):
    out, rec = one_run
    run = rec["run"]
    assert run["state"] == "finished" and run["step"] == TINY["max_steps"]
    assert run["samples"] == TINY["max_steps"] * TINY["effective_batch_size"]
    assert 0 < run["final_loss"] < 20
    assert {"labkit_knowledge_mc/acc", "labkit_skills_exact/exact_match"} <= set(run["evals"])
    assert images(out) >= 1  # the loss curve, as an image: the report needs no widget or network


def test_run_notebook_defaults_resolve_against_the_project_from_the_notebooks_folder(tmp_path, tiny_dir, monkeypatch):
    # As a new user meets it: JupyterLab's kernel cwd is notebooks/, the paths are the defaults.
    monkeypatch.setenv("LABKIT_RUNS", str(tmp_path / "runs"))
    out = tmp_path / "default.ipynb"
    rec = execute("01_run.ipynb", out, overrides={"max_steps": 2, "warmup_steps": 0, "val_dataset": None, "epochs": 1},
                  **QUIET)
    assert rec["run"]["run"] == "demo" and rec["run"]["state"] == "finished"
    assert (tmp_path / "runs" / "demo" / "metrics.jsonl").is_file()
    assert not (NOTEBOOKS / "runs").exists()


def test_sweep_notebook_stops_half_the_grid_and_shows_the_heatmap(grid):
    out, rec = grid
    assert "grid: learning rate (2 runs)" in out.read_text()
    sweep = rec["sweep"]
    assert len(sweep["runs"]) == 2
    assert len(sweep["early_termination"]["stopped"]) == 1
    states = sorted(r["state"] for r in rec["summary"])
    assert states == ["finished", "stopped"]
    assert images(out) >= 1


def test_early_dynamics_notebook_scores_every_run_and_correlates(root, one_run, grid):
    out = root / "early.ipynb"
    rec = execute("03_early_dynamics.ipynb", out, runs_root=str(root), first_samples=16,
                  task="labkit_knowledge_mc", metric="acc")
    early = {r["run_id"]: r for r in rec["early"]}
    assert {"one", "grid__lr3e-3", "grid__lr3e-2"} <= set(early)
    ranked = {k: r for k, r in early.items() if r["complete"]}
    assert {"one", "grid__lr3e-3", "grid__lr3e-2"} <= set(ranked)
    assert all(r["early_score"] is not None for r in ranked.values())
    assert all(r["early_score"] is None and r["early_rank"] is None for k, r in early.items() if k not in ranked)
    assert min(r["early_rank"] for r in ranked.values()) == 1  # ties share a rank
    assert {r["signal"] for r in rec["correlation"]} >= {"grad_norm_mean", "early_score"}
    assert images(out) >= 2


@pytest.fixture(scope="module")
def slices(root):
    """The first lines of each shipped dataset, so a phase is a few steps."""
    from labkit.catalog import resolve

    out = {}
    for name, n in (("knowledge", 32), ("skills", 32), ("eval_exact", 16)):
        path = root / f"{name}_small.jsonl"
        path.write_text("".join(resolve(name).path.read_text().splitlines(keepends=True)[:n]))
        out[name] = str(path)
    return out


def pair_spec(path: Path, slices: dict, name: str) -> Path:
    base = {**TINY, "max_steps": None, "datasets": [slices["knowledge"], slices["skills"]],
            "val_dataset": slices["eval_exact"], "val_every_samples": 16, "save_final": False}
    return write_spec(path, {
        "name": name, "base": base, "concurrency": 2, "parameters": QUIET,
        "runs": [{"name": "stacked"},
                 {"name": "phased", "datasets": [],
                  "phases": [{"datasets": [slices["knowledge"]]}, {"datasets": [slices["skills"]]}]}]})


def test_phased_vs_stacked_notebook_compares_both_ways_of_training(root, slices):
    spec = pair_spec(root / "pair.yaml", slices, "pair")
    out = root / "sweeps" / "pair" / "report.ipynb"
    rec = execute("04_phased_vs_stacked.ipynb", out, sweep_spec=str(spec), runs_root=str(root))
    rows = {r["mode"]: r for r in rec["phased_vs_stacked"]}
    assert set(rows) == {"phased", "stacked"}
    assert rows["phased"]["phases"] == 2 and rows["stacked"]["phases"] == 1
    for r in rows.values():
        assert r["state"] == "finished" and r["samples"] == 64
        assert r["best_val_loss"] > 0 and 0 < r["samples_to_best"] <= 64
    assert images(out) >= 1


def test_study_notebook_runs_the_whole_study_and_records_findings(tmp_path, slices):
    grid = write_spec(tmp_path / "g.yaml", {
        "name": "g", "base": {**TINY, "max_steps": 40, "val_dataset": slices["eval_exact"], "val_every_samples": 32},
        "axes": {"effective_batch_size": [4, 8]}, "concurrency": 2,
        "early_termination": {"probe_samples": 16, "stop_fraction": 0.5}, "parameters": QUIET})
    pair = pair_spec(tmp_path / "p.yaml", slices, "p")
    root = tmp_path / "runs"
    out = root / "study" / "report.ipynb"
    rec = execute("00_study.ipynb", out, runs_root=str(root), grid_spec=str(grid), pair_spec=str(pair),
                  full_grid=True)
    f = rec["findings"]
    assert f["grid"]["runs"] == 2 and len(f["grid"]["stopped_early"]) == 1
    assert f["grid"]["compute"]["saved_samples"] > 0
    assert f["check"]["stopped"] and f["check"]["score"] == "final_val_loss"
    assert {r["mode"] for r in f["phased_vs_stacked"]} == {"phased", "stacked"}
    assert images(out) >= 3


def test_lab_notebook_shows_the_runs_table_and_overlaid_curves(root, one_run, grid):
    out = root / "lab.ipynb"
    rec = execute("05_lab.ipynb", out, runs_root=str(root))
    assert {"one", "grid__lr3e-3", "grid__lr3e-2"} <= {r["run"] for r in rec["runs"]}
    assert images(out) >= 1


def test_data_notebook_audits_each_dataset_and_shows_labelled_tokens(tmp_path, tiny_dir):
    out = tmp_path / "data.ipynb"
    rec = execute("06_data.ipynb", out, datasets=["knowledge"])
    knowledge = rec["audit"]["knowledge"]
    assert knowledge["samples"] == knowledge["records"] > 0 and knowledge["no_label"] == 0
    assert knowledge["turns_with_end"] == knowledge["labelled_turns"] > 0
    html = out.read_text()
    assert "trained (labelled)" in html and "background:#c8f7c5" in html  # the coloured token view
