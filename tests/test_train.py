"""The trainer, on the tiny model and the shipped data, with real accelerate."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from labkit import catalog, runfiles
from labkit.config import RunConfig
from labkit.data.collate import collate_packed
from labkit.data.tokenize import tokenize_records
from labkit.train import checkpoints, samples_in_steps, train

BASE = dict(model="tiny", effective_batch_size=16, max_tokens_per_device=1024, max_seq_len=256, seed=7)


def cfg_for(tmp_path, **kw) -> RunConfig:
    return RunConfig(**{"name": "t", "runs_root": str(tmp_path), "datasets": ["skills"], **BASE, **kw})


def launch_cmd(n: int, config_path) -> list[str]:
    # With --cpu accelerate starts one process whatever --num_processes says; --multi_gpu on a
    # machine without CUDA starts n gloo processes through torchrun.
    backend = "--multi_gpu" if n > 1 else "--cpu"
    return [sys.executable, "-m", "accelerate.commands.launch", backend, "--num_processes", str(n),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(29600 + os.getpid() % 300 + n), "-m", "labkit.train", str(config_path)]


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="sdpa", dtype=torch.float32)
    # A KV cache turns off transformers' packed-sequence masking, as in the trainer.
    model.config.use_cache = False
    samples, _ = tokenize_records(catalog.load("knowledge")[:12], tok, max_seq_len=256)
    return model, tok, samples


def token_loss_sum(model, batch) -> torch.Tensor:
    logits = model(**{k: batch[k] for k in batch if k in ("input_ids", "position_ids", "attention_mask")}).logits
    return torch.nn.functional.cross_entropy(
        logits[0, :-1].float(), batch["labels"][0, 1:], ignore_index=-100, reduction="sum")


def test_packed_loss_equals_the_samples_run_one_by_one(tiny):
    model, tok, samples = tiny
    packed = token_loss_sum(model, collate_packed(samples, tok.pad_token_id))
    alone = sum(token_loss_sum(model, collate_packed([s], tok.pad_token_id)) for s in samples)
    assert packed.item() == pytest.approx(alone.item(), rel=1e-4)


def grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_accumulation_and_ranks_give_the_gradient_of_one_big_batch(tiny):
    """Per-micro-batch loss = token-loss sum / step's global token count × world size."""
    model, tok, samples = tiny

    def backward(groups, world):
        model.zero_grad()
        batches = [collate_packed(g, tok.pad_token_id) for g in groups]
        total = sum(int(b["num_loss_tokens"]) for b in batches)
        for b in batches:
            (token_loss_sum(model, b) / total * world).backward()
        return grads(model) / world  # DDP averages the ranks' gradients

    big = backward([samples], 1)
    accumulated = backward([samples[:3], samples[3:5], samples[5:]], 1)
    assert torch.allclose(accumulated, big, atol=1e-6, rtol=1e-4)
    # Two ranks, each accumulating over two micro-batches; normalisation uses the global count.
    halves = [samples[:4], samples[4:6], samples[6:9], samples[9:]]
    batches = [collate_packed(g, tok.pad_token_id) for g in halves]
    total = sum(int(b["num_loss_tokens"]) for b in batches)
    rank_grads = []
    for mine in (batches[:2], batches[2:]):
        model.zero_grad()
        for b in mine:
            (token_loss_sum(model, b) / total * 2).backward()
        rank_grads.append(grads(model))
    assert torch.allclose((rank_grads[0] + rank_grads[1]) / 2, big, atol=1e-6, rtol=1e-4)


