"""Strategies on CPU with gloo, through real `accelerate launch` processes and the real trainer.

Each 2-process launch costs 10-20 s of start-up here, so one launch trains the configs of this module under
both strategies (tests/train_worker.py runs them in one process group; each config names its strategy).
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2Config,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from labkit import catalog, runfiles, sharding
from labkit.config import ConfigError, RunConfig
from labkit.data.collate import collate_padded
from labkit.data.tokenstore import load_tokenized, sample_lengths
from labkit.launch import _child_env, free_port, launch_command
from labkit.train import plan_epoch, train

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "train_worker.py"
# fp32 on CPU, the same samples per step: only the order of float sums differs between 1 process,
# DDP (all-reduce of 2 partial gradients) and FSDP (reduce-scatter + sharded Adam). Rounding of fp32
# sums over ~10^4 terms is ~1e-6 relative; Adam's first steps divide by sqrt(v) ~ |g|, so a gradient
# difference of 1e-6 stays 1e-6 in the update. 1e-4 leaves two orders of margin and still catches any
# normalisation slip (a wrong world-size factor is 2x, a missed micro-batch >1%).
REL = 1e-4
EQ = dict(model="tiny", datasets=["knowledge"], effective_batch_size=16, max_tokens_per_device=512,
          max_seq_len=256, learning_rate=1e-3, seed=5, max_steps=3, keep_checkpoints=1)

ARCHS = {
    "llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig,
    "gemma2": Gemma2Config, "phi3": Phi3Config, "granite": GraniteConfig,
}


def tiny_arch(name: str, tok, out: Path) -> Path:
    """A random-init 2-layer model of a real architecture, with the tiny tokenizer, as an HF checkpoint."""
    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if name in ("qwen3", "gemma2"):
        kw["head_dim"] = 8
    if name == "gemma2":
        kw.update(query_pre_attn_scalar=8, sliding_window=64)
    if name == "qwen2":
        kw["tie_word_embeddings"] = True
    # The architecture's own tokenizer class (chosen from config.json) may add tokens: Qwen2Tokenizer adds
    # an unk. Size the vocabulary to the tokenizer the trainer will load from this directory.
    ARCHS[name](**kw).save_pretrained(out)
    tok.save_pretrained(out)
    kw["vocab_size"] = len(AutoTokenizer.from_pretrained(out))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(ARCHS[name](**kw))
    model.save_pretrained(out)
    return out


def worker(n: int, configs: list[Path], *extra: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """tests/train_worker.py under the launcher's own accelerate command line (labkit.launch.launch_command)."""
    cfg = RunConfig(datasets=["skills"], distributed={"cpu": True, "num_processes": n})
    cmd = launch_command(cfg, "unused", port=free_port(), cuda=False)[:-3] + [str(WORKER), *map(str, configs),
                                                                              *extra]
    env = {**_child_env(cpu=True), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
                          start_new_session=True)


def save(cfg: RunConfig) -> Path:
    return cfg.save(cfg.run_dir / "config.yaml")


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_dir):
    """One 2-process launch: the equality config and every architecture, under DDP and under FSDP."""
    root = tmp_path_factory.mktemp("sharding")
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    models = {name: tiny_arch(name, tok, root / "models" / name) for name in ARCHS}
    paths = []
    for strategy in ("ddp", "fsdp"):  # one process group trains them all: the config picks the strategy
        dist = {"cpu": True, "num_processes": 2, "strategy": strategy}
        paths.append(save(RunConfig(name=f"eq-{strategy}", runs_root=str(root), distributed=dist, **EQ)))
        for name, mdir in models.items():
            paths.append(save(RunConfig(name=f"{name}-{strategy}", runs_root=str(root), model=str(mdir),
                                        datasets=["eval_exact"], effective_batch_size=16, max_tokens_per_device=512,
                                        max_seq_len=256, max_steps=2, learning_rate=1e-3, distributed=dist)))
    proc = worker(2, paths)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    single = RunConfig(name="eq-single", runs_root=str(root), distributed={"cpu": True}, **EQ)
    assert train(single)["state"] == "finished"
    return root, models


def big_batch_reference(tiny_dir) -> tuple[float, float]:
    """Loss and gradient norm of the first step's 16 samples as one padded batch through one model."""
    cfg = RunConfig(runs_root="/nonexistent", **EQ)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    samples, _ = load_tokenized(catalog.resolve("knowledge").path, tok, tiny_dir, cfg.max_seq_len)
    first = sorted(i for rank in plan_epoch(cfg, sample_lengths(samples), 1, 0, False)[0] for mb in rank for i in mb)
    assert len(first) == 16
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="sdpa", dtype=torch.float32)
    b = collate_padded([samples[i] for i in first], tok.pad_token_id)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(),
                                             ignore_index=-100)
    loss.backward()
    # In float64: a float32 norm over 1.2M flat values is itself off by ~1.5e-4 relative on this CPU.
    norm = torch.cat([p.grad.double().flatten() for p in model.parameters() if p.grad is not None]).norm()
    return loss.item(), norm.item()


