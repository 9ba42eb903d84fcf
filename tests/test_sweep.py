"""Sweeps: spec expansion, papermill execution, early termination and failed runs.

The execution tests share one real sweep (module fixture): two trainable configs and one whose
dataset does not exist, run concurrently through `notebooks/01_run.ipynb` with papermill and a
real kernel, the tiny model training a few steps with accelerate, early termination on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from notebook_files import parameterized_notebook

from labkit import runfiles, sweep
from labkit.sweep import SweepError, compare_with_full, expand, run_key

TINY = {
    "model": "tiny",
    "datasets": ["knowledge"],
    "max_steps": 40,  # ~0.1 s a step: room for the decision after the probe
    "effective_batch_size": 8,
    "max_tokens_per_device": 2048,
    "max_seq_len": 256,
    "learning_rate": 3.0e-3,
    "save_final": False,
    "keep_checkpoints": 1,
    "distributed": {"cpu": True},
}


def test_expand_names_runs_by_sweep_and_axis_values():
    spec = {"name": "bs-lr", "base": TINY, "axes": {"effective_batch_size": [32, 64], "learning_rate": [3e-3, 1e-4]}}
    cfgs = expand(spec, "/tmp/r")
    assert [c.name for c in cfgs] == ["bs-lr__ebs32_lr3e-3", "bs-lr__ebs32_lr1e-4",
                                      "bs-lr__ebs64_lr3e-3", "bs-lr__ebs64_lr1e-4"]
    assert cfgs[3].effective_batch_size == 64 and cfgs[3].learning_rate == 1e-4
    assert all(str(c.run_dir).startswith("/tmp/r/") for c in cfgs)


def test_expand_appends_explicit_runs_with_nested_overrides():
    spec = {"name": "ps", "base": TINY, "runs": [
        {"name": "stacked"},
        {"name": "phased", "datasets": [], "phases": [{"datasets": ["knowledge"]}, {"datasets": ["skills"]}]},
        {"distributed.num_processes": 2, "schedule": "cosine"},
    ]}
    cfgs = expand(spec)
    assert [c.name for c in cfgs] == ["ps__stacked", "ps__phased", "ps__num-processes2_sched-cosine"]
    assert len(cfgs[1].training_phases()) == 2
    assert cfgs[2].distributed.num_processes == 2


def test_expand_error_names_the_bad_axis_value():
    spec = {"name": "bad", "base": TINY, "axes": {"effective_batch_size": [8, 0]}}
    with pytest.raises(SweepError, match=r"(?s)bad__ebs0 \(effective_batch_size=0\).*effective_batch_size"):
        expand(spec)


def test_spec_errors_name_file_and_field(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\nbase: {datasets: [knowledge]}\naxes: {learning_rate: []}\nconcurency: 2\n")
    with pytest.raises(SweepError) as e:
        sweep.load_spec(path)
    assert str(path) in str(e.value) and "concurency: unknown field" in str(e.value)
    assert "axes.learning_rate: List should have at least 1 item" in str(e.value)
    with pytest.raises(SweepError, match="exactly one of 'probe_samples' or 'probe_steps'"):
        expand({"name": "s", "base": TINY, "axes": {"seed": [1]}, "early_termination": {"stop_fraction": 0.5}})


def test_a_duplicate_key_in_a_sweep_spec_or_its_base_is_refused_naming_file_and_line(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\nbase: base.yaml\naxes: {learning_rate: [1e-4]}\naxes: {seed: [1]}\n")
    with pytest.raises(SweepError, match=r"s.yaml:4: axes: duplicate key \(first at line 3\)"):
        sweep.load_spec(path)
    path.write_text("name: s\nbase: base.yaml\naxes: {learning_rate: [1e-4]}\n")
    (tmp_path / "base.yaml").write_text("model: tiny\nlearning_rate: 1e-5\nlearning_rate: 2e-5\n")
    with pytest.raises(SweepError, match=r"base.yaml:3: learning_rate: duplicate key"):
        expand(sweep.load_spec(path))


def test_run_key_is_path_safe():
    assert run_key({"learning_rate": 2e-5, "effective_batch_size": 3840}) == "lr2e-5_ebs3840"
    assert run_key({"datasets": ["a/b", "c"]}) == "datasets-a-b-c"
    assert run_key({"name": "phased"}) == "phased"


# -- a real sweep ------------------------------------------------------------------------------

PROBE = 24  # samples: 3 steps of 8


@pytest.fixture(scope="module")
def executed(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("runs")
    spec = {
        "name": "et",
        "base": TINY,
        "runs": [{"learning_rate": 3e-3}, {"learning_rate": 3e-2}, {"name": "broken", "datasets": ["no_such_dataset"]}],
        "concurrency": 3,
        "early_termination": {"probe_samples": PROBE, "stop_fraction": 0.5, "min_runs": 2},
        "parameters": {"evaluate_tasks": [], "poll_seconds": 0.5},
    }
    logs: list[str] = []
    df = sweep.run_sweep(spec, root, poll=0.3, log=logs.append)
    return root, df, sweep.read_sweep(root / "sweeps" / "et"), logs


def test_early_termination_stops_the_worst_fraction(executed):
    root, df, rec, _ = executed
    et = rec["early_termination"]
    assert len(et["stopped"]) == 1  # floor(0.5 * 2 probed runs); the broken run is never probed
    (name, info), = et["stopped"].items()
    scores = et["scores"]
    assert set(scores) == {"et__lr3e-3", "et__lr3e-2"}
    assert scores[name] == min(scores.values())  # higher early score is better
    status = runfiles.read_status(root / name)
    assert status["state"] == "stopped" and "early termination by sweep et" in status["stop_reason"]
    planned = TINY["max_steps"] * TINY["effective_batch_size"]
    assert PROBE <= status["samples"] < planned  # stopped before its last step
    assert rec["compute"]["saved_samples"] == planned - status["samples"]
    assert rec["compute"]["planned_samples"] == 2 * planned
    decision = et["decisions"][0]
    assert decision["stopped"] == [name] and decision["budget"] == PROBE and decision["axis"] == "samples"
    kept = next(n for n in scores if n != name)
    assert df.set_index("run").loc[kept, "state"] == "finished"


def test_store_records_stopped_runs_with_their_early_scores(executed):
    from labkit.store import Store

    root, _, rec, _ = executed
    et = rec["early_termination"]
    name = next(iter(et["stopped"]))
    store = Store(root)
    runs = store.runs_table().set_index("run_id")
    assert runs.loc[name, "status"] == "stopped"
    assert "early termination" in runs.loc[name, "stop_reason"]
    early = store.early_dynamics(first_samples=PROBE, runs=sorted(et["scores"])).set_index("run_id")
    assert early.loc[name, "early_score"] == pytest.approx(et["stopped"][name]["early_score"])
    assert early.loc[name, "rank"] == len(et["scores"])  # ranked last


def test_failed_run_keeps_its_notebook_with_the_error_and_the_sweep_goes_on(executed):
    from labkit.report import notebook_error

    root, df, rec, logs = executed
    rows = df.set_index("run")
    assert rows.loc["et__broken", "state"] == "failed"
    assert "no_such_dataset" in rows.loc["et__broken", "error"]
    nb = root / "et__broken" / "report.ipynb"
    assert "no_such_dataset" in notebook_error(nb)
    text = json.loads(nb.read_text())
    assert any("papermill-error-cell-tag" in c["metadata"].get("tags", []) for c in text["cells"])
    assert (rows.drop("et__broken")["state"] != "failed").all()  # the other runs still trained
    assert any(line.startswith("end   et__broken: failed") for line in logs)


def test_sweep_refuses_to_overwrite_runs_unless_asked(executed):
    root, _, _, _ = executed
    spec = {"name": "et", "base": TINY, "runs": [{"learning_rate": 3e-3}]}
    with pytest.raises(SweepError, match="already exist"):
        sweep.run_sweep(spec, root)


def test_compare_with_full_scores_the_stopping_decisions(tmp_path):
    # Two recorded sweeps over the same keys: `et` stopped `b`, the full sweep shows `b` was worst.
    def fake(name: str, stopped: dict, losses: dict):
        d = tmp_path / "sweeps" / name
        d.mkdir(parents=True)
        runs = []
        for key, loss in losses.items():
            run_dir = tmp_path / f"{name}__{key}"
            run_dir.mkdir()
            (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "samples": 8, "loss": loss}) + "\n")
            state = "stopped" if run_dir.name in stopped else "finished"
            runfiles.write_json_atomic(run_dir / "status.json", {"state": state, "samples": 8})
            runs.append({"name": f"{name}__{key}", "key": key, "overrides": {},
                         "notebook": str(run_dir / "report.ipynb")})
        rec = {"name": name, "runs": runs, "early_termination": {"stopped": stopped, "scores": {}}}
        (d / "sweep.json").write_text(json.dumps(rec))
        return d

    et = fake("et", {"et__b": {}}, {"a": 1.0, "b": 3.0, "c": 2.0})
    full = fake("full", {}, {"a": 1.0, "b": 3.0, "c": 2.0})
    check = compare_with_full(et, full, "final_loss")
    assert check["stopped"] == ["b"] and check["stopped_in_worst"] == 1 and check["precision"] == 1.0
    assert check["best_run_kept"] is True
    assert [r["final_rank"] for r in check["runs"]] == [1, 3, 2]


# -- the decision rule, on run files written as a trainer writes them ----------------------------


def _trainer_files(run_dir, grad_norm: float, loss: float, steps: int, state: str = "running"):
    """status.json and metrics.jsonl of a run at `steps` steps of 8 samples."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"step": s, "phase": 0, "samples": 8 * s, "loss": loss, "grad_norm": grad_norm} for s in range(1, steps + 1)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runfiles.write_json_atomic(run_dir / "status.json", {"state": state, "step": steps, "samples": 8 * steps,
                                                         "total_samples": 800})


