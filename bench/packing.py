"""Packing benchmark: labkit's multipack against instructlab 0.6.1's, micro-batches per optimizer step.

Grid: lognormal lengths (median 400 and 1,000 tokens, sigma 0.9, clipped to [50, 4096]) x
effective batch x token budget per device x ranks. For each cell it plans one epoch with labkit and
counts what instructlab-training 0.6.1 needs for the same data:

- labkit (`labkit.data.multipack.plan_epoch`): exactly `effective_batch_size` samples per step,
  M micro-batches on every rank; compared as the mean M over the epoch's full steps (the partial
  last step left out, as instructlab drops its tail);
- labkit's previous planner (first-fit-decreasing into as many micro-batches B as needed, then
  ceil(B / ranks) per rank), counted here for comparison;
- instructlab 0.6.1, re-derived from its sampler (not imported, it needs numba and CUDA): it
  picks the smallest gradient accumulation G whose per-rank capacity
  C = int(mean length * effective batch / (G * ranks)) fits the token budget (or, when C would be
  shorter than the longest sample, gives up on multipack and takes `effective batch // ranks`
  samples per rank in one padded micro-batch). It then walks the shuffled samples and, for each
  group of one micro-batch per rank, takes the longest run of next samples that first-fit-
  decreasing fits into `ranks` bins of C tokens (found by its bisection), stopping at the first
  group that fills fewer than `ranks` bins (the rest of the epoch is dropped). An optimizer step
  is every G micro-batches, so its steps hold about, not exactly, `effective_batch_size` samples:
  micro-batches per `effective_batch_size` samples is G / its packing efficiency, the fair count.

`ok` in a cell: labkit's micro-batches per rank per effective batch <= instructlab's.

    .venv/bin/python bench/packing.py            # full grid, 825,487 samples: bench/results/packing.json
    .venv/bin/python bench/packing.py --quick    # a small grid in seconds
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/results.py, however this file is loaded
import results as bench_results  # noqa: E402

from labkit.data.multipack import packing_efficiency, plan_epoch  # noqa: E402


def lengths(n: int, seed: int, median: float, sigma: float = 0.9, lo: int = 50, hi: int = 4096) -> np.ndarray:
    return np.clip(np.random.default_rng(seed).lognormal(math.log(median), sigma, n), lo, hi).astype(np.int64)


# -- instructlab 0.6.1, counted ------------------------------------------------------------------
# The walk below runs ~10 first-fit checks per group of one micro-batch per rank; in Python that is
# minutes per 64-rank cell at 825k samples (instructlab itself compiles it with numba). The same
# walk in C, compiled on first use when a C compiler is there, takes a second; the Python version is
# the reference (tests check both give the same counts).

_C_SOURCE = r"""
#include <stdlib.h>
static int desc(const void *a, const void *b) {
    long x = *(const long *)a, y = *(const long *)b;
    return (x < y) - (x > y);
}
long first_fit_bins(const long *sizes, long m, long cap, long bins, long *room) {
    long used = 0;
    if (m == 0) return 0;
    for (long j = 0; j < bins; j++) room[j] = cap;
    for (long i = 0; i < m; i++) {
        long j = 0;
        while (j < bins && room[j] < sizes[i]) j++;
        if (j == bins) return -1;
        room[j] -= sizes[i];
        if (j + 1 > used) used = j + 1;
    }
    return used;
}
static long sorted_fit(const long *run, long start, long m, long cap, long bins, long *buf, long *room) {
    for (long i = 0; i < m; i++) buf[i] = run[start + i];
    qsort(buf, m, sizeof(long), desc);
    return first_fit_bins(buf, m, cap, bins, room);
}
long walk(const long *run, const long *cum, long len, long cap, long bins, long *samples_used) {
    long *buf = malloc(sizeof(long) * (len + 1)), *room = malloc(sizeof(long) * bins);
    long start = 0, before = 0, groups = 0;
    for (;;) {
        long target = before + cap * bins, a = start, b = len;
        while (a < b) { long c = (a + b) / 2; if (cum[c] <= target) a = c + 1; else b = c; }
        long lo = 1, hi = 1 + (a - start), rest = len - start;
        while (hi - lo > 1) {
            long mid = (lo + hi) / 2;
            if (sorted_fit(run, start, mid < rest ? mid : rest, cap, bins, buf, room) > 0) lo = mid; else hi = mid;
        }
        if (sorted_fit(run, start, lo < rest ? lo : rest, cap, bins, buf, room) < bins) break;
        start += lo;
        before = cum[start - 1];
        groups++;
    }
    free(buf);
    free(room);
    *samples_used = start;
    return groups;
}
"""
_c_lib = None


def _compiled():
    """The C walk as a ctypes library, or None without a C compiler."""
    global _c_lib
    if _c_lib is None:
        import ctypes
        import hashlib
        import shutil
        import subprocess
        import tempfile

        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            _c_lib = False
            return None
        so = Path(tempfile.gettempdir()) / f"labkit-ilab-walk-{hashlib.sha256(_C_SOURCE.encode()).hexdigest()[:12]}.so"
        if not so.exists():
            src = so.with_suffix(".c")
            src.write_text(_C_SOURCE)
            tmp = so.with_suffix(f".{os.getpid()}.tmp")
            if subprocess.run([cc, "-O2", "-shared", "-fPIC", str(src), "-o", str(tmp)]).returncode:
                _c_lib = False
                return None
            os.replace(tmp, so)
        lib = ctypes.CDLL(str(so))
        p = ctypes.POINTER(ctypes.c_long)
        lib.walk.argtypes = [p, p, ctypes.c_long, ctypes.c_long, ctypes.c_long, p]
        lib.walk.restype = ctypes.c_long
        lib.first_fit_bins.argtypes = [p, ctypes.c_long, ctypes.c_long, ctypes.c_long, p]
        lib.first_fit_bins.restype = ctypes.c_long
        _c_lib = lib
    return _c_lib or None


def _ptr(a: np.ndarray):
    import ctypes

    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_long))


def _first_fit_bins(sizes_desc: np.ndarray, capacity: int, bins: int, use_c: bool = True) -> int:
    """Bins first-fit uses for sizes (longest first) in `bins` bins of `capacity`; -1 if they do not fit."""
    if not len(sizes_desc):
        return 0
    if bins == 1:
        return 1 if int(sizes_desc.sum()) <= capacity else -1
    if use_c and (lib := _compiled()) is not None:
        sizes = np.ascontiguousarray(sizes_desc, dtype=np.int64)
        return int(lib.first_fit_bins(_ptr(sizes), len(sizes), capacity, bins, _ptr(np.empty(bins, np.int64))))
    room = np.full(bins, capacity, dtype=np.int64)
    used = 0
    for s in sizes_desc.tolist():
        b = int(np.argmax(room >= s))
        if room[b] < s:
            return -1
        room[b] -= s
        used = max(used, b + 1)  # first fit opens bins in order: the used ones are a prefix
    return used


def _walk_python(run: np.ndarray, cum: np.ndarray, capacity: int, ranks: int) -> tuple[int, int]:
    start, before, groups = 0, 0, 0
    while True:
        lo, hi = 1, 1 + int(np.searchsorted(cum[start:], before + capacity * ranks, "right"))
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if _first_fit_bins(np.sort(run[start : start + mid])[::-1], capacity, ranks, use_c=False) > 0:
                lo = mid
            else:
                hi = mid
        if _first_fit_bins(np.sort(run[start : start + lo])[::-1], capacity, ranks, use_c=False) < ranks:
            break  # a group that fills fewer bins than ranks ends the epoch
        start += lo
        before = int(cum[start - 1])
        groups += 1
    return groups, start


def _walk(run: np.ndarray, cum: np.ndarray, capacity: int, ranks: int, use_c: bool = True) -> tuple[int, int]:
    """instructlab's walk over the shuffled lengths: (groups, samples they hold)."""
    lib = _compiled() if use_c else None
    if lib is None:
        return _walk_python(run, cum, capacity, ranks)
    import ctypes

    run, cum = np.ascontiguousarray(run, dtype=np.int64), np.ascontiguousarray(cum, dtype=np.int64)
    used = ctypes.c_long(0)
    groups = lib.walk(_ptr(run), _ptr(cum), len(run), capacity, ranks, ctypes.byref(used))
    return int(groups), int(used.value)