@pytest.mark.slow
def test_one_process_ddp_and_fsdp_give_the_losses_and_grad_norms_of_one_big_batch(launched, tiny_dir):
    root, _ = launched
    runs = {s: runfiles.read_metrics(root / f"eq-{s}") for s in ("single", "ddp", "fsdp")}
    loss, norm = big_batch_reference(tiny_dir)
    for strategy, rows in runs.items():
        assert [r["step"] for r in rows] == [1, 2, 3]
        assert rows[0]["loss"] == pytest.approx(loss, rel=REL), strategy
        assert rows[0]["grad_norm"] == pytest.approx(norm, rel=REL), strategy
        for a, b in zip(rows, runs["single"]):
            assert a["samples"] == b["samples"]
            assert a["loss"] == pytest.approx(b["loss"], rel=REL), (strategy, a["step"])
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=REL), (strategy, a["step"])


@pytest.mark.slow
def test_the_strategy_running_is_the_one_asked_and_is_recorded(launched):
    root, _ = launched
    for strategy, world in (("single", 1), ("ddp", 2), ("fsdp", 2)):
        status = runfiles.read_status(root / f"eq-{strategy}")
        assert status["strategy"] == strategy and status["world_size"] == world
        assert status["attention"] == "sdpa" and status["mixed_precision"] == "no"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_six_architectures_train_and_export_checkpoints_that_load_in_bf16(launched, strategy):
    root, models = launched
    for name in ARCHS:
        run = root / f"{name}-{strategy}"
        status = runfiles.read_status(run)
        assert status["state"] == "finished" and status["strategy"] == strategy, (name, status)
        rows = runfiles.read_metrics(run)
        assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows), name
        final = run / "final"
        assert json.loads((final / "checkpoint.json").read_text())["step"] == 2
        model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.bfloat16)
        assert type(model).__name__.lower().startswith(name[:4]), type(model).__name__
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        # The export holds the trained weights, not the initial ones.
        init = AutoModelForCausalLM.from_pretrained(models[name], dtype=torch.float32)
        trained = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
        moved = [(a - b).abs().max().item() for a, b in zip(init.parameters(), trained.parameters())]
        assert max(moved) > 1e-3, name


def test_fsdp_blocks_come_from_the_models_own_no_split_modules(tiny_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    for name in ("qwen3", "gemma2", "phi3"):
        model = AutoModelForCausalLM.from_pretrained(tiny_arch(name, tok, tmp_path / name))
        assert [c.__name__ for c in sharding.block_classes(model)] == [type(model.model.layers[0]).__name__]


def test_single_strategy_on_two_processes_is_refused():
    cfg = RunConfig(datasets=["skills"], distributed={"strategy": "single", "num_processes": 2})
    with pytest.raises(ConfigError, match="'single' runs one process"):
        sharding.choose_strategy(cfg, 2)


def test_auto_strategy_is_single_on_one_process_and_ddp_on_cpu():
    cfg = RunConfig(datasets=["skills"], distributed={"cpu": True, "num_processes": 2})
    assert sharding.choose_strategy(cfg, 1) == "single"
    assert sharding.choose_strategy(cfg, 2) == "ddp"


@pytest.mark.slow
def test_a_failing_non_zero_rank_shows_its_traceback_and_is_named_in_status(tmp_path):
    cfg = RunConfig(name="boom", runs_root=str(tmp_path), distributed={"cpu": True, "num_processes": 2,
                    "strategy": "fsdp"}, **{**EQ, "datasets": ["eval_exact"]})
    proc = worker(2, [save(cfg)], "--fail-rank", "1", "--fail-step", "2")
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert "[rank 1] Traceback (most recent call last):" in log
    assert "[rank 1] RuntimeError: injected failure on rank 1 at step 2" in log
    status = runfiles.read_status(cfg.run_dir)
    assert status["state"] == "failed" and status["failed_rank"] == 1, status
    assert "injected failure on rank 1" in status["error"]
    assert os.path.isfile(cfg.run_dir / "errors" / "rank-1.json")


def test_eval_environment_drops_every_distributed_variable(monkeypatch):
    from labkit.train import eval_env

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
              "ACCELERATE_USE_FSDP"):
        monkeypatch.setenv(k, "1")
    env = eval_env()
    assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"} & env.keys()
    assert not [k for k in env if k.startswith(("TORCHELASTIC_", "ACCELERATE_"))]
    assert env["PATH"] == os.environ["PATH"]


@pytest.mark.slow
def test_a_background_evaluation_of_a_two_process_run_runs_outside_the_group_and_the_run_finishes(tmp_path):
    cfg = RunConfig(name="ev", runs_root=str(tmp_path), distributed={"cpu": True, "num_processes": 2},
                    eval_tasks=["labkit_knowledge_mc"], eval_limit=2, eval_every_samples=32,
                    **{**EQ, "max_steps": 2})
    proc = worker(2, [save(cfg)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert runfiles.read_status(cfg.run_dir)["state"] == "finished"
    scored = json.loads((cfg.run_dir / "evals" / "2.json").read_text())
    assert scored["step"] == 2, (cfg.run_dir / "evals.log").read_text()[-2000:]
    assert "on cpu" in proc.stdout and not list((cfg.run_dir / "evals" / "pending").glob("*"))
