"""Learning-rate schedules: constant, cosine and linear decay, each with optional linear warmup.

One pure function, `lr_at`, serves the trainer (through a LambdaLR) and the notebooks'
schedule previews, so a preview is exactly what the run will do.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from labkit.config import RunConfig


def warmup_steps(cfg: RunConfig, total_steps: int) -> int:
    if cfg.warmup_steps:
        return min(cfg.warmup_steps, total_steps)
    return int(round(cfg.warmup_ratio * total_steps))


def lr_factor(step: int, total_steps: int, schedule: str, warmup: int, min_ratio: float = 0.0) -> float:
    """Multiplier on the peak LR for 0-based optimizer `step` of `total_steps`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    if schedule == "linear":
        shape = 1.0 - progress
    elif schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return min_ratio + (1.0 - min_ratio) * shape


def lr_at(step: int, total_steps: int, cfg: RunConfig) -> float:
    return cfg.learning_rate * lr_factor(
        step, total_steps, cfg.schedule, warmup_steps(cfg, total_steps), cfg.min_lr_ratio
    )


def estimate_total_steps(cfg: RunConfig) -> int:
    """Optimizer steps a run will take, from catalog sample counts (no tokenization needed).

    Each phase's epoch is ceil(samples / effective batch) steps; samples dropped as overlong
    at tokenization make the real number slightly smaller.
    """
    from labkit import catalog

    total = 0
    for phase in cfg.training_phases():
        n = 0
        for ds in phase.datasets:
            card = catalog.resolve(ds)
            n += card.samples if card.samples is not None else sum(1 for _ in card.path.open())
        total += phase.epochs * max(1, math.ceil(n / cfg.effective_batch_size))
    return min(total, cfg.max_steps) if cfg.max_steps else total