def test_a_short_run_lowers_the_loss_and_logs_every_step(tmp_path):
    cfg = cfg_for(tmp_path, datasets=["knowledge"], epochs=2, learning_rate=3e-3, effective_batch_size=16)
    final = train(cfg)
    assert final["state"] == "finished"
    rows = runfiles.read_metrics(cfg.run_dir)
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and len(rows) == 2 * 24
    assert rows[-1]["samples"] == 2 * 384
    first = sum(r["loss"] for r in rows[:3]) / 3
    last = sum(r["loss"] for r in rows[-3:]) / 3
    assert last < 0.6 * first, (first, last)
    keys = {"step", "epoch", "samples", "tokens", "loss", "grad_norm", "lr", "tokens_per_s", "samples_per_s",
            "packing_efficiency", "peak_mem_mb", "time", "phase", "step_time"}
    assert keys <= rows[0].keys()
    assert all(0 < r["packing_efficiency"] <= 1 for r in rows)
    status = runfiles.read_status(cfg.run_dir)
    assert status["state"] == "finished" and status["step"] == len(rows)
    reloaded = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "final")
    assert reloaded.num_parameters() > 0


def test_phases_run_in_order_from_the_previous_weights(tmp_path):
    cfg = RunConfig(name="ph", runs_root=str(tmp_path), phases=[
        {"datasets": ["knowledge"], "epochs": 1}, {"datasets": ["eval_exact"], "epochs": 1}], **BASE)
    assert train(cfg)["state"] == "finished"
    rows = runfiles.read_metrics(cfg.run_dir)
    phases = [r["phase"] for r in rows]
    assert phases == sorted(phases) and set(phases) == {0, 1}
    assert phases.count(0) == 24 and phases.count(1) == 8
    assert rows[-1]["samples"] == 384 + 120


def test_stop_file_stops_cleanly_with_a_checkpoint(tmp_path, monkeypatch):
    cfg = cfg_for(tmp_path, max_steps=50)
    update = runfiles.update_status

    # Someone drops a STOP file while step 3 is being logged (the trainer clears old ones at start).
    def update_and_stop_at_step_3(run_dir, **fields):
        if fields.get("step") == 3:
            (cfg.run_dir / runfiles.STOP).write_text("enough")
        return update(run_dir, **fields)

    monkeypatch.setattr(runfiles, "update_status", update_and_stop_at_step_3)
    final = train(cfg)
    assert final["state"] == "stopped" and "STOP file: enough" in final["stop_reason"]
    assert final["step"] == 3
    ckpts = checkpoints(cfg.run_dir)
    assert ckpts and json.loads((ckpts[-1] / "checkpoint.json").read_text())["step"] == 3
    assert AutoModelForCausalLM.from_pretrained(ckpts[-1]).num_parameters() > 0


def test_grad_norm_rule_stops_the_run(tmp_path):
    cfg = cfg_for(tmp_path, early_stop={"grad_norm_max": 1e-6, "grad_norm_patience": 2})
    final = train(cfg)
    assert final["state"] == "stopped" and final["step"] == 2
    assert "grad norm above" in final["stop_reason"]


def test_missing_model_dir_fails_with_a_clear_status(tmp_path):
    final = train(cfg_for(tmp_path, model=str(tmp_path / "nowhere")))
    assert final["state"] == "failed" and "no config.json" in final["error"]


def test_bad_dataset_line_is_named_in_the_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
                   '{"messages": [{"role": "user", "content": "q"}]}\n')
    final = train(cfg_for(tmp_path, datasets=[str(bad)]))
    assert final["state"] == "failed" and f"{bad}:2: no assistant turn" in final["error"]


def test_token_budget_below_the_longest_sample_says_how_to_fix(tmp_path):
    final = train(cfg_for(tmp_path, datasets=["knowledge"], max_tokens_per_device=40))
    assert final["state"] == "failed"
    assert "max_tokens_per_device" in final["error"] and "40" in final["error"]


