"""The memory plan against published shapes and rules of thumb, and refusals before anything starts.

Rules and tolerances (labkit.memory's docstring derives each term):
- parameter count: the published sizes of Llama-3.2-1B/3B and Llama-3.1-8B, within 0.1%;
- model state: ZeRO's 16 bytes per parameter for mixed-precision Adam: exactly 16·P/N sharded under
  fsdp; single/ddp between 16·P and 18·P (the extra 2·P is autocast's bf16 weight cache);
- activations without checkpointing: Korthikanti et al.'s 34·s·h per layer adapted to a gated MLP,
  18·h + 8·i bytes per token and layer, within 25%; with checkpointing, their full-recomputation
  2·s·h·L plus one recomputed layer.
"""

import json

import pytest

from labkit import launch, memory
from labkit.config import ConfigError, RunConfig, load_config

GiB = 2**30
LLAMA = {
    # name: (config.json fields, published parameter count)
    "llama-3.2-1b": (dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                          num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
                     1_235_814_400),
    "llama-3.2-3b": (dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                          num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True),
                     3_212_749_824),
    "llama-3.1-8b": (dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False),
                     8_030_261_248),
}


def shape(name: str) -> memory.Shape:
    return memory.Shape.from_config(LLAMA[name][0])


@pytest.mark.parametrize("name", sorted(LLAMA))
def test_parameter_counts_match_the_published_sizes(name):
    assert shape(name).params == pytest.approx(LLAMA[name][1], rel=1e-3)


@pytest.mark.parametrize("name", sorted(LLAMA))
def test_model_state_follows_the_16_bytes_per_parameter_rule(name):
    s, p = shape(name), LLAMA[name][1]
    fp32 = memory.estimate(s, "single", 1, 4096, False, compute_bytes=4)
    ddp = memory.estimate(s, "ddp", 8, 4096, False)
    assert fp32.model_state == pytest.approx(16 * p, rel=1e-3)
    assert 16 * p * 0.999 <= ddp.model_state <= 18 * p * 1.001
    fsdp = memory.estimate(s, "fsdp", 8, 4096, False)
    in_flight = 2 * 2 * s.block_params + 6 * s.root_params
    assert fsdp.model_state - in_flight == pytest.approx(16 * p / 8, rel=1e-3)


@pytest.mark.parametrize("name", sorted(LLAMA))
def test_activations_follow_the_adapted_korthikanti_rule(name):
    s, tokens = shape(name), 16384
    rule = (18 * s.hidden + 8 * s.intermediate) * tokens * s.layers
    off = memory.estimate(s, "fsdp", 8, tokens, False)
    assert off.activations == pytest.approx(rule, rel=0.25)
    on = memory.estimate(s, "fsdp", 8, tokens, True)
    recompute = 2 * s.hidden * tokens * s.layers  # their 2·s·h·L
    assert on.activations == recompute + off.activations // s.layers
    assert on.activations < off.activations / 5


def test_activation_checkpointing_auto_turns_on_from_about_3b():
    assert memory.wants_checkpointing("auto", LLAMA["llama-3.2-3b"][1])
    assert not memory.wants_checkpointing("auto", LLAMA["llama-3.2-1b"][1])
    assert memory.wants_checkpointing(True, 10) and not memory.wants_checkpointing(False, 10**10)


def model_dir(tmp_path, name: str):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**LLAMA[name][0], "model_type": "llama"}))
    return d


def test_8b_on_8_gpus_fits_under_fsdp_and_not_under_ddp(tmp_path):
    mdir = model_dir(tmp_path, "llama-3.1-8b")
    gpus = [80 * GiB] * 8
    base = dict(model=str(mdir), datasets=["skills"], max_tokens_per_device=16384)
    fsdp = RunConfig(**base, distributed={"num_processes": 8, "strategy": "fsdp"})
    assert memory.check(fsdp, gpus) == []
    assert memory.plan(fsdp).total < 40 * GiB  # ~2 GB/param-shard + checkpointed activations
    (problem,) = memory.check(RunConfig(**base, distributed={"num_processes": 8, "strategy": "ddp"}), gpus)
    assert "distributed.strategy: fsdp" in problem and "80 GiB" in problem
    auto = RunConfig(**base, distributed={"num_processes": 8})
    assert memory.check(auto, gpus) == [] and memory.auto_strategy_for(auto, gpus) == "fsdp"


@pytest.mark.parametrize("precision", ["bf16", "no"])  # "no": fp32 activations, advice sized in fp32 too
def test_a_too_large_token_budget_is_refused_with_the_budget_that_fits(tmp_path, precision):
    mdir = model_dir(tmp_path, "llama-3.2-1b")
    cfg = RunConfig(model=str(mdir), datasets=["skills"], max_tokens_per_device=60000,
                    distributed={"num_processes": 1, "activation_checkpointing": False,
                                 "mixed_precision": precision})
    (problem,) = memory.check(cfg, [48 * GiB])
    assert "activation_checkpointing: true" in problem and "max_tokens_per_device:" in problem
    fitting = int(problem.split("max_tokens_per_device: ")[1].split()[0])
    assert memory.check(cfg.with_updates(max_tokens_per_device=fitting), [48 * GiB]) == []
    assert memory.check(cfg.with_updates(max_tokens_per_device=fitting + 1024), [48 * GiB])


def test_an_impossible_plan_is_refused_before_any_process_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "visible_gpu_memory", lambda: [24 * GiB])  # this CI box has no GPU
    mdir = model_dir(tmp_path, "llama-3.1-8b")
    cfg = RunConfig(name="big", runs_root=str(tmp_path / "runs"), model=str(mdir), datasets=["skills"])
    with pytest.raises(ConfigError, match="the memory plan needs"):
        launch.launch(cfg)
    assert not (tmp_path / "runs").exists()
    path = tmp_path / "big.yaml"
    path.write_text(cfg.to_yaml())
    with pytest.raises(ConfigError, match="more GPUs with fsdp"):
        load_config(path, check=True)  # what `python -m labkit.train` runs first


def test_cpu_runs_and_the_tiny_model_need_no_gpu_plan():
    assert memory.check(RunConfig(datasets=["skills"], distributed={"cpu": True}), [1]) == []
    assert memory.check(RunConfig(datasets=["skills"]), [1]) == []  # tiny: sized by nothing