def _watcher(root, names, wait=1.0, probe=16):
    spec = sweep.as_spec({"name": "w", "base": TINY, "runs": [{"name": n} for n in names],
                          "early_termination": {"probe_samples": probe, "stop_fraction": 0.5, "wait": wait}})
    sw = sweep.Sweep(spec, root, log=lambda _: None)
    sw.record = {"early_termination": {"decisions": [], "stopped": {}}}
    sw.watcher = sweep.Watcher(sw, spec.early_termination)
    sw.in_flight = set(sw.names)
    return sw, sw.watcher


def test_decision_waits_for_live_runs_short_of_the_probe(tmp_path):
    sw, w = _watcher(tmp_path, ["a", "b", "c"])
    _trainer_files(tmp_path / "w__a", grad_norm=1.0, loss=3.0, steps=2)  # best: low grad norm, high loss
    _trainer_files(tmp_path / "w__b", grad_norm=3.0, loss=1.0, steps=2)  # worst
    _trainer_files(tmp_path / "w__c", grad_norm=2.0, loss=2.0, steps=1)  # not at the probe yet
    w.tick()
    assert w.decided == [set()] and not (tmp_path / "w__b" / "STOP").exists()
    _trainer_files(tmp_path / "w__c", grad_norm=2.0, loss=2.0, steps=2)
    w.tick()
    assert set(w.stopped) == {"w__b"}  # floor(0.5 * 3) = 1, the worst of the three
    assert "ranks 3/3 after 16 samples" in (tmp_path / "w__b" / "STOP").read_text()
    assert w.decided == [{"w__a", "w__b", "w__c"}]


