"""labkit.evaluate on real lm-eval and the real tiny model (CPU, few examples)."""

import json
import shutil
from pathlib import Path

import pytest

from labkit.evaluate import EvalError, evaluate, main, resolve_target, result_rows, write_results

LIMIT = 16


def make_run(root: Path, name: str, model_dir: Path, step: int = 5, samples: int = 80) -> Path:
    """A run dir holding one checkpoint, laid out as the trainer writes it."""
    ckpt = root / name / "checkpoints" / f"step-{step:08d}"
    shutil.copytree(model_dir, ckpt)
    (ckpt / "checkpoint.json").write_text(json.dumps({"step": step, "samples": samples, "phase": 0}))
    return root / name


@pytest.fixture(scope="module")
def untrained(tmp_path_factory, tiny_dir):
    return make_run(tmp_path_factory.mktemp("runs"), "untrained", tiny_dir)


@pytest.fixture(scope="module")
def untrained_result(untrained):
    return evaluate(untrained, ["labkit"], limit=LIMIT)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from labkit.config import RunConfig
    from labkit.train import train

    # Calibrated: 240 steps (~25 s on 2 free cores) lift accuracy from chance (~0.25) to ~0.58;
    # a constant LR of the same size stalls near chance for this long.
    cfg = RunConfig(name="trained", runs_root=str(tmp_path_factory.mktemp("runs")), model="tiny",
                    datasets=["knowledge"], epochs=10, effective_batch_size=16, learning_rate=5e-3,
                    schedule="cosine", warmup_steps=10, max_tokens_per_device=2048)
    assert train(cfg)["state"] == "finished"
    return cfg.run_dir


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_untrained_model_gets_scores_on_both_local_tasks(untrained_result):
    res = untrained_result
    got = {(r["task"], r["metric"]): r for r in res.rows}
    assert set(got) == {("labkit_knowledge_mc", "acc"), ("labkit_knowledge_mc", "acc_norm"),
                        ("labkit_skills_exact", "exact_match")}
    for r in res.rows:
        assert 0.0 <= r["value"] <= 1.0 and r["stderr"] is not None
    assert got["labkit_skills_exact", "exact_match"]["value"] < 0.2  # random weights spell no answers
    assert (res.run, res.step, res.samples) == ("untrained", 5, 80)
    assert len(res.examples["labkit_knowledge_mc"]) == LIMIT
    assert list(res.to_frame().columns) == ["task", "metric", "value", "stderr", "run", "step", "samples"]


def test_eval_file_has_the_run_dir_format(untrained, untrained_result):
    from labkit.store import read_eval_file

    path = untrained / "evals" / "5.json"
    assert untrained_result.path == path
    data = json.loads(path.read_text())
    assert set(data) == {"run", "step", "samples", "checkpoint", "time", "results"}
    assert (data["run"], data["step"], data["samples"]) == ("untrained", 5, 80)
    assert data["checkpoint"] == str(untrained.resolve() / "checkpoints" / "step-00000005")
    assert data["results"] == untrained_result.rows
    assert [r["metric"] for r in read_eval_file(path)] == [r["metric"] for r in data["results"]]
    assert not [p for p in path.parent.iterdir() if p.name != "5.json"]  # no temp file left behind


