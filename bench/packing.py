"""Packing benchmark: multipack vs padded micro-batches on a lognormal length distribution.

For each (effective batch, token budget, replicas) it plans one epoch and reports:
- packing efficiency: real tokens / (micro-batches x replicas x budget), mean over steps;
- bound: the best efficiency any plan with equal micro-batch counts per rank can reach
  (ceil(step tokens / (replicas x budget)) micro-batches per rank), so efficiency / bound is the
  packer's own loss and the rest is the granularity of whole micro-batches;
- micro-batches per rank per step, and samples per micro-batch;
- the padded alternatives: a fixed batch of budget // max_len samples padded to its longest row,
  and labkit's `packing: false` plan (length-sorted groups), with their padding fractions;
- planning time for the epoch.

    .venv/bin/python bench/packing.py            # writes bench/results/packing.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from labkit.data.multipack import packing_efficiency, padded_plan_epoch, plan_epoch


def lengths(n: int, seed: int, lo: int, hi: int, mu: float, sigma: float) -> np.ndarray:
    return np.clip(np.random.default_rng(seed).lognormal(mu, sigma, n), lo, hi).astype(np.int64)


def padding_fraction(groups: list[list[int]], lens: np.ndarray) -> float:
    """Pad tokens / all tokens when each group is one right-padded batch."""
    groups = [g for g in groups if g]
    real = sum(int(lens[g].sum()) for g in groups)
    slots = sum(len(g) * int(lens[g].max()) for g in groups)
    return 1 - real / slots


def fixed_padded(lens: np.ndarray, ebs: int, per_mb: int, seed: int) -> list[list[int]]:
    """The naive padded loader: shuffled steps cut into micro-batches of `per_mb` samples."""
    order = np.random.default_rng([seed, 0]).permutation(len(lens))
    return [order[i : i + per_mb].tolist() for s in range(0, len(lens), ebs)
            for i in range(s, min(s + ebs, len(lens)), per_mb)]


def run_case(lens: np.ndarray, ebs: int, budget: int, replicas: int, seed: int, max_len: int) -> dict:
    t = time.perf_counter()
    plan = plan_epoch(lens, ebs, budget, replicas, seed, 0)
    plan_s = time.perf_counter() - t
    t = time.perf_counter()
    padded = padded_plan_epoch(lens, ebs, budget, replicas, seed, 0)
    padded_plan_s = time.perf_counter() - t

    eff = np.array([packing_efficiency(s, lens, budget) for s in plan])
    tokens = np.array([sum(int(lens[i]) for r in s for mb in r for i in mb) for s in plan])
    fewest = -(-tokens // (replicas * budget))
    bound = tokens / (fewest * replicas * budget)
    mbs = np.array([len(s[0]) for s in plan])
    real_mbs = [mb for s in plan for r in s for mb in r if mb]
    per_mb = max(1, budget // max_len)
    naive = fixed_padded(lens, ebs, per_mb, seed)
    padded_mbs = [mb for s in padded for r in s for mb in r]
    return {
        "effective_batch_size": ebs, "max_tokens_per_device": budget, "replicas": replicas,
        "steps": len(plan),
        "packing_efficiency": float(eff.mean()),
        "packing_efficiency_full_steps": float(eff[:-1].mean()) if len(eff) > 1 else float(eff.mean()),
        "efficiency_bound": float(bound.mean()),
        "micro_batches_per_rank": float(mbs.mean()),
        "extra_micro_batches_per_rank": float((mbs - fewest).mean()),
        "empty_micro_batches": int(sum(1 for s in plan for r in s for mb in r if not mb)),
        "samples_per_micro_batch": float(np.mean([len(mb) for mb in real_mbs])),
        "rank_token_imbalance": float(np.mean([
            (max(loads) - min(loads)) / max(loads) for s in plan
            for loads in [[sum(int(lens[i]) for mb in r for i in mb) for r in s]]])),
        "fixed_padded_samples_per_micro_batch": per_mb,
        "fixed_padded_micro_batches_per_rank": float(np.mean([
            -(-min(ebs, len(lens) - i) // (per_mb * replicas)) for i in range(0, len(lens), ebs)])),
        "fixed_padded_padding_fraction": padding_fraction(naive, lens),
        "padded_plan_micro_batches_per_rank": float(np.mean([len(s[0]) for s in padded])),
        "padded_plan_samples_per_micro_batch": float(np.mean([len(mb) for mb in padded_mbs if mb])),
        "padded_plan_padding_fraction": padding_fraction(padded_mbs, lens),
        "plan_seconds": plan_s,
        "padded_plan_seconds": padded_plan_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-len", type=int, default=50)
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--mu", type=float, default=6.3, help="lognormal mu (median length = e^mu)")
    ap.add_argument("--sigma", type=float, default=0.9)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 3840])
    ap.add_argument("--budgets", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "packing.json")
    args = ap.parse_args()

    lens = lengths(args.samples, args.seed, args.min_len, args.max_len, args.mu, args.sigma)
    cases = [run_case(lens, ebs, budget, r, args.seed, args.max_len)
             for ebs in args.batch_sizes for budget in args.budgets for r in args.replicas]
    result = {
        "lengths": {"samples": len(lens), "seed": args.seed, "distribution": "lognormal, clipped",
                    "mu": args.mu, "sigma": args.sigma, "min": args.min_len, "max": args.max_len,
                    "mean": float(lens.mean()), "median": float(np.median(lens))},
        "machine": platform.platform(), "python": platform.python_version(),
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    print(f"{len(lens)} samples, mean length {lens.mean():.0f}, median {np.median(lens):.0f}")
    head = f"{'batch':>6} {'budget':>6} {'ranks':>5} | {'eff':>6} {'bound':>6} {'mb/rank':>7} {'extra':>5} " \
           f"{'smp/mb':>6} | {'fixed':>5} {'pad%':>5} | {'sorted':>6} {'pad%':>5} | {'plan s':>6}"
    print(head)
    print("-" * len(head))
    for c in cases:
        print(f"{c['effective_batch_size']:>6} {c['max_tokens_per_device']:>6} {c['replicas']:>5} | "
              f"{c['packing_efficiency']:>6.1%} {c['efficiency_bound']:>6.1%} {c['micro_batches_per_rank']:>7.1f} "
              f"{c['extra_micro_batches_per_rank']:>5.2f} {c['samples_per_micro_batch']:>6.1f} | "
              f"{c['fixed_padded_samples_per_micro_batch']:>5} {c['fixed_padded_padding_fraction']:>5.0%} | "
              f"{c['padded_plan_samples_per_micro_batch']:>6.1f} {c['padded_plan_padding_fraction']:>5.0%} | "
              f"{c['plan_seconds']:>6.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
