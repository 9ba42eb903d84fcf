"""The steps of `bench/device_check.sh`, one subcommand each; every step prints one JSON result line.

    python bench/device_check.py env
    python bench/device_check.py model --preset 1b --out /scratch/llama-1b
    python bench/device_check.py train --model /scratch/llama-1b --root /scratch/runs --steps 40
    python bench/device_check.py resume --model /scratch/llama-1b --root /scratch/runs --strategy fsdp

The models are random-init Llama-3.2 shapes built from a config (no download) with labkit's tiny
tokenizer beside them, so the shipped datasets tokenize with no network; the vocabulary stays the real
128,256 rows so the head and loss cost what they cost on a real checkpoint.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import inspect
import json
import math
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any

# The shapes are Llama-3.2-1B/3B's (config.json of the published checkpoints); `tiny` keeps the dry run
# on a CPU within seconds.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2048),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
}
# What status.json may say for each strategy asked for with one process: DDP over one rank is plain
# single-device training; FSDP must really be FSDP (sharding over one rank still runs its code path).
RUNNING_AS = {"ddp": ("ddp", "single"), "fsdp": ("fsdp",)}


def emit(result: dict[str, Any]) -> int:
    print(json.dumps(result, default=str), flush=True)
    return 0 if result.get("ok") else 1


def cmd_env(args: argparse.Namespace) -> int:
    import torch

    versions = {}
    for pkg in ("torch", "transformers", "accelerate", "tokenizers", "pydantic", "duckdb", "trl", "datasets",
                "flash-attn", "liger-kernel", "lm-eval", "papermill"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    kernels: dict[str, Any] = {"flash_attn": importlib.util.find_spec("flash_attn") is not None,
                               "liger_kernel": importlib.util.find_spec("liger_kernel") is not None}
    try:
        from torch.nn.attention.varlen import varlen_attn

        kernels["torch_varlen"] = sorted(inspect.signature(varlen_attn).parameters)
    except ImportError as e:
        kernels["torch_varlen"] = f"absent: {e}"
    cuda = torch.cuda.is_available()
    from labkit import attention

    chosen = attention.choose("auto", packing=True, device=torch.device("cuda" if cuda else "cpu"))
    return emit({"step": "env", "ok": True, "python": platform.python_version(), "versions": versions,
                 "cuda": cuda, "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                 "bf16": cuda and torch.cuda.is_bf16_supported(), "kernels": kernels, "attention_auto": chosen})


def cmd_model(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from labkit.tiny import ensure_tiny

    t = time.time()
    out = Path(args.out)
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return emit({"step": "model", "ok": True, "preset": args.preset, "dir": str(out), "cached": True})
    tok = AutoTokenizer.from_pretrained(ensure_tiny())
    shape = PRESETS[args.preset]
    config = LlamaConfig(**shape, max_position_embeddings=8192, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, rope_theta=500000.0)
    torch.manual_seed(0)
    # Built on the GPU when there is one: initialising 3B parameters on 16 CPU cores takes minutes.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return emit({"step": "model", "ok": True, "preset": args.preset, "dir": str(out),
                 "params": model.num_parameters(), "seconds": round(time.time() - t, 1)})


def run_config(args: argparse.Namespace, name: str, steps: int, **extra: Any):
    from labkit.config import RunConfig

    cpu = args.cpu
    return RunConfig(
        name=name, runs_root=str(args.root), model=str(args.model), datasets=["knowledge", "skills"],
        effective_batch_size=args.batch, max_tokens_per_device=args.tokens, max_seq_len=1024,
        max_steps=steps, learning_rate=1e-5, schedule="constant", seed=0, keep_checkpoints=2,
        distributed={"num_processes": 1, "strategy": args.strategy, "cpu": cpu,
                     "mixed_precision": "no" if cpu else "bf16"},
        **extra)


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    timed = rows[3:] or rows  # the first steps include compilation and allocator warm-up
    return {
        "steps": len(rows), "first_loss": rows[0]["loss"] if rows else None,
        "last_loss": rows[-1]["loss"] if rows else None,
        "finite": all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows),
        "tokens_per_s": sum(r["tokens_per_s"] for r in timed) / len(timed) if timed else None,
        "peak_mem_mb": max((r.get("peak_mem_mb") or 0) for r in rows) if rows else None,
        "packing_efficiency": sum(r["packing_efficiency"] for r in timed) / len(timed) if timed else None,
    }


def load_export(path: Path) -> dict[str, Any]:
    """The export loads back in bf16 and generates: what a user of the fine-tuned model does first."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(path)
    if torch.cuda.is_available():
        model = model.cuda()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"].to(model.device)
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    return {"export": str(path), "export_dtypes": saved_dtypes(path),
            "generated_tokens": int(out.shape[1] - ids.shape[1])}