def test_prompts_are_the_models_chat_template_plus_answer_prefix(untrained_result, tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ex = untrained_result.examples["labkit_knowledge_mc"][0]
    doc = ex["doc"]
    chat = tok.apply_chat_template([{"role": "user", "content": doc["question"]}], tokenize=False,
                                   add_generation_prompt=True)
    assert [tuple(a) for a in ex["arguments"]] == [(chat + doc["answer_prefix"], " " + c) for c in doc["choices"]]
    gen = untrained_result.examples["labkit_skills_exact"][0]
    assert gen["arguments"][0][0].endswith("<|assistant|>\n")


def test_trained_model_knows_more_facts_than_the_untrained_one(untrained, trained):
    before = evaluate(untrained, ["labkit_knowledge_mc"], write=False).value("labkit_knowledge_mc", "acc")
    after = evaluate(trained, ["labkit_knowledge_mc"]).value("labkit_knowledge_mc", "acc")
    print(f"labkit_knowledge_mc acc: untrained {before:.3f}, trained {after:.3f}")
    assert after >= before + 0.15
    assert (trained / "evals").is_dir()


def test_unknown_task_is_named_with_close_matches(untrained):
    with pytest.raises(EvalError, match=r"unknown task 'labkit_knowledge'.*labkit_knowledge_mc"):
        evaluate(untrained, ["labkit_knowledge"])
    with pytest.raises(EvalError, match=r"unknown task 'hellaswagg'.*did you mean: hellaswag"):
        evaluate(untrained, "labkit,hellaswagg")


def test_unreachable_dataset_says_offline_and_leaves_the_run_dir_untouched(untrained, untrained_result):
    before = snapshot(untrained)
    with pytest.raises(EvalError, match=r"the dataset for task 'hellaswag' could not be loaded \(offline\?") as e:
        evaluate(untrained, ["labkit_knowledge_mc", "hellaswag"], limit=2)
    assert "labkit_knowledge_mc" in str(e.value)  # suggests the local tasks
    assert snapshot(untrained) == before


def test_cli_evaluates_a_checkpoint_into_the_given_run_dir(tmp_path, tiny_dir, capsys):
    run = tmp_path / "r"
    ckpt = make_run(tmp_path, "r", tiny_dir, step=7, samples=112) / "checkpoints" / "step-00000007"
    assert main([str(ckpt), "--tasks", "labkit_knowledge_mc", "--limit", "4", "--run-dir", str(run)]) == 0
    data = json.loads((run / "evals" / "7.json").read_text())
    assert (data["run"], data["step"], data["samples"]) == ("r", 7, 112)
    assert "labkit_knowledge_mc" in capsys.readouterr().out
    assert main([str(ckpt), "--tasks", "no_such_task"]) == 2
    assert "unknown task 'no_such_task'" in capsys.readouterr().err


def test_target_resolution_prefers_final_then_the_newest_complete_checkpoint(tmp_path):
    run = tmp_path / "run"
    for step in (10, 20, 30):
        d = run / "checkpoints" / f"step-{step:08d}"
        d.mkdir(parents=True)
        if step != 30:  # step 30 is still being written: no config.json yet
            (d / "config.json").write_text("{}")
            (d / "checkpoint.json").write_text(json.dumps({"step": step, "samples": step * 16}))
    t = resolve_target(run)
    assert (t.checkpoint.name, t.step, t.samples, t.run_dir) == ("step-00000020", 20, 320, run.resolve())
    assert resolve_target(run, step=10).checkpoint.name == "step-00000010"
    with pytest.raises(EvalError, match=r"no checkpoint of step 15; it has steps \[10, 20\]"):
        resolve_target(run, step=15)
    (run / "final").mkdir()
    (run / "final" / "config.json").write_text("{}")
    (run / "status.json").write_text(json.dumps({"step": 25, "samples": 400}))
    (run / "config.yaml").write_text("name: run\n")
    # final/ without its completion marker is torn (a trainer killed while writing it): never picked.
    assert resolve_target(run).checkpoint.name == "step-00000020"
    (run / "final" / "checkpoint.json").write_text(json.dumps({"step": 25, "samples": 400}))
    t = resolve_target(run)
    assert (t.checkpoint.name, t.step, t.samples) == ("final", 25, 400)
    assert resolve_target(run / "final").run_dir == run.resolve()
    with pytest.raises(EvalError, match="not a checkpoint"):
        resolve_target(tmp_path)


def test_metric_names_drop_only_the_none_filter():
    rows = result_rows({"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.5,
                                  "exact_match_stderr,strict-match": 0.1, "exact_match,none": 0.4,
                                  "exact_match_stderr,none": "N/A", "sample_len": 10}})
    assert rows == [{"task": "gsm8k", "metric": "exact_match,strict-match", "value": 0.5, "stderr": 0.1},
                    {"task": "gsm8k", "metric": "exact_match", "value": 0.4, "stderr": None}]


def test_rewriting_a_step_keeps_the_other_tasks_scores(tmp_path):
    write_results(tmp_path, 3, 48, "ckpt", [{"task": "a", "metric": "acc", "value": 0.1, "stderr": None}])
    write_results(tmp_path, 3, 48, "ckpt", [{"task": "b", "metric": "score", "value": 7.0, "stderr": None}])
    write_results(tmp_path, 3, 48, "ckpt", [{"task": "a", "metric": "acc", "value": 0.2, "stderr": None}])
    results = json.loads((tmp_path / "evals" / "3.json").read_text())["results"]
    assert sorted((r["task"], r["value"]) for r in results) == [("a", 0.2), ("b", 7.0)]
