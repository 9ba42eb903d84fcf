"""Checkpoints of a run: resume state and the Hugging Face export, both written atomically.

`checkpoints/step-00000123/` holds
- `resume/`: the state to continue training exactly: model and optimizer through
  `torch.distributed.checkpoint` (sharded under FSDP, so each rank writes its own shard and a resume at
  another world size reshards them), and each rank's RNG state (`rng-rank{k}.pt`). The LR schedule is
  a pure function of the position (phase, step in phase), so the position is the scheduler state.
- the export, once: `save_pretrained` weights (bf16 by default, `export_dtype`) + tokenizer, what
  evaluation and users load (`AutoModelForCausalLM.from_pretrained(step_dir)`).
- `checkpoint.json`, the position (step, samples, phase, epoch, step in epoch), written last.

Every checkpoint and `final/` is built in a `.tmp-*` directory and renamed into place when complete, so
a reader never sees a torn one, and `checkpoint.json` is the completion marker readers check. Pruning
renames a checkpoint to `.trash-*` before deleting it, and a trainer starting on a run dir removes the
`.tmp-*`/`.trash-*` leftovers of a killed predecessor, so a kill -9 mid-prune leaves nothing half-deleted
for good. One trainer owns a run dir at a time (`RunLock`).
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from labkit.runfiles import checkpoints

COMPLETE = "checkpoint.json"
LOCK = ".trainer.lock"
EXPORT_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


class RunBusy(RuntimeError):
    """Another trainer owns this run directory."""


class RunLock:
    """An exclusive flock on RUN_DIR/.trainer.lock for the trainer's lifetime (released by the kernel when
    the process dies, so a kill -9 never leaves a run locked)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self._fh = None

    def acquire(self, wait: float = 5.0) -> None:
        """Take the lock, waiting up to `wait` s: a trainer killed a moment ago may still be exiting."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = self.path.open("a+")
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise RunBusy(f"{self.path.parent}: another trainer ({holder}) is training this run; "
                          "stop it first, or pick another run name") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def is_complete(path: Path) -> bool:
    """A checkpoint or final/ directory that was written to the end."""
    return (Path(path) / COMPLETE).is_file()


def remove(path: Path) -> None:
    """Delete a checkpoint directory so that no reader ever sees it half deleted: rename, then delete."""
    path = Path(path)
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def clean_leftovers(run_dir: Path) -> list[Path]:
    """Remove what a killed trainer left: temp dirs, trash, and step dirs without their marker (old
    trainers pruned in place). Returns what was removed."""
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    found = [p for p in run_dir.glob(".tmp-final*")] + [p for p in run_dir.glob(".trash-final*")]
    if root.is_dir():
        found += [p for p in root.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
        found += [p for p in root.glob("step-*") if p.is_dir() and not is_complete(p)]
    for p in found:
        shutil.rmtree(p, ignore_errors=True) if p.name.startswith(".") else remove(p)
    return found


def prune(run_dir: Path, keep: int | None, protect: frozenset[Path] = frozenset()) -> None:
    """Keep the newest `keep` checkpoints (and those in `protect`, still being evaluated)."""
    if keep:
        for old in checkpoints(run_dir)[:-keep]:
            if old not in protect:
                remove(old)


# -- writing ---------------------------------------------------------------------------------------


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_resume_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, out: Path, rank: int) -> None:
    """Model + optimizer (each rank its shard under FSDP) and this rank's RNG, into `out` (all ranks call)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(out), no_dist=not torch.distributed.is_initialized())
    torch.save(_rng_state(), out / f"rng-rank{rank}.pt")


def load_resume_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, src: Path, rank: int) -> None:
    """The inverse of save_resume_state, at any world size (DCP reshards; a rank without its own RNG file,
    after a resume on more ranks, takes rank 0's)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(src), no_dist=not torch.distributed.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = src / f"rng-rank{rank}.pt"
    _set_rng_state(torch.load(rng if rng.is_file() else src / "rng-rank0.pt", weights_only=False))


def export(model: torch.nn.Module, base: torch.nn.Module, tokenizer, out: Path, dtype: str, rank: int) -> None:
    """The Hugging Face checkpoint (weights in `dtype`, tokenizer) into `out`; all ranks call, rank 0 writes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # Full tensors gathered onto rank 0's host memory, one at a time (cpu_offload): never a second
    # full copy on a GPU.
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        to = EXPORT_DTYPES[dtype]
        state = {k: v.to(to) if v.is_floating_point() else v for k, v in full.items()}
        old = base.config.dtype
        base.config.dtype = to  # config.json says what the weights are
        try:
            base.save_pretrained(out, state_dict=state, safe_serialization=True)
        finally:
            base.config.dtype = old
        tokenizer.save_pretrained(out)
    del full


def save(model: torch.nn.Module, base: torch.nn.Module, optimizer: torch.optim.Optimizer, tokenizer,
         run_dir: Path, position: dict[str, Any], rank: int, export_dtype: str = "bfloat16",
         keep: int | None = None, protect: frozenset[Path] = frozenset()) -> Path:
    """A complete checkpoint of `position` (all ranks call): built in a temp dir, renamed into place,
    then older ones pruned to `keep`."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{position['step']:08d}"
    tmp = root / f".tmp-{final.name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "resume").mkdir(parents=True)
    _barrier()
    save_resume_state(model, optimizer, tmp / "resume", rank)
    export(model, base, tokenizer, tmp, export_dtype, rank)
    _barrier()
    if rank == 0:
        _write_marker(tmp, position)
        if final.exists():
            remove(final)  # the same step saved again (a resumed run re-reaching it)
        os.rename(tmp, final)
        prune(run_dir, keep, protect | {final})
    _barrier()
    return final


def save_final(model: torch.nn.Module, base: torch.nn.Module, tokenizer, run_dir: Path,
               position: dict[str, Any], rank: int, export_dtype: str = "bfloat16") -> Path:
    """RUN_DIR/final/: the export only (no resume state), replaced atomically."""
    final = Path(run_dir) / "final"
    tmp = Path(run_dir) / ".tmp-final"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    export(model, base, tokenizer, tmp, export_dtype, rank)
    if rank == 0:
        _write_marker(tmp, position)
        if final.exists():
            remove(final)
        os.rename(tmp, final)
    _barrier()
    return final


def _write_marker(directory: Path, position: dict[str, Any]) -> None:
    tmp = directory / f".{COMPLETE}.tmp"
    tmp.write_text(json.dumps(position))
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, directory / COMPLETE)


def read_position(ckpt: Path) -> dict[str, Any]:
    return json.loads((Path(ckpt) / COMPLETE).read_text())