def saved_dtypes(path: Path) -> list[str]:
    """The dtypes the export holds on disk (loading in bf16 would hide an fp32 export)."""
    from safetensors import safe_open

    found = set()
    for f in Path(path).glob("*.safetensors"):
        with safe_open(f, framework="pt") as fh:
            found.update(str(fh.get_slice(k).get_dtype()) for k in fh.keys())
    return sorted(found)


def cmd_train(args: argparse.Namespace) -> int:
    from labkit.launch import launch

    t = time.time()
    run = launch(run_config(args, args.name, args.steps))
    status = run.wait(timeout=args.timeout)
    rows = metrics(run.dir)
    result = {"step": f"train-{args.strategy}", "run_dir": str(run.dir), "state": status.get("state"),
              "error": status.get("error"), "strategy_running": status.get("strategy"),
              "attention": status.get("attention"), "seconds": round(time.time() - t, 1), **summarize(rows)}
    # The strategy running must be the one asked for: a silent fallback (FSDP -> DDP) is a failure.
    result["ok"] = (status.get("state") == "finished" and result["finite"] and len(rows) == args.steps
                    and status.get("strategy") in RUNNING_AS[args.strategy])
    if result["ok"]:
        try:
            result.update(load_export(run.dir / "final"))
        except Exception as e:  # noqa: BLE001 - reported, not raised: the next steps still run
            result.update(ok=False, export_error=f"{type(e).__name__}: {e}")
    if not result["ok"]:
        result["log_tail"] = run.tail(30)
    return emit(result)


def cmd_resume(args: argparse.Namespace) -> int:
    """Train with checkpoints, kill -9 the trainer after the first one, resume: each step exactly once."""
    from labkit import runfiles
    from labkit.launch import launch

    t = time.time()
    every = args.batch * args.checkpoint_step
    cfg = run_config(args, args.name, args.steps, save_every_samples=every, save_final=False)
    run = launch(cfg)
    deadline = time.time() + args.timeout
    while not runfiles.checkpoints(run.dir) and time.time() < deadline \
            and run.status()["state"] in ("pending", "running"):
        time.sleep(0.5)
    killed_at = runfiles.read_status(run.dir).get("step")
    pgid = run.launcher().get("pgid")
    if pgid:
        os.killpg(pgid, signal.SIGKILL)
    time.sleep(2)
    ckpt = runfiles.checkpoints(run.dir)
    resumed = launch(cfg.with_updates(resume=True))
    status = resumed.wait(timeout=max(30.0, deadline - time.time()))
    rows = metrics(run.dir)
    steps = [r["step"] for r in rows]
    dedup = sorted({r["step"] for r in rows})
    result = {"step": f"resume-{args.strategy}", "killed_at_step": killed_at,
              "checkpoint": ckpt[-1].name if ckpt else None, "state": status.get("state"),
              "error": status.get("error"), "strategy_running": status.get("strategy"),
              "steps_logged": steps, "seconds": round(time.time() - t, 1),
              "ok": status.get("state") == "finished" and bool(ckpt) and dedup == list(range(1, args.steps + 1))
              and len(steps) == len(dedup) and status.get("strategy") in RUNNING_AS[args.strategy]}
    if not result["ok"]:
        result["log_tail"] = resumed.tail(40)
    return emit(result)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env", help="versions, devices, attention kernels")
    m = sub.add_parser("model", help="a random-init Llama-shaped checkpoint with labkit's tiny tokenizer")
    m.add_argument("--preset", choices=list(PRESETS), default="1b")
    m.add_argument("--out", required=True)
    for name, helptext in (("train", "a real labkit run to its final export"),
                           ("resume", "checkpoint, kill -9, resume: every step exactly once")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", required=True)
        p.add_argument("--root", required=True, help="runs root")
        p.add_argument("--name", default=name)
        p.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
        p.add_argument("--steps", type=int, default=40)
        p.add_argument("--checkpoint-step", type=int, default=4, help="resume: checkpoint every N steps")
        p.add_argument("--batch", type=int, default=64, help="effective batch (samples per step)")
        p.add_argument("--tokens", type=int, default=16384, help="max_tokens_per_device")
        p.add_argument("--cpu", action="store_true", help="the dry run: train on the CPU")
        p.add_argument("--timeout", type=float, default=300)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return {"env": cmd_env, "model": cmd_model, "train": cmd_train, "resume": cmd_resume}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
