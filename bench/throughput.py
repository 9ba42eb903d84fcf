"""Trainer throughput, packed (multipack + padding-free) vs padded, through labkit's real training loop.

CPU (default): the tiny model on synthetic chat samples. On a CUDA machine `--shape 1b` builds a
random-init Llama-3.2-1B-shaped checkpoint (config only, no download) and reports MFU against the
H100's 989 TFLOP/s bf16 peak. Writes bench/results/throughput.json.

    python bench/throughput.py [--shape tiny|1b|3b] [--samples 512] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
from pathlib import Path

import torch

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=True),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=True),
}
WORDS = "the a of to in is was for on that with as by at from his her they be this have or one had".split()


def synthetic_data(path: Path, n: int, seed: int, lo: int, hi: int, median: int) -> None:
    """Chat samples whose lengths follow a clipped lognormal (roughly tokens: one word ~ one token)."""
    rng = random.Random(seed)
    with path.open("w") as fh:
        for _ in range(n):
            length = int(min(hi, max(lo, rng.lognormvariate(0, 0.9) * median)))
            q = " ".join(rng.choice(WORDS) for _ in range(max(4, length // 4)))
            a = " ".join(rng.choice(WORDS) for _ in range(max(4, length - length // 4)))
            fh.write(json.dumps({"messages": [{"role": "user", "content": q},
                                              {"role": "assistant", "content": a}]}) + "\n")


def model_dir(shape: str, root: Path) -> Path:
    from labkit.tiny import ensure_tiny

    if shape == "tiny":
        return ensure_tiny()
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = root / f"llama-{shape}"
    if not (out / "config.json").exists():
        tok = AutoTokenizer.from_pretrained(ensure_tiny())
        cfg = LlamaConfig(**SHAPES[shape], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return out


def flops_per_token(model_path: Path, seq_len: float) -> float:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_path)
    n_params = (c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
                + c.num_hidden_layers * (2 * c.hidden_size ** 2
                                         + 2 * c.hidden_size * c.hidden_size * c.num_key_value_heads
                                         // c.num_attention_heads + 3 * c.hidden_size * c.intermediate_size))
    attn = 6 * c.num_hidden_layers * c.hidden_size * seq_len  # causal: half of 12·L·d·s
    return 6 * n_params + attn


def run(packing: bool, args, data: Path, model: Path, root: Path) -> dict:
    from labkit.config import RunConfig
    from labkit.runfiles import read_metrics
    from labkit.train import train

    cfg = RunConfig(
        name=f"{'packed' if packing else 'padded'}", runs_root=str(root / "runs"), model=str(model),
        datasets=[str(data)], packing=packing, effective_batch_size=args.batch,
        max_tokens_per_device=args.budget, max_seq_len=args.max_len, learning_rate=1e-4,
        max_steps=args.steps, save_final=False, seed=0,
        distributed={"activation_checkpointing": args.shape != "tiny"},
    )
    final = train(cfg)
    rows = read_metrics(cfg.run_dir)
    if final["state"] != "finished":
        raise RuntimeError(f"benchmark run failed: {final}")
    timed = rows[1:] or rows  # the first step pays for warm-up and allocation
    secs = sum(r["step_time"] for r in timed)
    tokens = sum(r2["tokens"] - r1["tokens"] for r1, r2 in zip(rows, rows[1:])) if len(rows) > 1 else rows[0]["tokens"]
    tps = tokens / secs
    out = {"tokens_per_s": tps, "samples_per_s": sum(r["samples_per_s"] for r in timed) / len(timed),
           "packing_efficiency": sum(r["packing_efficiency"] for r in timed) / len(timed),
           "peak_mem_mb": max(r["peak_mem_mb"] for r in rows), "final_loss": rows[-1]["loss"],
           "steps": len(rows)}
    if torch.cuda.is_available():
        mean_len = rows[-1]["tokens"] / rows[-1]["samples"]
        out["mfu"] = tps * flops_per_token(model, mean_len) / 989e12
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["tiny", "1b", "3b"], default="tiny")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32, help="effective batch size (samples per step)")
    ap.add_argument("--budget", type=int, default=4096, help="max tokens per device micro-batch")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--median", type=int, default=60, help="median sample length (words)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/throughput.json"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "synthetic.jsonl"
        synthetic_data(data, args.samples, seed=0, lo=16, hi=args.max_len // 2, median=args.median)
        model = model_dir(args.shape, root)
        results = {mode: run(mode == "packed", args, data, model, root) for mode in ("packed", "padded")}
    results["speedup_packed_over_padded"] = results["packed"]["tokens_per_s"] / results["padded"]["tokens_per_s"]
    results["setup"] = {**vars(args), "out": str(args.out), "device": torch.cuda.get_device_name()
                        if torch.cuda.is_available() else platform.processor() or "cpu",
                        "torch": torch.__version__, "threads": torch.get_num_threads()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    for mode in ("packed", "padded"):
        r = results[mode]
        print(f"{mode:7s} {r['tokens_per_s']:10.0f} tokens/s  packing {r['packing_efficiency']:.3f}  "
              f"peak {r['peak_mem_mb']:.0f} MB" + (f"  MFU {r['mfu']:.1%}" if "mfu" in r else ""))
    print(f"packed/padded: {results['speedup_packed_over_padded']:.2f}x  -> {args.out}")


if __name__ == "__main__":
    main()
