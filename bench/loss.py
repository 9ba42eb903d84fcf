"""Head + loss benchmark: transformers' causal-LM loss vs labkit's chunked linear cross-entropy.

One micro-batch of a Llama-3.2-1B-shaped head (hidden 2048, vocab 128,256) on `--tokens` positions,
of which `--labelled` carry a label (assistant-only loss: prompts and padding do not). Each variant
runs forward + backward in its own process, so its peak RSS (CPU) or peak allocated memory (CUDA) is
its own; the result is the memory above the inputs and the time per micro-batch.

    .venv/bin/python bench/loss.py               # writes bench/results/loss.json
    .venv/bin/python bench/loss.py --device cuda --dtype bf16 --tokens 16384
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/results.py, however this file is loaded
import results as bench_results  # noqa: E402
import torch

VARIANTS = ("transformers", "chunked")


def peak_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(args: argparse.Namespace) -> dict:
    """Run one variant in this process and return its numbers."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    from labkit.loss import linear_cross_entropy

    dev, dt = args.device, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    hidden = torch.randn(1, args.tokens, args.hidden, device=dev, dtype=dt, requires_grad=True)
    weight = (torch.randn(args.vocab, args.hidden, device=dev, dtype=dt) * 0.02).requires_grad_()
    labels = torch.randint(0, args.vocab, (1, args.tokens), device=dev)
    labels[0, : args.tokens - args.labelled] = -100  # the prompt part
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = peak_mb(dev)
    times, loss = [], None
    for _ in range(args.repeat):
        hidden.grad = weight.grad = None
        t = time.perf_counter()
        if args.variant == "transformers":
            logits = hidden @ weight.T  # what lm_head does
            loss = ForCausalLMLoss(logits, labels, args.vocab, num_items_in_batch=args.labelled)
        else:
            loss = linear_cross_entropy(hidden, weight, labels, args.labelled, args.chunk)
        loss.backward()
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return {"variant": args.variant, "loss": float(loss), "seconds": min(times),
            "peak_mb": peak_mb(dev), "extra_mb": peak_mb(dev) - base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--labelled", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="bench/results/loss.json")
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(one(args)))
        return
    # Each variant runs in a fresh process (its peak memory is its own) with the same shape flags.
    flags = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("variant", "out")]
    results = []
    for v in VARIANTS:
        out = subprocess.run([sys.executable, __file__, *flags, "--variant", v], check=True,
                             capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    hf, ours = results
    print(f"{'variant':<14}{'loss':>10}{'s/micro-batch':>15}{'extra MB':>10}")
    for r in results:
        print(f"{r['variant']:<14}{r['loss']:>10.4f}{r['seconds']:>15.3f}{r['extra_mb']:>10.0f}")
    summary = {"memory_ratio": ours["extra_mb"] / hf["extra_mb"], "speedup": hf["seconds"] / ours["seconds"],
               "loss_rel_diff": abs(ours["loss"] - hf["loss"]) / abs(hf["loss"])}
    print(summary)
    out = bench_results.write(args.out, {"args": {k: v for k, v in vars(args).items() if k != "variant"},
                                         **bench_results.machine(), "torch": torch.__version__,
                                         "results": results, **summary})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