def test_a_late_run_is_ranked_against_the_runs_probed_before_it(tmp_path):
    sw, w = _watcher(tmp_path, ["a", "b", "c"])
    sw.in_flight = {"w__a", "w__b"}  # c has not started: concurrency 2
    _trainer_files(tmp_path / "w__a", grad_norm=1.0, loss=3.0, steps=2)
    _trainer_files(tmp_path / "w__b", grad_norm=2.0, loss=2.0, steps=2)
    w.tick()
    assert set(w.stopped) == {"w__b"}
    _trainer_files(tmp_path / "w__a", grad_norm=1.0, loss=3.0, steps=100, state="finished")
    _trainer_files(tmp_path / "w__b", grad_norm=2.0, loss=2.0, steps=3, state="stopped")
    sw.in_flight = {"w__c"}
    _trainer_files(tmp_path / "w__c", grad_norm=3.0, loss=1.0, steps=2)
    w.tick()
    assert set(w.stopped) == {"w__b", "w__c"}  # worst 1 of 3 probed: c, though a and b have ended
    last = sw.record["early_termination"]["decisions"][-1]
    assert [r["verdict"] for r in last["ranking"]] == ["decided earlier", "decided earlier", "stopped"]


def test_a_probed_run_stops_waiting_after_wait_probe_budgets(tmp_path):
    sw, w = _watcher(tmp_path, ["a", "b", "c"], wait=1.0)
    _trainer_files(tmp_path / "w__a", grad_norm=1.0, loss=3.0, steps=3)
    _trainer_files(tmp_path / "w__b", grad_norm=3.0, loss=1.0, steps=3)
    _trainer_files(tmp_path / "w__c", grad_norm=2.0, loss=2.0, steps=0)  # started late
    w.tick()
    assert w.decided == [set()]  # 24 samples < 2 x 16: still waiting for c
    _trainer_files(tmp_path / "w__a", grad_norm=1.0, loss=3.0, steps=4)
    w.tick()
    assert set(w.stopped) == {"w__b"} and "w__c" not in w.decided[0]


