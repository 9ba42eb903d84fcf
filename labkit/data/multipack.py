"""Multipack bucketing: exact effective batches, packed under a per-device token budget.

An epoch is shuffled with (seed, epoch) and cut into optimizer steps of exactly
`effective_batch_size` samples (the last may be smaller: no sample is dropped). The step's
sample set does not depend on the number of ranks, so 1 and N processes train on the same
batches. Packing only decides how a step's samples split over ranks and micro-batches:

- pack the step first-fit-decreasing into B micro-batches of at most `max_tokens_per_device`
  tokens; every rank must run the same number of micro-batches (or DDP/FSDP hangs), so the step
  needs M = ceil(B / ranks) per rank and K = M * ranks micro-batches in all;
- spread the samples over those K micro-batches longest-first onto the least-loaded one (LPT),
  which balances tokens and leaves no micro-batch empty when there are at least K samples; if
  that does not fit the budget, keep the first-fit packing and add K - B empty micro-batches
  (the collator turns them into dummy rows without loss);
- deal the K micro-batches to ranks, heaviest first to the least-loaded rank with fewer than M.

Packing the whole step before splitting it over ranks needs fewer micro-batches than packing
each rank's share separately: one rank whose share is slightly over a multiple of the budget
would otherwise force an extra, mostly empty micro-batch onto every rank.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

Step = list[list[list[int]]]  # [rank][micro_batch] -> sample indices


def _check(lengths: np.ndarray, effective_batch_size: int, budget: int, num_replicas: int) -> None:
    for name, value in (("effective_batch_size", effective_batch_size), ("max_tokens_per_device", budget),
                        ("num_replicas", num_replicas)):
        if int(value) < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if lengths.size and lengths.min() < 1:
        i = int(np.argmin(lengths))
        raise ValueError(f"sample {i} has length {int(lengths[i])}: every sample needs at least one token")
    too_long = np.flatnonzero(lengths > budget)
    if too_long.size:
        i = int(too_long[np.argmax(lengths[too_long])])
        raise ValueError(
            f"sample {i} has {int(lengths[i])} tokens, more than max_tokens_per_device={budget} "
            f"({too_long.size} sample(s) too long): raise max_tokens_per_device to at least "
            f"{int(lengths.max())}, or lower max_seq_len (with overlong: drop or truncate)"
        )


def _steps(n: int, effective_batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return [order[i : i + effective_batch_size] for i in range(0, n, effective_batch_size)]


def _ffd(items: list[int], lens: list[int], budget: int) -> list[list[int]]:
    """First-fit-decreasing; `items` are sorted longest first."""
    bins: list[list[int]] = []
    room: list[int] = []
    smallest, lo = lens[items[-1]], 0
    for i in items:
        n = lens[i]
        while lo < len(room) and room[lo] < smallest:  # bins nothing fits in any more: skip for good
            lo += 1
        for b in range(lo, len(room)):
            if n <= room[b]:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(budget - n)
    return bins


def _lpt(items: list[int], lens: list[int], budget: int, k: int) -> list[list[int]] | None:
    """Longest first onto the least-loaded of `k` micro-batches; None if one would exceed the budget."""
    heap = [(0, b) for b in range(k)]
    bins: list[list[int]] = [[] for _ in range(k)]
    for i in items:
        load, b = heap[0]
        if load + lens[i] > budget:
            return None
        bins[b].append(i)
        heapq.heapreplace(heap, (load + lens[i], b))
    return bins


def _deal(bins: list[list[int]], lens: list[int], num_replicas: int) -> Step:
    """`bins` (a multiple of num_replicas of them) to ranks, the same count each, balancing tokens."""
    per_rank = len(bins) // num_replicas
    loads = sorted(((sum(lens[i] for i in mb), mb) for mb in bins), key=lambda x: -x[0])
    heap = [(0, r) for r in range(num_replicas)]
    out: Step = [[] for _ in range(num_replicas)]
    for load, mb in loads:
        total, r = heapq.heappop(heap)
        out[r].append(mb)
        if len(out[r]) < per_rank:
            heapq.heappush(heap, (total + load, r))
    return out


def _pack_step(step: np.ndarray, lens_np: np.ndarray, lens: list[int], budget: int, num_replicas: int) -> Step:
    items = step[np.argsort(-lens_np[step], kind="stable")].tolist()
    bins = _ffd(items, lens, budget)
    k = -(-len(bins) // num_replicas) * num_replicas
    balanced = _lpt(items, lens, budget, k)
    if balanced is None:
        balanced = bins + [[] for _ in range(k - len(bins))]
    return _deal(balanced, lens, num_replicas)


def plan_epoch(lengths: Sequence[int], effective_batch_size: int, max_tokens_per_device: int,
               num_replicas: int, seed: int, epoch: int) -> list[Step]:
    """Optimizer steps of one epoch, each `[rank][micro_batch] -> sample indices`."""
    lens_np = np.asarray(lengths, dtype=np.int64)
    _check(lens_np, effective_batch_size, max_tokens_per_device, num_replicas)
    lens = lens_np.tolist()
    return [_pack_step(step, lens_np, lens, max_tokens_per_device, num_replicas)
            for step in _steps(len(lens), effective_batch_size, seed, epoch)]


def padded_plan_epoch(lengths: Sequence[int], effective_batch_size: int, max_tokens_per_device: int,
                      num_replicas: int, seed: int, epoch: int) -> list[Step]:
    """The `packing: false` plan: padded micro-batches whose rows × longest row fit the budget.

    Samples of a step are grouped by length (so little is padding), then the micro-batches are
    dealt to ranks, the same count each.
    """
    lens_np = np.asarray(lengths, dtype=np.int64)
    _check(lens_np, effective_batch_size, max_tokens_per_device, num_replicas)
    lens = lens_np.tolist()
    plan = []
    for step in _steps(len(lens), effective_batch_size, seed, epoch):
        groups: list[list[int]] = []
        for i in step[np.argsort(-lens_np[step], kind="stable")].tolist():
            # Longest first: the group's first sample sets its row width.
            if groups and (len(groups[-1]) + 1) * lens[groups[-1][0]] <= max_tokens_per_device:
                groups[-1].append(i)
            else:
                groups.append([i])
        k = -(-len(groups) // num_replicas) * num_replicas
        plan.append(_deal(groups + [[] for _ in range(k - len(groups))], lens, num_replicas))
    return plan


def packing_efficiency(step: Step, lengths: Sequence[int], max_tokens_per_device: int) -> float:
    """Real tokens / token budget of all micro-batches of the step on all ranks."""
    real = sum(int(lengths[i]) for rank in step for mb in rank for i in mb)
    slots = len(step) * len(step[0]) * max_tokens_per_device if step else 0
    return real / slots if slots else 0.0
