"""Multipack bucketing: exact effective batches, packed under a per-device token budget.

An epoch is shuffled with (seed, epoch) and cut into optimizer steps of exactly
`effective_batch_size` samples (the last may be smaller: no sample is dropped). Packing only
decides how a step's samples split over ranks and micro-batches:
- ranks get samples by LPT (longest first, to the least-loaded rank), balancing tokens;
- each rank packs its samples first-fit-decreasing into micro-batches of at most
  `max_tokens_per_device` tokens;
- every rank gets the same number of micro-batches (short ranks get empty ones, which the
  collator turns into a dummy row without loss), or DDP/FSDP would hang.
The step's sample set does not depend on the number of ranks, so 1 and N processes train on
the same batches.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

Step = list[list[list[int]]]  # [rank][micro_batch] -> sample indices


def _check_budget(lengths: np.ndarray, budget: int) -> None:
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


def _lpt(indices: np.ndarray, lengths: np.ndarray, ranks: int) -> list[list[int]]:
    heap = [(0, r) for r in range(ranks)]
    out: list[list[int]] = [[] for _ in range(ranks)]
    for i in sorted(indices.tolist(), key=lambda i: -lengths[i]):
        load, r = heapq.heappop(heap)
        out[r].append(i)
        heapq.heappush(heap, (load + int(lengths[i]), r))
    return out


def _ffd(indices: list[int], lengths: np.ndarray, budget: int) -> list[list[int]]:
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(indices, key=lambda i: -lengths[i]):
        n = int(lengths[i])
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(budget - n)
    return bins


def _equalize(per_rank: list[list[list[int]]]) -> Step:
    most = max(len(r) for r in per_rank)
    return [r + [[] for _ in range(most - len(r))] for r in per_rank]


def plan_epoch(lengths: Sequence[int], effective_batch_size: int, max_tokens_per_device: int,
               num_replicas: int, seed: int, epoch: int) -> list[Step]:
    """Optimizer steps of one epoch, each `[rank][micro_batch] -> sample indices`."""
    lens = np.asarray(lengths, dtype=np.int64)
    _check_budget(lens, max_tokens_per_device)
    return [
        _equalize([_ffd(r, lens, max_tokens_per_device) for r in _lpt(step, lens, num_replicas)])
        for step in _steps(len(lens), effective_batch_size, seed, epoch)
    ]


def padded_plan_epoch(lengths: Sequence[int], effective_batch_size: int, max_tokens_per_device: int,
                      num_replicas: int, seed: int, epoch: int) -> list[Step]:
    """The `packing: false` plan: padded micro-batches whose rows × longest row fit the budget."""
    lens = np.asarray(lengths, dtype=np.int64)
    _check_budget(lens, max_tokens_per_device)
    plan = []
    for step in _steps(len(lens), effective_batch_size, seed, epoch):
        per_rank = []
        for r in range(num_replicas):
            mine, mbs, cur = step[r::num_replicas].tolist(), [], []
            for i in mine:
                if cur and (len(cur) + 1) * max(int(lens[j]) for j in [*cur, i]) > max_tokens_per_device:
                    mbs.append(cur)
                    cur = []
                cur.append(i)
            if cur:
                mbs.append(cur)
            per_rank.append(mbs)
        plan.append(_equalize(per_rank))
    return plan


def packing_efficiency(step: Step, lengths: Sequence[int], max_tokens_per_device: int) -> float:
    """Real tokens / token budget of all micro-batches of the step on all ranks."""
    real = sum(int(lengths[i]) for rank in step for mb in rank for i in mb)
    slots = len(step) * len(step[0]) * max_tokens_per_device
    return real / slots if slots else 0.0