def test_each_rung_halves_the_runs_that_survived_the_rung_before(tmp_path):
    names = ["a", "b", "c", "d"]
    sw, w = _watcher(tmp_path, names, probe=[16, 48])
    # Early grad norm ranks them a < b < c < d at every window (same loss): d and c go at rung 1.
    for i, n in enumerate(names):
        _trainer_files(tmp_path / f"w__{n}", grad_norm=1.0 + i, loss=2.0, steps=2)
    w.tick()
    assert set(w.stopped) == {"w__c", "w__d"} and all(s["rung"] == 1 for s in w.stopped.values())
    for n in ("a", "b"):
        _trainer_files(tmp_path / f"w__{n}", grad_norm=1.0 + names.index(n), loss=2.0, steps=6)
    for n in ("c", "d"):
        _trainer_files(tmp_path / f"w__{n}", grad_norm=9.0, loss=2.0, steps=7, state="stopped")
    w.tick()
    assert set(w.stopped) == {"w__b", "w__c", "w__d"} and w.stopped["w__b"]["rung"] == 2
    rung2 = sw.record["early_termination"]["decisions"][-1]
    assert rung2["rung"] == 2 and rung2["budget"] == 48 and rung2["pool"] == 2  # c and d took no place
    assert "rung 2/2" in (tmp_path / "w__b" / "STOP").read_text()
    assert w.scores["w__a"] > w.scores["w__b"]  # early scores stay those of the first rung


def test_probe_budgets_must_increase():
    with pytest.raises(SweepError, match="positive and increasing"):
        expand({"name": "s", "base": TINY, "axes": {"seed": [1]},
                "early_termination": {"probe_samples": [64, 32]}})


