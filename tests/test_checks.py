"""Pre-launch checks: configs that validate but would fail after launch are refused, one line per field."""

import functools
import json
import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from labkit import checks
from labkit.config import ConfigError, RunConfig, load_config

REPO = Path(__file__).resolve().parent.parent


def problems_of(**kw) -> list[str]:
    return RunConfig(**{"datasets": ["skills"], **kw}).check()


def fields(problems: list[str]) -> list[str]:
    return [p.split(":", 1)[0] for p in problems]


def test_the_shipped_demo_config_passes_every_check(tmp_path):
    assert problems_of(runs_root=str(tmp_path / "runs")) == []


# -- the model ---------------------------------------------------------------------------------------


def test_model_dir_without_tokenizer_files_is_refused(tmp_path, tiny_dir):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text((tiny_dir / "config.json").read_text())
    [problem] = problems_of(model=str(tmp_path / "m"), runs_root=str(tmp_path))
    assert problem.startswith("model: ") and "no tokenizer files" in problem


def test_a_t5_checkpoint_is_refused_as_not_a_causal_lm(tmp_path, tiny_dir):
    from transformers import T5Config

    T5Config(num_layers=1, d_model=8, d_ff=16, num_heads=1, d_kv=8,
             architectures=["T5ForConditionalGeneration"]).save_pretrained(tmp_path / "t5")
    (tmp_path / "t5" / "tokenizer.json").write_text((tiny_dir / "tokenizer.json").read_text())
    [problem] = problems_of(model=str(tmp_path / "t5"), runs_root=str(tmp_path))
    assert problem.startswith("model: ") and "'t5'" in problem and "not a causal LM" in problem


def test_real_decoder_architectures_pass(tmp_path, tiny_dir):
    from transformers import Qwen2Config

    Qwen2Config(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=16).save_pretrained(
        tmp_path / "q")
    (tmp_path / "q" / "tokenizer.json").write_text((tiny_dir / "tokenizer.json").read_text())
    assert checks.model_dir(RunConfig(datasets=["skills"], model=str(tmp_path / "q"))) == []
    assert checks.model_dir(RunConfig(datasets=["skills"], model=str(tiny_dir))) == []


# -- data ------------------------------------------------------------------------------------------


def test_unknown_val_dataset_names_the_field(tmp_path):
    [problem] = problems_of(val_dataset="no-such-set", runs_root=str(tmp_path))
    assert problem.startswith("val_dataset: ") and "'no-such-set' is not in the data catalog" in problem


def test_effective_batch_larger_than_the_data_is_refused(tmp_path):
    [problem] = problems_of(effective_batch_size=2000, runs_root=str(tmp_path))  # skills has 1500
    assert problem.startswith("effective_batch_size: 2000 is larger than") and "1500 samples" in problem


def test_a_phase_smaller_than_the_batch_is_named(tmp_path):
    cfg = RunConfig(phases=[{"datasets": ["skills"]}, {"datasets": ["knowledge"], "name": "facts"}],
                    effective_batch_size=1000, runs_root=str(tmp_path))
    [problem] = cfg.check()  # knowledge has 384
    assert problem.startswith("effective_batch_size: ") and "phase 2 (facts)" in problem and "384" in problem


def test_a_data_file_without_a_sample_count_is_counted_by_lines(tmp_path):
    data = tmp_path / "d.jsonl"
    line = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    data.write_text((line + "\n") * 5 + "\n")
    [problem] = problems_of(datasets=[str(data)], effective_batch_size=8, runs_root=str(tmp_path))
    assert problem.startswith("effective_batch_size: 8") and "5 samples" in problem


