"""Learning-rate schedules: constant, cosine and linear decay, each with optional linear warmup.

`run_schedule(cfg, phase_sizes)` is the LR of every optimizer step of a whole run, and the one
place that decides it: the trainer's LambdaLR (`RunSchedule.factor`) and the notebooks' previews
(`RunSchedule.lr`) both read it, so a preview is exactly what the run will do.

How a run's steps are laid out:
- a phase's epoch is ceil(samples / effective_batch_size) optimizer steps (the last one short);
- each phase restarts the schedule (fresh optimizer, warmup again), as phased training does;
- `max_steps` cuts the run: a phase it cuts decays over the steps it will actually run, so a
  cosine run stopped by max_steps still ends at `min_lr_ratio`, and phases after the cut do not
  run at all. Warmup (`warmup_ratio`) is likewise a fraction of the steps a phase runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from labkit.data import multipack

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
    """LR of one single-phase schedule of `total_steps`; a whole run's is `run_schedule(cfg).lr(step)`."""
    return cfg.learning_rate * lr_factor(
        step, total_steps, cfg.schedule, warmup_steps(cfg, total_steps), cfg.min_lr_ratio
    )


def phase_sizes(cfg: RunConfig) -> list[int]:
    """Samples of each training phase, from the catalog cards' counts (or a count of the file's lines).

    The trainer knows the exact numbers only after tokenizing (overlong samples may be dropped);
    it passes those to `run_schedule` instead.
    """
    from labkit import catalog

    counts: dict[str, int] = {}
    sizes = []
    for phase in cfg.training_phases():
        n = 0
        for ds in phase.datasets:
            if ds not in counts:
                card = catalog.resolve(ds)
                counts[ds] = card.samples if card.samples is not None else _count_samples(card)
            n += counts[ds]
        sizes.append(n)
    return sizes


def _count_samples(card) -> int:
    # A JSONL file is one record a line (counted without parsing); any other container (parquet, csv,
    # a save_to_disk dir) is read through the converter.
    path = Path(card.path)
    if path.is_file() and path.suffix == ".jsonl":
        with path.open("rb") as fh:
            return sum(1 for line in fh if line.strip())
    from labkit.data import formats

    return len(formats.read(card, on_error="skip")[0])


def phase_steps(cfg: RunConfig, sizes: Sequence[int]) -> list[int]:
    """Optimizer steps each phase runs (its schedule length), after `max_steps` cuts the run."""
    left = cfg.max_steps if cfg.max_steps else math.inf
    out = []
    for phase, n in zip(cfg.training_phases(), sizes, strict=True):
        steps = int(min(phase.epochs * multipack.steps_in_epoch(n, cfg.effective_batch_size), left))
        out.append(steps)
        left -= steps
    return out


@dataclass(frozen=True)
class RunSchedule:
    """The LR of every optimizer step of a run: one decaying schedule per phase, back to back."""

    learning_rate: float
    schedule: str
    min_lr_ratio: float
    phase_steps: tuple[int, ...]  # steps each phase runs
    warmup: tuple[int, ...]  # warmup steps of each phase

    @property
    def total_steps(self) -> int:
        return sum(self.phase_steps)

    def factor(self, phase: int, step: int) -> float:
        """Multiplier on the peak LR at 0-based `step` within `phase` (for a LambdaLR of that phase)."""
        return lr_factor(step, self.phase_steps[phase], self.schedule, self.warmup[phase], self.min_lr_ratio)

    def locate(self, step: int) -> tuple[int, int]:
        """(phase, step within the phase) of the run's 0-based optimizer `step`."""
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} is outside the run's {self.total_steps} steps")
        for phase, n in enumerate(self.phase_steps):
            if step < n:
                return phase, step
            step -= n
        raise AssertionError("unreachable")

    def lr(self, step: int) -> float:
        """LR of the run's 0-based optimizer `step` (the step the trainer logs as `step + 1`)."""
        return self.learning_rate * self.factor(*self.locate(step))

    def lrs(self) -> list[float]:
        """LR of every step of the run, in order."""
        return [self.learning_rate * self.factor(p, s) for p, n in enumerate(self.phase_steps) for s in range(n)]


def run_schedule(cfg: RunConfig, sizes: Sequence[int] | None = None) -> RunSchedule:
    """The run's whole LR schedule; `sizes` are samples per phase (default: from the catalog)."""
    steps = phase_steps(cfg, phase_sizes(cfg) if sizes is None else sizes)
    return RunSchedule(cfg.learning_rate, cfg.schedule, cfg.min_lr_ratio, tuple(steps),
                       tuple(warmup_steps(cfg, n) for n in steps))


def estimate_total_steps(cfg: RunConfig) -> int:
    """Optimizer steps a run will take, from catalog sample counts (no tokenization needed).

    Each phase's epoch is ceil(samples / effective batch) steps; samples dropped as overlong
    at tokenization make the real number slightly smaller.
    """
    return run_schedule(cfg).total_steps