def test_labkit_sweep_dry_run_lists_the_runs(capsys):
    from labkit.cli import main

    spec = Path(sweep.__file__).resolve().parent.parent / "templates" / "sweeps" / "bs_lr.yaml"
    assert main(["sweep", str(spec), "--root", "/tmp/r", "--dry-run"]) == 0
    out = capsys.readouterr().out.split()
    assert "bs-lr__ebs64_lr1e-2" in out and "/tmp/r/bs-lr__ebs16_lr1e-3" in out


# -- parameters reach the notebook as data, never as code ---------------------------------------

HOSTILE = "1); import os; os.system('touch PWNED')#"


@pytest.fixture
def echo_notebook(tmp_path):
    """A run notebook that only writes down the parameters it received (no training)."""
    return parameterized_notebook(
        tmp_path / "echo.ipynb", "note = None\nnested = None\nconfig_path = None",
        "import json, pathlib\n"
        "out = pathlib.Path(config_path).parent.parent / 'received.json'\n"
        "out.write_text(json.dumps({'note': note, 'type': type(note).__name__, 'nested': nested}))")


def hostile_spec(echo_notebook, parameters, tmp_path):
    pwned = tmp_path / "PWNED"
    params = {k.replace("PWNED", str(pwned)): (v.replace("PWNED", str(pwned)) if isinstance(v, str) else v)
              for k, v in parameters.items()}
    return {"name": "p", "base": TINY, "axes": {"seed": [1]}, "notebook": str(echo_notebook),
            "parameters": params}, pwned


def test_a_hostile_parameter_value_arrives_as_a_string_literal(tmp_path, echo_notebook):
    spec, pwned = hostile_spec(echo_notebook, {"note": HOSTILE, "nested": {"k\"); x=(\"": [HOSTILE, "\\\"); #"]}},
                               tmp_path)
    sweep.run_sweep(spec, tmp_path / "runs", log=lambda _: None)
    got = json.loads((tmp_path / "runs" / "sweeps" / "p" / "received.json").read_text())
    assert got["type"] == "str" and got["note"] == HOSTILE.replace("PWNED", str(pwned))
    assert got["nested"] == spec["parameters"]["nested"]
    assert not pwned.exists()


@pytest.mark.parametrize("parameters, named", [
    ({"x = 1; import os; os.system('touch PWNED'); y": 1}, "is not a valid parameter name"),
    ({"note": b"\"+__import__(chr(111)+chr(115)).system('touch PWNED')+\""}, "parameters.note: must be plain data"),
    ({"nested": {"when": __import__("datetime").date(2024, 1, 1)}}, "parameters.nested.when: must be plain data"),
    ({"config_path": "/etc/passwd"}, "parameters.config_path: set by the sweep"),
])
def test_a_parameter_that_is_not_plain_data_is_refused_before_anything_runs(tmp_path, echo_notebook,
                                                                             parameters, named):
    spec, pwned = hostile_spec(echo_notebook, parameters, tmp_path)
    with pytest.raises(SweepError, match=named):
        sweep.run_sweep(spec, tmp_path / "runs", log=lambda _: None)
    assert not pwned.exists() and not (tmp_path / "runs" / "sweeps" / "p" / "received.json").exists()


def test_yaml_binary_parameters_in_a_spec_file_are_refused_with_the_file_named(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\nbase: templates/runs/demo.yaml\naxes: {seed: [1]}\n"
                    "parameters:\n  note: !!binary aGVsbG8=\n")
    with pytest.raises(SweepError, match=r"(?s)s.yaml.*parameters.note: must be plain data"):
        sweep.load_spec(path)


@pytest.mark.parametrize("template", sorted(p.name for p in (sweep.ROOT / "templates" / "sweeps").glob("*.yaml")))
def test_sweep_templates_expand(template):
    spec = sweep.load_spec(sweep.ROOT / "templates" / "sweeps" / template)
    assert expand(spec, "/tmp/r") and spec.backend in ("local", "slurm")