def test_warmup_as_long_as_the_training_is_refused(tmp_path):
    # skills: 1500 samples / 100 = 15 steps
    assert fields(problems_of(effective_batch_size=100, warmup_steps=15, runs_root=str(tmp_path))) == ["warmup_steps"]
    assert problems_of(effective_batch_size=100, warmup_steps=14, runs_root=str(tmp_path)) == []
    # max_steps cuts the run shorter than the warmup
    [problem] = problems_of(effective_batch_size=100, warmup_steps=10, max_steps=8, runs_root=str(tmp_path))
    assert problem.startswith("warmup_steps: 10 warmup steps") and "only 8 optimizer step(s)" in problem
    # a ratio that rounds to the whole (short) run
    [problem] = problems_of(effective_batch_size=1000, warmup_ratio=0.75, runs_root=str(tmp_path))  # 2 steps
    assert problem.startswith("warmup_ratio: 0.75 gives 2 warmup steps, but")


# -- evaluation --------------------------------------------------------------------------------------


def test_an_eval_task_lm_eval_does_not_know_is_refused_with_a_suggestion(tmp_path):
    cfg = RunConfig(datasets=["skills"], eval_tasks=["labkit_knowlege_mc"], eval_every_samples=100,
                    runs_root=str(tmp_path))
    [problem] = cfg.check()
    assert problem.startswith("eval_tasks: unknown task 'labkit_knowlege_mc'") and "labkit_knowledge_mc" in problem
    ok = cfg.with_updates(eval_tasks=["labkit", "labkit_skills_exact", "hellaswag"])
    assert ok.check() == []


def test_the_lm_eval_task_index_is_read_from_its_cache(tmp_path):
    import lm_eval

    checks.known_eval_tasks()  # builds the real index once per lm-eval version
    from labkit.tiny import home

    assert (home() / f"lm-eval-tasks-{lm_eval.__version__}.json").is_file()
    cache = json.loads((home() / f"lm-eval-tasks-{lm_eval.__version__}.json").read_text())
    (tmp_path / f"lm-eval-tasks-{lm_eval.__version__}.json").write_text(
        json.dumps({"tasks_dir": cache["tasks_dir"], "names": ["only_this_one"]}))
    assert checks._lm_eval_task_names(tmp_path) == ["only_this_one"]
    (tmp_path / f"lm-eval-tasks-{lm_eval.__version__}.json").unlink()
    assert checks._lm_eval_task_names(tmp_path) == ["only_this_one"]  # and kept in memory


# -- the machine --------------------------------------------------------------------------------------


def test_flash_attention_on_cpu_is_refused(tmp_path):
    [problem] = problems_of(attention="flash_attention_2", distributed={"cpu": True}, runs_root=str(tmp_path))
    assert problem.startswith("attention: 'flash_attention_2' needs a CUDA GPU but distributed.cpu is set")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_varlen_and_flash_attention_without_a_gpu_are_refused(tmp_path):
    for attn in ("flash_attention_2", "varlen"):
        [problem] = problems_of(attention=attn, runs_root=str(tmp_path))
        assert problem.startswith(f"attention: {attn!r} needs a CUDA GPU but no CUDA device is visible")


def test_runs_root_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "runs").write_text("not a dir")
    assert problems_of(runs_root=str(tmp_path / "runs")) == [
        f"runs_root: {str(tmp_path / 'runs')!r} is a file, not a directory"]


def test_runs_root_under_a_file_cannot_be_created(tmp_path):
    # mkdir there fails with ENOTDIR even for root; refused before launch instead.
    (tmp_path / "f").write_text("")
    [problem] = problems_of(runs_root=str(tmp_path / "f" / "runs"))
    assert problem.startswith("runs_root: cannot create") and "is a file" in problem


def test_run_name_taken_by_a_file_in_the_runs_root_is_refused(tmp_path):
    (tmp_path / "myrun").write_text("")
    assert fields(problems_of(name="myrun", runs_root=str(tmp_path))) == ["name"]


@functools.cache
def _nobody() -> int | None:
    """`nobody`'s uid when this (root) process can run Python as nobody, else None."""
    if os.geteuid() != 0:
        return None
    try:
        uid = pwd.getpwnam("nobody").pw_uid
        ok = subprocess.run([sys.executable, "-c", "import labkit.config"], user=uid, cwd=REPO, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True).returncode == 0
    except (KeyError, OSError, subprocess.SubprocessError):
        return None
    return uid if ok else None