def instructlab_count(lens: np.ndarray, ebs: int, budget: int, ranks: int, seed: int, epoch: int = 0,
                      use_c: bool = True) -> dict:
    mean, longest = float(lens.mean()), int(lens.max())
    accum, capacity = 0, budget + 1
    while capacity > budget:
        accum += 1
        capacity = int(mean * ebs / accum / ranks)
        if capacity < longest:  # instructlab falls back to plain distributed sampling, one micro-batch
            per_rank = max(1, ebs // ranks)
            steps = -(-len(lens) // (per_rank * ranks))
            return {"fallback": True, "grad_accum": 1, "capacity": None, "micro_batches_per_rank": steps,
                    "samples_used": len(lens), "micro_batches_per_step": 1,
                    "micro_batches_per_effective_batch": steps * ebs / len(lens)}
    order = np.random.default_rng(seed + epoch).permutation(len(lens))
    order = order[lens[order] <= capacity]
    run = lens[order]
    groups, start = _walk(run, np.cumsum(run), capacity, ranks, use_c)
    return {"fallback": False, "grad_accum": accum, "capacity": capacity, "micro_batches_per_rank": groups,
            "samples_used": start, "micro_batches_per_step": accum,
            "micro_batches_per_effective_batch": groups * ebs / start if start else float("nan"),
            "packing_efficiency": int(run[:start].sum()) / (groups * ranks * capacity) if groups else 0.0}


# -- labkit --------------------------------------------------------------------------------------

def previous_per_rank(step_lens: np.ndarray, budget: int, ranks: int) -> int:
    """labkit's previous planner: FFD into as many bins as needed, then ceil(bins / ranks) per rank."""
    sizes = np.sort(step_lens)[::-1]
    return -(-_first_fit_bins(sizes, budget, len(sizes)) // ranks)


def run_cell(lens: np.ndarray, ebs: int, budget: int, ranks: int, seed: int, previous: bool,
             use_c: bool = True) -> dict:
    t = time.perf_counter()
    plan = plan_epoch(lens, ebs, budget, ranks, seed, 0)
    plan_s = time.perf_counter() - t
    per_step = np.array([len(s[0]) for s in plan])
    sizes = np.array([sum(len(mb) for r in s for mb in r) for s in plan])
    assert (sizes[:-1] == ebs).all() and all(len({len(r) for r in s}) == 1 for s in plan)
    assert all(sum(int(lens[i]) for i in mb) <= budget for s in plan for r in s for mb in r)
    tokens = np.array([sum(int(lens[i]) for r in s for mb in r for i in mb) for s in plan])
    bound = -(-tokens // (ranks * budget))
    t = time.perf_counter()
    il = instructlab_count(lens, ebs, budget, ranks, seed, use_c=use_c)
    il_s = time.perf_counter() - t
    # Over the full steps (exactly `ebs` samples each); the partial last step, like instructlab's
    # dropped tail, is left out of the comparison.
    full = per_step[:-1] if len(plan) > 1 and sizes[-1] < ebs else per_step
    lk_per_ebs = float(full.mean())
    cell = {
        "effective_batch_size": ebs, "max_tokens_per_device": budget, "ranks": ranks, "steps": len(plan),
        "labkit_micro_batches_per_step": float(per_step.mean()),
        "labkit_micro_batches_per_step_max": int(per_step.max()),
        "labkit_micro_batches_per_effective_batch": lk_per_ebs,
        "labkit_over_bound": float((per_step - bound).mean()),
        "labkit_packing_efficiency": float(np.mean([packing_efficiency(s, lens, budget) for s in plan])),
        "labkit_plan_seconds": plan_s,
        "instructlab": il, "instructlab_count_seconds": il_s,
        "ok": lk_per_ebs <= il["micro_batches_per_effective_batch"] + 1e-9,
        "labkit_vs_instructlab": lk_per_ebs / il["micro_batches_per_effective_batch"] - 1,
    }
    if previous:
        order = np.random.default_rng([seed, 0]).permutation(len(lens))
        prev = np.array([previous_per_rank(lens[order[i : i + ebs]], budget, ranks)
                         for i in range(0, len(lens) - ebs + 1, ebs)])
        cell["previous_micro_batches_per_effective_batch"] = float(prev.mean())
        cell["previous_vs_instructlab"] = (cell["previous_micro_batches_per_effective_batch"]
                                           / il["micro_batches_per_effective_batch"] - 1)
    return cell


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=825_487, help="the paper's stacked set size")
    ap.add_argument("--medians", type=float, nargs="+", default=[400, 1000])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 3840, 7680])
    ap.add_argument("--budgets", type=int, nargs="+", default=[16384, 60000])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--previous", action="store_true", help="also count labkit's previous planner (slow)")
    ap.add_argument("--quick", action="store_true", help="20,000 samples, a 2x2x2x2 grid")
    ap.add_argument("--python", action="store_true", help="count instructlab's walk in Python, not C")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "packing.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.budgets, args.ranks = [128, 3840], [16384, 60000], [1, 8]
        args.samples = min(args.samples, 20_000)

    cells = []
    head = (f"{'median':>6} {'batch':>5} {'budget':>6} {'ranks':>5} | {'labkit':>7} {'max':>4} {'eff':>6} | "
            f"{'ilab':>7} {'G':>3} {'eff':>6} | {'diff':>7} {'prev':>7} | {'plan s':>6}")
    print(head)
    print("-" * len(head))
    for median in args.medians:
        lens = lengths(args.samples, args.seed, median)
        for ebs in args.batch_sizes:
            for budget in args.budgets:
                for ranks in args.ranks:
                    c = {"median": median, "mean_length": float(lens.mean()),
                         **run_cell(lens, ebs, budget, ranks, args.seed, args.previous, not args.python)}
                    cells.append(c)
                    il = c["instructlab"]
                    prev = f"{c['previous_vs_instructlab']:>+7.1%}" if args.previous else f"{'':>7}"
                    print(f"{median:>6.0f} {ebs:>5} {budget:>6} {ranks:>5} | "
                          f"{c['labkit_micro_batches_per_effective_batch']:>7.3f} "
                          f"{c['labkit_micro_batches_per_step_max']:>4} {c['labkit_packing_efficiency']:>6.1%} | "
                          f"{il['micro_batches_per_effective_batch']:>7.3f} {il['grad_accum']:>3} "
                          f"{il.get('packing_efficiency', float('nan')):>6.1%} | "
                          f"{c['labkit_vs_instructlab']:>+7.1%} {prev} | {c['labkit_plan_seconds']:>6.2f}",
                          flush=True)
    result = {"samples": args.samples, "instructlab_walk": "python" if args.python or _compiled() is None else "c", "distribution": "lognormal sigma 0.9, clipped to [50, 4096]",
              "seed": args.seed, **bench_results.machine(),
              "all_ok": all(c["ok"] for c in cells), "cells": cells}
    bench_results.write(args.out, result)
    print(f"all cells within instructlab's micro-batches: {result['all_ok']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
