"""Multipack bucketing: exact effective batches, packed under a per-device token budget.

An epoch is cut into optimizer steps of exactly `effective_batch_size` samples (the last may be
smaller: no sample is dropped), drawn at random with (seed, epoch). The step's sample set does not
depend on the number of ranks, so 1 and N processes train on the same batches, and a run resumes
at another world size on the same plan. Packing only decides how a step's samples split over
ranks and micro-batches.

Steps are stratified random samples by length: the samples are sorted by length and cut into
`effective_batch_size` strata of equal size, and step s takes the s-th sample of every stratum
after each stratum is shuffled (the samples left over by a partial last step are a random draw).
Each step is still a random draw of the epoch, but step token totals barely vary. That matters
because a step costs whole micro-batches on every rank: with plainly shuffled steps the token total
of a step spreads by about cv / sqrt(batch) (cv ~ 1 for chat data: +-9% at batch 128), and the
steps that land just above a multiple of ranks x budget pay one more micro-batch on every rank,
which a planner whose steps need not be exact (instructlab's multipack) never pays.

Every rank must run the same number M of micro-batches in a step (or DDP/FSDP hangs), so a step
has K = M * ranks micro-batch slots. The step is packed straight into K slots, for the smallest M
that fits, starting from the bound no packing can beat (ceil(step tokens / (ranks * budget))):

- longest sample first onto the least-loaded slot (LPT): balances tokens over slots and ranks;
- if that overflows the budget, first-fit-decreasing into the K slots (denser: fills slot after
  slot, so it fits where LPT's even spread leaves no room for a long sample);
- if neither fits, M + 1.

Then the K slots are dealt to ranks, heaviest first to the least-loaded rank with fewer than M,
and slots left empty (fewer samples than slots) become dummy rows without loss in the collator.

labkit's previous planner (plainly shuffled steps, packed into as many micro-batches B as needed,
then ceil(B / ranks) per rank) needed up to 8% more micro-batches than instructlab 0.6.1's
multipack on bench/packing.py's 825k-sample grid (+8.2% at median 1,000, batch 128, 60k tokens,
1 rank; +7.9% at batch 3,840, 16k, 64 ranks); this one needs fewer on every cell of it.
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


def _steps(lengths: np.ndarray, effective_batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The epoch's steps: random and exact, with token totals that barely vary (see the docstring)."""
    n, b = len(lengths), effective_batch_size
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    full = n // b
    rest, body = order[: n - full * b], order[n - full * b :]
    # Stratified by length: sort (ties stay in random order), cut into b strata of `full` samples,
    # shuffle each stratum; step s takes the s-th sample of every stratum.
    strata = body[np.argsort(lengths[body], kind="stable")].reshape(b, full)
    strata = rng.permuted(strata, axis=1)
    steps = [strata[:, s] for s in range(full)]
    return steps + ([rest] if len(rest) else [])


def _ffd(items: list[int], lens: list[int], budget: int, k: int) -> list[list[int]] | None:
    """First-fit-decreasing into `k` micro-batches; None if some sample fits in none.

    `items` are sorted longest first. The first-fit search is a numpy scan over the rooms (one
    call per sample): steps of thousands of samples over hundreds of slots stay fast.
    """
    room = np.full(k, budget, dtype=np.int64)
    bins: list[list[int]] = [[] for _ in range(k)]
    for i in items:
        n = lens[i]
        b = int(np.argmax(room >= n))
        if room[b] < n:
            return None
        bins[b].append(i)
        room[b] -= n
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
    per_rank = max(1, -(-int(lens_np[step].sum()) // (budget * num_replicas)))
    while True:  # ends: with one slot per sample everything fits (_check: no sample exceeds the budget)
        k = per_rank * num_replicas
        bins = _lpt(items, lens, budget, k) or _ffd(items, lens, budget, k)
        if bins is not None:
            return _deal(bins, lens, num_replicas)
        per_rank += 1


def steps_in_epoch(n_samples: int, effective_batch_size: int) -> int:
    """Optimizer steps of one epoch, without planning it: every step but the last is exact."""
    if effective_batch_size < 1:
        raise ValueError(f"effective_batch_size must be at least 1, got {effective_batch_size}")
    return -(-int(n_samples) // int(effective_batch_size))


def plan_epoch(lengths: Sequence[int], effective_batch_size: int, max_tokens_per_device: int,
               num_replicas: int, seed: int, epoch: int) -> list[Step]:
    """Optimizer steps of one epoch, each `[rank][micro_batch] -> sample indices`."""
    lens_np = np.asarray(lengths, dtype=np.int64)
    _check(lens_np, effective_batch_size, max_tokens_per_device, num_replicas)
    lens = lens_np.tolist()
    return [_pack_step(step, lens_np, lens, max_tokens_per_device, num_replicas)
            for step in _steps(lens_np, effective_batch_size, seed, epoch)]


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
    for step in _steps(lens_np, effective_batch_size, seed, epoch):
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