@pytest.mark.skipif(_nobody() is None, reason="needs root, and a Python that user nobody can run, to test "
                    "permissions (root itself ignores permission bits)")
def test_a_runs_root_the_user_cannot_write_is_refused(tmp_path):
    # As root, permission bits do not stop writes, so the check runs as `nobody` in a child process.
    base = Path(f"/tmp/labkit-perm-{os.getpid()}")
    base.mkdir(mode=0o755, exist_ok=True)
    (base / "ro").mkdir(mode=0o555, exist_ok=True)
    try:
        code = ("import sys; from labkit.config import RunConfig; "
                "print(repr(RunConfig(datasets=['skills'], runs_root=sys.argv[1]).check()))")
        out = [subprocess.run([sys.executable, "-c", code, str(p)], user=_nobody(), cwd=REPO, capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO), "LABKIT_HOME": str(base)},
                              timeout=120)
               for p in (base / "ro", base / "ro" / "runs")]
        assert all(o.returncode == 0 for o in out), [o.stderr[-2000:] for o in out]
        assert out[0].stdout.strip() == repr([f"runs_root: {str(base / 'ro')!r} is not writable"])
        assert "runs_root: " in out[1].stdout and "cannot be created" in out[1].stdout
    finally:
        (base / "ro").rmdir()
        base.rmdir()


def test_load_config_with_check_raises_one_error_listing_every_field(tmp_path):
    (tmp_path / "runs").write_text("")
    path = RunConfig(datasets=["skills"], val_dataset="nope", effective_batch_size=5000,
                     runs_root=str(tmp_path / "runs")).save(tmp_path / "c.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(path, check=True)
    lines = str(err.value).splitlines()
    assert lines[0] == f"{path}: run 'run' cannot run here:"
    assert [ln.split(":")[0].strip(" -") for ln in lines[1:]] == ["val_dataset", "effective_batch_size", "runs_root"]


@pytest.mark.skipif(not Path("/proc/sys").is_dir() or os.access("/proc/sys", os.W_OK),
                    reason="needs a folder where mkdir fails and os.access says so, even for root (Linux /proc/sys)")
def test_a_runs_root_where_mkdir_fails_is_refused_before_launch():
    with pytest.raises(OSError):
        os.mkdir("/proc/sys/labkit-runs")
    [problem] = problems_of(runs_root="/proc/sys/labkit-runs")
    assert problem == "runs_root: '/proc/sys/labkit-runs' cannot be created ('/proc/sys' is not writable)"


# -- every entry point refuses before any process starts ---------------------------------------------


def test_labkit_run_with_a_runs_root_under_a_file_prints_one_error_line(tmp_path, capsys):
    from labkit import cli

    (tmp_path / "f").write_text("")
    path = RunConfig(datasets=["skills"], runs_root=str(tmp_path / "f" / "runs")).save(tmp_path / "c.yaml")
    assert cli.main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "runs_root: cannot create" in err
    assert not (tmp_path / "f" / "runs").exists()


@pytest.mark.parametrize("name", ["lab.duckdb", "index.html", "lab.duckdb.lock"])
def test_labkit_run_named_like_labkits_own_files_is_refused(tmp_path, capsys, name):
    from labkit import cli

    root = tmp_path / "runs"
    root.mkdir()
    (root / name).write_text("labkit's own file")
    path = RunConfig(datasets=["skills"], runs_root=str(root)).save(tmp_path / "c.yaml")
    assert cli.main(["run", str(path), "--set", f"name={name}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"name: {name!r} is reserved" in err
    assert (root / name).read_text() == "labkit's own file"


def test_python_m_labkit_train_refuses_before_training(tmp_path, capsys):
    from labkit import train

    path = RunConfig(datasets=["skills"], attention="flash_attention_2", distributed={"cpu": True},
                     runs_root=str(tmp_path)).save(tmp_path / "c.yaml")
    assert train.main([str(path)]) == 2
    assert "attention: 'flash_attention_2' needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
