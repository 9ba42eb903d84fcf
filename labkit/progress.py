"""A run's progress as people read it: a tqdm bar on a terminal, plain lines in a log file.

A launched run's stdout/stderr is `train.log` (or a Slurm job's output file), read with `tail -f`,
`less` or the lab's log view. A tqdm bar there is carriage-return redraws; instead, one line every
`every` seconds, and one for the last step, each complete on its own:

    [labkit] step 120/1000 (12%) · samples 3,840 · loss 1.2345 · grad_norm 0.871 · lr 2.00e-05 · 11,204 tok/s · eta 5m12s
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any


def duration_text(seconds: float) -> str:
    """`42s`, `5m12s`, `3h07m`."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def progress_line(row: dict[str, Any], total_steps: int, eta_s: float | None) -> str:
    parts = [f"step {row['step']}/{total_steps} ({row['step'] / max(total_steps, 1):.0%})",
             f"samples {row['samples']:,}", f"loss {row['loss']:.4f}", f"grad_norm {row['grad_norm']:.3f}",
             f"lr {row['lr']:.2e}", f"{row['tokens_per_s']:,.0f} tok/s"]
    if row.get("val_loss") is not None:
        parts.insert(3, f"val_loss {row['val_loss']:.4f}")
    if eta_s is not None:
        parts.append(f"eta {duration_text(eta_s)}")
    return " · ".join(parts)


class Progress:
    """Progress of the optimizer steps of one run, shown by the main rank only."""

    def __init__(self, total_steps: int, initial: int, enabled: bool, log: Callable[[str], None],
                 every: float = 15.0, terminal: bool | None = None):
        self.total, self.initial, self.log, self.every = total_steps, initial, log, every
        self.enabled = enabled
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar = None
        if enabled and self.terminal:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=initial, unit="step", dynamic_ncols=True)
        self.t0 = time.monotonic()
        self.last: float | None = None

    def update(self, row: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", gnorm=f"{row['grad_norm']:.2f}", refresh=False)
            return
        if not self.enabled:
            return
        now = time.monotonic()
        # The first step at once (the run is training), then every `every` s, and the last one.
        if self.last is not None and now - self.last < self.every and row["step"] < self.total:
            return
        self.last = now
        done = row["step"] - self.initial
        eta = (now - self.t0) / done * (self.total - row["step"]) if done > 0 and row["step"] < self.total else None
        self.log(progress_line(row, self.total, eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