@pytest.mark.slow
def test_two_processes_match_one_process_step_for_step(tmp_path):
    runs = {}
    for n in (1, 2):
        cfg = cfg_for(tmp_path, name=f"p{n}", max_steps=4, learning_rate=1e-3)
        path = cfg.save(cfg.run_dir / "config.yaml")
        subprocess.run(launch_cmd(n, path), check=True, capture_output=True, timeout=300)
        runs[n] = runfiles.read_metrics(cfg.run_dir)
        assert runfiles.read_status(cfg.run_dir)["world_size"] == n
    one, two = runs[1], runs[2]
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    assert [r["samples"] for r in one] == [r["samples"] for r in two]
    # Same samples per step and exact token-mean loss: same loss and the same gradient.
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)


@pytest.mark.slow
def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path):
    ref = cfg_for(tmp_path, name="ref", max_steps=12, learning_rate=1e-3)
    assert train(ref)["state"] == "finished"
    cfg = cfg_for(tmp_path, name="crash", max_steps=12, learning_rate=1e-3, save_every_samples=64)
    path = cfg.save(cfg.run_dir / "config.yaml")
    proc = subprocess.Popen(launch_cmd(1, path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        rows = runfiles.read_metrics(cfg.run_dir)
        if checkpoints(cfg.run_dir) and rows and rows[-1]["step"] >= 6:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = runfiles.read_metrics(cfg.run_dir)[-1]["step"]
    assert killed_at < 12
    resumed = cfg.with_updates(resume=True)
    assert train(resumed)["state"] == "finished"
    lines = (cfg.run_dir / runfiles.METRICS).read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == list(range(1, 13))  # no duplicate, no torn line
    got = runfiles.read_metrics(cfg.run_dir)
    want = runfiles.read_metrics(ref.run_dir)
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), a["step"]


def test_background_evals_score_every_eval_point_while_old_checkpoints_are_pruned(tmp_path):
    # keep_checkpoints=1 prunes at every save; a checkpoint still being evaluated must survive that.
    cfg = cfg_for(tmp_path, datasets=["knowledge"], max_steps=6, eval_every_samples=32, save_every_samples=16,
                  keep_checkpoints=1, eval_tasks=["labkit_knowledge_mc"], eval_limit=4)
    assert train(cfg)["state"] == "finished"
    scored = sorted(int(p.stem) for p in (cfg.run_dir / "evals").glob("*.json"))
    assert scored == [2, 4, 6], (cfg.run_dir / "evals.log").read_text()[-2000:]
    assert len(checkpoints(cfg.run_dir)) == 1
    status = runfiles.read_status(cfg.run_dir)
    assert status["total_samples"] == status["samples"] == 6 * 16  # max_steps caps the planned total


def test_planned_samples_follow_short_last_steps_across_epochs_and_phases():
    # Phase sizes 10 and 7, batch 4: steps of 4, 4, 2 (twice: two epochs), then 4, 3.
    assert samples_in_steps(4, [10, 7], [2, 1], 100) == 27
    assert samples_in_steps(4, [10, 7], [2, 1], 7) == 24
    assert samples_in_steps(4, [10, 7], [2, 1], 0) == 0


def test_validation_is_the_token_mean_loss_planned_within_the_token_budget(tmp_path):
    # A budget of 300 tokens: the validation set runs as several padded micro-batches of the training
    # planner; its loss must still be the mean over all its assistant tokens.
    cfg = cfg_for(tmp_path, max_steps=1, max_tokens_per_device=300, val_dataset="eval_exact", val_every_samples=16,
                  export_dtype="float32")
    assert train(cfg)["state"] == "finished"
    (row,) = runfiles.read_metrics(cfg.run_dir)
    model = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "final", attn_implementation="sdpa",
                                                 dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(cfg.run_dir / "final")
    samples, _ = tokenize_records(catalog.load("eval_exact"), tok, max_seq_len=256)
    with torch.no_grad():
        total = sum(token_loss_sum(model, collate_packed([s], tok.pad_token_id)).item() for s in samples)
    n = sum(sum(1 for x in s.labels[1:] if x != -100) for s in samples)
    assert row["val_loss"] == pytest.approx(total / n, rel=1e-4)
