"""The tiny model on the exact-answer set, on CPU: the run configs the checkpoint and preemption tests
train, and the worker script (tests/train_worker.py) that trains them with faults injected."""

from __future__ import annotations

from pathlib import Path

from labkit.config import RunConfig

WORKER = Path(__file__).with_name("train_worker.py")
TINY_EXACT = dict(model="tiny", datasets=["eval_exact"], max_tokens_per_device=1024, max_seq_len=256, seed=7,
                  learning_rate=1e-3, distributed={"cpu": True})


def tiny_exact(root: Path, **kw) -> RunConfig:
    return RunConfig(**{"runs_root": str(root), **TINY_EXACT, **kw})
