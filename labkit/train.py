"""The SFT trainer: `accelerate launch -m labkit.train RUN_DIR/config.yaml` (or torchrun, or plain python).

Reads top to bottom: join the process group, take the run directory, load config, model and data, shard
the model (labkit.sharding), then for each phase plan each epoch with multipack and run optimizer steps.
Each step's loss is the mean over all assistant tokens of the step across micro-batches and ranks: every
micro-batch's summed token loss is divided by the step's global token count (times the world size, which
DDP/FSDP gradient averaging divides out again), so accumulation and data parallelism give the gradient of
one big batch. One optimizer serves the whole run; a phase starts by clearing its state in place, and the
learning rate of each step is set from the schedule (labkit.schedule) of the step within its phase.

Failures: any rank's exception is printed with a `[rank k]` prefix, written to RUN_DIR/errors/rank-k.json
and folded into status.json (`failed_rank`, `error`) by rank 0, or by the failing rank itself when rank 0
is gone. SIGTERM (preemption) stops all ranks at the next step boundary with a checkpoint.
"""

from __future__ import annotations

import argparse
import fcntl
import math
import os
import random
import resource
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from labkit import attention, checkpoint, liveness, runfiles, sharding
from labkit.catalog import resolve
from labkit.config import ConfigError, RunConfig, load_config
from labkit.data import multipack
from labkit.data.collate import collate_packed, collate_padded
from labkit.data.templates import prepare_for_training
from labkit.data.tokenstore import ConcatStore, load_tokenized
from labkit.loss import chunked_loss, supports_chunked_loss
from labkit.progress import Progress
from labkit.runfiles import checkpoints
from labkit.schedule import RunSchedule, run_schedule
from labkit.tiny import resolve_model

ERRORS = "errors"
# Environment a background evaluation must not inherit: it would try to join the training process group.
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
            "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DIST_ENV_PREFIXES = ("TORCHELASTIC_", "ACCELERATE_", "FSDP_", "PET_")
EVAL_WAIT_S = 1800  # at the end, how long the trainer waits for background evaluations before leaving


# -- model and data -------------------------------------------------------------------------------




def load_model(cfg: RunConfig, model_dir: Path, d: sharding.Dist, strategy: str):
    """(model as loaded, tokenizer, attention implementation). Under FSDP only rank 0 reads the weights:
    the others build the model on the meta device and receive their shards in `shard_model`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"model: {model_dir} is not a Hugging Face checkpoint directory (no config.json)")
    impl = attention.choose(cfg.attention, cfg.packing, d.device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    def build(impl: str):
        if strategy == "fsdp" and d.world > 1 and not d.main:
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir),
                                                        attn_implementation=impl, dtype=torch.float32)
        return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=impl, dtype=torch.float32)

    try:
        model = build(impl)
    except ValueError as e:
        # `attention: auto` on an architecture without an SDPA path (e.g. Gemma-2): its eager attention,
        # which the start line and status.json then name.
        if cfg.attention != "auto" or impl != "sdpa" or "does not support an attention implementation" not in str(e):
            raise
        impl = "eager"
        model = build(impl)
    model.config.use_cache = False
    # The chat template (a built-in for base models), its special tokens with embeddings grown to
    # match, eos = end of turn, a real pad token: all before the loss head is chunked or the model sharded.
    prepare_for_training(tokenizer, model, cfg)
    if cfg.loss_chunk_tokens and supports_chunked_loss(model) is None:
        chunked_loss(model, cfg.loss_chunk_tokens)
    from labkit.memory import wants_checkpointing

    if wants_checkpointing(cfg.distributed.activation_checkpointing, model.num_parameters()):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer, impl


def shard_model(model, strategy: str, d: sharding.Dist, dtype):
    """The model wrapped for `strategy`, with rank 0's weights on every rank."""
    if strategy != "fsdp" or d.world == 1:
        return sharding.wrap(model, strategy, d, dtype)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = model.state_dict() if d.main else {}
    model = sharding.wrap(model, strategy, d, dtype)
    if not d.main:
        model.to_empty(device=d.device)
    elif d.device.type != "cpu":
        model.to(d.device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    sharding.broadcast_buffers_from_rank0(model, d)  # rotary tables are buffers, not in the state dict
    del full
    return model


def load_phase_data(cfg: RunConfig, datasets: list[str], tokenizer, model_dir: Path, log) -> ConcatStore:
    parts, dropped = [], 0
    for name in datasets:
        part, report = load_tokenized(
            resolve(name), tokenizer, model_dir, cfg.max_seq_len, overlong=cfg.overlong,
            on_error=cfg.on_bad_record, options={"reasoning": cfg.reasoning, "train_on": cfg.train_on})
        log(f"data {name}: " + ", ".join(f"{k}={v}" for k, v in report.items() if k != "source"))
        parts.append(part)
        dropped += report.get("dropped_overlong", 0)
    data = ConcatStore(parts)
    if not len(data):
        hint = (f"max_seq_len: {cfg.max_seq_len} drops all {dropped} samples as overlong; raise it or set "
                "overlong: truncate") if dropped else f"datasets: {datasets} hold no usable samples after tokenization"
        raise ConfigError(hint)
    return data


def check_budget(cfg: RunConfig, lengths: np.ndarray, datasets: list[str]) -> None:
    """Every sample must fit one micro-batch: said at start-up, not when its epoch comes."""
    if lengths.size and lengths.max() > cfg.max_tokens_per_device:
        i = int(np.argmax(lengths))
        raise ConfigError(
            f"max_tokens_per_device: sample {i} of {datasets} has {int(lengths[i])} tokens, more than "
            f"max_tokens_per_device={cfg.max_tokens_per_device}: raise it to at least {int(lengths.max())}, "
            "or lower max_seq_len (with overlong: drop or truncate)")


def planner(cfg: RunConfig, packed_rows: bool):
    # Micro-batches that run as padded rows (packing off, or no varlen kernel) cost rows x longest,
    # so they are planned for that; packed rows cost their real tokens.
    return multipack.plan_epoch if cfg.packing and packed_rows else multipack.padded_plan_epoch


def plan_epoch(cfg: RunConfig, lengths, world: int, epoch: int, packed_rows: bool = True) -> list:
    return planner(cfg, packed_rows)(lengths, cfg.effective_batch_size, cfg.max_tokens_per_device, world,
                                     cfg.seed, epoch)


def samples_in_steps(batch: int, phase_sizes: list[int], epochs: list[int], steps: int) -> int:
    """Samples the first `steps` optimizer steps see: `batch` each, the rest of an epoch in its last."""
    total = 0
    for size, n_epochs in zip(phase_sizes, epochs):
        per_epoch = [batch] * (size // batch) + ([size % batch] if size % batch else [])
        for n in per_epoch * n_epochs:
            if steps == 0:
                return total
            total, steps = total + n, steps - 1
    return total


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -- the run directory ------------------------------------------------------------------------------


def update_status(run_dir: Path, **fields: Any) -> dict[str, Any]:
    """status.json read-modify-write under a lock: a failing rank may write it while rank 0 does."""
    with (Path(run_dir) / ".status.lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        return runfiles.update_status(run_dir, **fields)


def ownership_problem(cfg: RunConfig, overwrite: bool) -> str | None:
    """Why this trainer must not start here: a previous run's history is in the dir and neither `resume`
    nor `overwrite` says what to do with it."""
    run_dir = cfg.run_dir
    has_history = (run_dir / runfiles.METRICS).is_file() and (run_dir / runfiles.METRICS).stat().st_size > 0
    if cfg.resume or overwrite or not (has_history or checkpoints(run_dir)):
        return None
    state = runfiles.read_status(run_dir).get("state") or "previous"
    return (f"{run_dir}: holds a {state} run's metrics and checkpoints; set resume: true to continue it, "
            "or pass --overwrite (train(..., overwrite=True)) to start over")


def clear_history(run_dir: Path) -> None:
    """--overwrite: the old run's metrics, checkpoints, final/ and scores go (asked for explicitly)."""
    for ckpt in checkpoints(run_dir):
        checkpoint.remove(ckpt)
    if (run_dir / "final").exists():
        checkpoint.remove(run_dir / "final")
    (run_dir / runfiles.METRICS).unlink(missing_ok=True)
    for score in (run_dir / "evals").glob("*.json"):
        score.unlink()


def report_failure(d: sharding.Dist, run_dir: Path, exc: BaseException) -> dict[str, Any]:
    """Print this rank's traceback with a `[rank k]` prefix and record it in RUN_DIR/errors/rank-k.json."""
    tb = traceback.format_exc()
    sys.stderr.write("".join(f"[rank {d.rank}] {line}\n" for line in tb.rstrip().splitlines()))
    sys.stderr.flush()
    record = {"rank": d.rank, "error": f"{type(exc).__name__}: {exc}", "traceback": tb, "time": time.time()}
    errors = run_dir / ERRORS
    try:
        errors.mkdir(parents=True, exist_ok=True)
        runfiles.write_json_atomic(errors / f"rank-{d.rank}.json", record)
        if not d.main:
            # Rank 0 may already be gone (torchrun kills the others when one fails): say it here too.
            update_status(run_dir, state="failed", failed_rank=d.rank, error=f"rank {d.rank}: {record['error']}",
                          ended_at=time.time())
    except OSError:
        pass
    return record


def first_failure(run_dir: Path, since: float) -> dict[str, Any] | None:
    """The earliest error any rank recorded in this attempt: the cause (later ones are its echoes, e.g.
    a collective failing because a peer died)."""
    records = [runfiles.read_json(p) for p in (run_dir / ERRORS).glob("rank-*.json")]
    records = [r for r in records if r.get("time", 0) >= since]
    return min(records, key=lambda r: r["time"]) if records else None


class StopSignals:
    """SIGTERM (preemption) asks for a checkpoint at the next step boundary; later ones are only logged, so
    a second SIGTERM never interrupts the checkpoint being written (the previous one stays resumable)."""

    def __init__(self, rank: int):
        self.rank, self.count = rank, 0
        self._old = signal.getsignal(signal.SIGTERM)
        self.installed = False
        try:
            signal.signal(signal.SIGTERM, self._on_term)
            self.installed = True
        except ValueError:  # not the main thread (a notebook thread): no preemption handling
            pass

    def _on_term(self, signum, frame) -> None:
        self.count += 1
        what = "checkpoint at the next step boundary, then stop" if self.count == 1 else \
            "already stopping; the checkpoint being written (or the previous one) stays resumable"
        print(f"[rank {self.rank}] SIGTERM received: {what}", file=sys.stderr, flush=True)

    def restore(self) -> None:
        if self.installed:
            signal.signal(signal.SIGTERM, self._old)


# -- the run -----------------------------------------------------------------------------------


def train(cfg: RunConfig, overwrite: bool = False) -> dict[str, Any]:
    """Train per `cfg`; returns the final status. Several processes: start it under accelerate/torchrun."""
    run_dir = cfg.run_dir
    d = sharding.setup(cfg)

    # One trainer per run dir; a refused trainer writes nothing there (the dir is another trainer's).
    lock, refusal = checkpoint.RunLock(run_dir), None
    if d.main:
        try:
            lock.acquire()
            refusal = ownership_problem(cfg, overwrite)
        except (checkpoint.RunBusy, OSError) as e:
            refusal = str(e)
    refusal = sharding.broadcast(d, refusal)
    if refusal:
        if d.main:
            print(f"[labkit] error: {refusal}", file=sys.stderr, flush=True)
            lock.release()
        sharding.teardown(d)
        return {"state": "refused", "error": refusal}

    main, started = d.main, time.time()

    def log(msg: str) -> None:
        if main:
            print(f"[labkit] {msg}", flush=True)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one progress bar per run: ours
    if main:
        if overwrite and not cfg.resume:
            clear_history(run_dir)
        for left in checkpoint.clean_leftovers(run_dir):
            log(f"removed {left.name}, left incomplete by an earlier trainer")
        cfg.save(run_dir / "config.yaml")
        (run_dir / runfiles.STOP).unlink(missing_ok=True)
        for old in (run_dir / ERRORS).glob("rank-*.json"):
            old.unlink()
        # pid + its start time: a dead trainer whose pid was recycled is still seen dead (labkit.liveness).
        update_status(run_dir, state="running", **liveness.identity(), started_at=started, error=None,
                      failed_rank=None, stop_reason=None, ended_at=None, world_size=d.world)
    sharding.barrier(d)  # no rank records an error before the old ones are cleared
    signals = StopSignals(d.rank)
    writer, loop = None, None
    try:
        strategy = sharding.choose_strategy(cfg, d.world)
        dtype = sharding.compute_dtype(cfg, d.device)
        set_seed(cfg.seed)
        with sharding.local_main_first(d):  # the tiny model is built once per node
            model_dir = resolve_model(cfg.model)
        model, tokenizer, impl = load_model(cfg, model_dir, d, strategy)
        n_params = model.num_parameters()
        # Packed rows need a kernel that takes cu_seqlens; otherwise micro-batches run as padded rows.
        packed_rows = cfg.packing and attention.needs_cu_seqlens(impl)
        rows = "packed rows" if packed_rows else "padded rows"
        why_not = supports_chunked_loss(model)
        loss = (f"chunked linear cross-entropy ({cfg.loss_chunk_tokens} tokens)" if cfg.loss_chunk_tokens and not why_not
                else f"transformers' ({why_not or 'loss_chunk_tokens is null'})")
        mp = sharding.mixed_precision_name(dtype)
        log(f"strategy={strategy} world_size={d.world} attention={impl} mixed_precision={mp} | model {model_dir} "
            f"({n_params / 1e6:.2f}M params, {rows}), loss={loss}, device={d.device}, "
            f"activation_checkpointing={getattr(model, 'is_activation_checkpointing', False)}")
        if main:
            update_status(run_dir, strategy=strategy, attention=impl, mixed_precision=mp)
        model = shard_model(model, strategy, d, dtype)
        base = sharding.unwrap(model)

        phases = cfg.training_phases()
        with sharding.local_main_first(d):  # tokenized once per node, the other ranks read the cache
            data = [load_phase_data(cfg, p.datasets, tokenizer, model_dir, log) for p in phases]
            val = load_phase_data(cfg, [cfg.val_dataset], tokenizer, model_dir, log) if cfg.val_dataset else None
        for p, x in zip(phases, data):
            check_budget(cfg, x.lengths, p.datasets)
        # One schedule for the run, the same the notebooks preview: each phase decays over the steps it runs.
        schedule = run_schedule(cfg, [len(x) for x in data])
        total_steps = schedule.total_steps
        total_samples = samples_in_steps(cfg.effective_batch_size, [len(x) for x in data],
                                         [p.epochs for p in phases], total_steps)
        val_plan = None
        if val is not None:
            check_budget(cfg, val.lengths, [cfg.val_dataset])
            # The validation set as one step of the training planner: same budget, same rows.
            val_plan = planner(cfg, packed_rows)(val.lengths, len(val), cfg.max_tokens_per_device, d.world,
                                                 cfg.seed, 0)[0][d.rank]

        # One optimizer for the run (a phase clears its state in place); the LR is set per step.
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                eps=cfg.adam_eps, weight_decay=cfg.weight_decay, fused=d.device.type == "cuda")
        ckpts = checkpoints(run_dir)
        resume = ckpts[-1] if cfg.resume and ckpts else None
        pos = checkpoint.read_position(resume) if resume else {
            "step": 0, "samples": 0, "tokens": 0, "phase": 0, "epoch": 0, "step_in_epoch": 0, "time": 0.0}
        if resume:
            checkpoint.load_resume_state(model, opt, resume / "resume", d.rank)
        if main:
            writer = runfiles.MetricsWriter(run_dir, truncate_after_step=pos["step"])
            update_status(run_dir, total_steps=total_steps, total_samples=total_samples, step=pos["step"],
                          samples=pos["samples"])
        log(f"{total_steps} optimizer steps over {len(phases)} phase(s); "
            + (f"resuming from {resume.name} (model, optimizer and RNG state)" if resume else "starting fresh"))

        loop = Loop(cfg, d, strategy, dtype, model, base, opt, tokenizer, impl, writer, total_steps, pos,
                    val, val_plan, signals, log)
        if main:
            loop.evals.resume_pending()
        loop.progress = Progress(total_steps, pos["step"], enabled=main, log=log)
        for p_idx, (phase, samples) in enumerate(zip(phases, data)):
            if p_idx < pos["phase"]:
                continue
            loop.run_phase(p_idx, phase, samples, schedule, resumed=resume is not None and p_idx == pos["phase"])
            if loop.done:
                break
        state, reason = ("stopped" if loop.stopped else "finished"), loop.stop_reason
        if cfg.save_final and (not loop.stopped or cfg.save_final_on_stop):
            checkpoint.save_final(model, base, tokenizer, run_dir, loop.position(), d.rank, cfg.export_dtype)
        loop.progress.close()
        pending = loop.evals.wait(EVAL_WAIT_S, lambda: signals.count > 0) if main else []
        final = {"state": state, "stop_reason": reason, "step": loop.step, "samples": loop.samples,
                 "pending_evals": pending}
    except Exception as e:  # noqa: BLE001 - any failure on any rank must end in a readable status
        record = report_failure(d, run_dir, e)
        final = {"state": "failed", "error": record["error"], "failed_rank": d.rank}
    finally:
        if writer:
            writer.close()
        signals.restore()
    if main:
        if final["state"] == "failed":
            first = first_failure(run_dir, started)
            if first:
                final.update(failed_rank=first["rank"], error=f"rank {first['rank']}: {first['error']}")
        if loop is not None and final["state"] == "failed":
            loop.evals.stop()
        final = update_status(run_dir, ended_at=time.time(), **final)
        lock.release()
    sharding.teardown(d)
    return final


class Loop:
    """Optimizer steps of one run, across phases; holds the position for checkpoints and logs."""

    def __init__(self, cfg, d, strategy, dtype, model, base, opt, tokenizer, impl, writer, total_steps, pos,
                 val, val_plan, signals, log):
        self.cfg, self.d, self.strategy, self.dtype = cfg, d, strategy, dtype
        self.model, self.base, self.opt, self.tokenizer = model, base, opt, tokenizer
        self.impl, self.writer, self.run_dir, self.total_steps = impl, writer, cfg.run_dir, total_steps
        self.val, self.val_plan, self.signals, self.log = val, val_plan, signals, log
        self.step, self.samples, self.tokens = pos["step"], pos["samples"], pos["tokens"]
        self.phase, self.epoch, self.step_in_epoch = pos["phase"], pos["epoch"], pos["step_in_epoch"]
        self.time_offset = pos.get("time", 0.0)
        self.t0 = time.time()
        self.done = self.stopped = False
        self.save_on_stop, self.stop_reason = True, None
        self.high_grad_steps = 0
        self.evals = BackgroundEvals(cfg, d, log)
        self.progress: Progress | None = None
        self.pad_id = tokenizer.pad_token_id
        self.packed_rows = cfg.packing and attention.needs_cu_seqlens(impl)

    def position(self) -> dict[str, Any]:
        return {"step": self.step, "samples": self.samples, "tokens": self.tokens, "phase": self.phase,
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "time": self.time_offset + time.time() - self.t0}

    def run_phase(self, p_idx: int, phase, samples, schedule: RunSchedule, resumed: bool) -> None:
        cfg, d = self.cfg, self.d
        if not resumed:
            # A phase starts from the previous phase's weights with a fresh optimizer and schedule, as the
            # paper's phased training does: the Adam moments and step counts go, in place.
            self.opt.state.clear()
            self.phase, self.epoch, self.step_in_epoch = p_idx, 0, 0
        lengths = samples.lengths
        per_epoch = multipack.steps_in_epoch(len(samples), cfg.effective_batch_size)
        for epoch in range(self.epoch, phase.epochs):
            self.epoch = epoch
            if self.step_in_epoch < per_epoch:
                plan = plan_epoch(cfg, lengths, d.world, epoch + 1000 * p_idx, self.packed_rows)
                for i in range(self.step_in_epoch, len(plan)):
                    if self.step >= self.total_steps:  # e.g. resumed from the checkpoint at max_steps
                        self.done, self.stop_reason = True, self.stop_reason or "max_steps"
                        return
                    micro = [[samples[j] for j in mb] for mb in plan[i][d.rank]]
                    n_samples = sum(len(mb) for r in plan[i] for mb in r)
                    eff = multipack.packing_efficiency(plan[i], lengths, cfg.max_tokens_per_device)
                    self.step_in_epoch = i + 1  # the position a checkpoint taken after this step resumes from
                    self.optimizer_step(micro, n_samples, eff, epoch + (i + 1) / len(plan), p_idx,
                                        epoch * per_epoch + i, schedule)
                    if self.done:
                        return
            self.step_in_epoch = 0
        self.epoch = phase.epochs

    def batch(self, mb: list) -> dict[str, torch.Tensor]:
        if self.packed_rows:
            b = collate_packed(mb, self.pad_id)
            cu = b["cu_seqlens"]
            kw = {"input_ids": b["input_ids"], "position_ids": b["position_ids"], "labels": b["labels"],
                  "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                  "max_length_q": b["max_seqlen"], "max_length_k": b["max_seqlen"]}
        else:
            # Without a varlen kernel a packed row costs attention over the whole row (the block-
            # diagonal mask is exact but quadratic in the row length), so the micro-batch runs as
            # padded rows: same samples, same token budget, same loss.
            b = collate_padded(mb, self.pad_id)
            kw = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": b["labels"]}
        # Counted on the host before the copy: counting on the GPU would sync once per micro-batch.
        kw["n_loss_tokens"] = int((b["labels"][..., 1:] != -100).sum())
        kw["n_tokens"] = sum(len(s.input_ids) for s in mb)
        cuda = self.d.device.type == "cuda"
        return {k: (v.pin_memory() if cuda else v).to(self.d.device, non_blocking=True)
                if torch.is_tensor(v) else v for k, v in kw.items()}

    def optimizer_step(self, micro: list[list], n_samples: int, eff: float, epoch: float, p_idx: int,
                       step_in_phase: int, schedule: RunSchedule) -> None:
        cfg, d, model, opt = self.cfg, self.d, self.model, self.opt
        t = time.time()
        lr = cfg.learning_rate * schedule.factor(p_idx, step_in_phase)
        for group in opt.param_groups:
            group["lr"] = lr
        batches = [self.batch(mb) for mb in micro]
        # Global count of loss tokens in this step, known before any forward pass.
        global_tokens, step_tokens = sharding.all_sum(
            d, [sum(b.pop("n_loss_tokens") for b in batches), sum(b.pop("n_tokens") for b in batches)])
        global_tokens = max(global_tokens, 1.0)
        loss_sum = torch.zeros((), device=d.device)
        model.train()
        for k, b in enumerate(batches):
            with sharding.no_sync(model, self.strategy, last=k == len(batches) - 1):
                with sharding.autocast(self.strategy, d, self.dtype):
                    # HF's loss with num_items_in_batch is sum(token losses) / num_items_in_batch.
                    out = model(**b, num_items_in_batch=global_tokens / d.world)
                out.loss.backward()
            loss_sum += out.loss.detach().float() * (global_tokens / d.world)
        grad_norm = sharding.grad_norm(model, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

        loss = sharding.all_sum(d, [loss_sum.item()])[0] / global_tokens
        self.step += 1
        self.samples += n_samples
        self.tokens += int(step_tokens)
        dt = time.time() - t
        row = {
            "step": self.step, "phase": p_idx, "epoch": round(epoch, 6), "samples": self.samples,
            "tokens": self.tokens, "loss_tokens": int(global_tokens), "loss": loss, "grad_norm": grad_norm,
            "lr": lr, "tokens_per_s": step_tokens / dt, "samples_per_s": n_samples / dt, "step_time": dt,
            "packing_efficiency": eff, "peak_mem_mb": peak_memory_mb(d.device),
            "time": self.time_offset + time.time() - self.t0, "ts": time.time(),
        }
        self.after_step(row, n_samples)

    def crossed(self, every: int | None, n_samples: int) -> bool:
        """True when this step's samples pass a multiple of `every` (cadences round to whole steps)."""
        return bool(every) and self.samples // every > (self.samples - n_samples) // every

    def after_step(self, row: dict[str, Any], n_samples: int) -> None:
        cfg, d = self.cfg, self.d
        if self.val_plan is not None and self.crossed(cfg.val_every_samples, n_samples):
            row["val_loss"] = self.validation_loss()
        self.progress.update(row)
        if self.writer:
            self.writer.write(row)
            update_status(self.run_dir, step=self.step, samples=self.samples, loss=row["loss"])
        if d.main:
            self.evals.poll()
        reason = self.stop_request(row)
        if reason:
            self.done = self.stopped = True
            self.stop_reason, self.save_on_stop = reason
        elif self.step >= self.total_steps:
            self.done, self.stop_reason = True, "max_steps" if cfg.max_steps else None
        wants_eval = bool(cfg.eval_tasks) and self.crossed(cfg.eval_every_samples, n_samples)
        if self.crossed(cfg.save_every_samples, n_samples) or wants_eval or (self.stopped and self.save_on_stop):
            ckpt = checkpoint.save(self.model, self.base, self.opt, self.tokenizer, self.run_dir, self.position(),
                                   d.rank, cfg.export_dtype, cfg.keep_checkpoints, self.evals.busy())
            if wants_eval and d.main:
                self.evals.start(ckpt)

    def stop_request(self, row: dict[str, Any]) -> tuple[str, bool] | None:
        """(reason, save a checkpoint?) when the run must stop: rules and STOP file decided on rank 0, SIGTERM
        on any rank; one collective per step shares both."""
        cfg, d = self.cfg, self.d
        reason = None
        if d.main:
            es = cfg.early_stop
            if es.stop_on_nan and not (math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])):
                reason = ("loss or grad norm is not finite", False)
            elif es.loss_max and row["loss"] > es.loss_max:
                reason = (f"loss {row['loss']:.4g} above early_stop.loss_max {es.loss_max}", True)
            else:
                self.high_grad_steps = self.high_grad_steps + 1 if (
                    es.grad_norm_max and row["grad_norm"] > es.grad_norm_max) else 0
                if self.high_grad_steps >= es.grad_norm_patience:
                    reason = (f"grad norm above {es.grad_norm_max} for {self.high_grad_steps} steps", True)
            stop_file = self.run_dir / runfiles.STOP
            if reason is None and stop_file.exists():
                reason = (f"STOP file: {stop_file.read_text().strip() or 'stop requested'}", True)
        by_rule, by_signal = sharding.all_max(d, [1.0 if reason else 0.0, float(self.signals.count > 0)])
        if by_rule:
            return tuple(sharding.broadcast(d, reason))
        if by_signal:
            return ("SIGTERM: preempted, checkpoint saved", True)
        return None

    def validation_loss(self) -> float:
        d = self.d
        sums = torch.zeros(2, dtype=torch.float64, device=d.device)
        self.model.eval()
        # Every rank runs the same number of micro-batches (the planner deals them so), as FSDP needs.
        with torch.no_grad():
            for mb in self.val_plan:
                b = self.batch([self.val[j] for j in mb])
                n = float(b.pop("n_loss_tokens"))
                b.pop("n_tokens")
                with sharding.autocast(self.strategy, d, self.dtype):
                    out = self.model(**b, num_items_in_batch=max(n, 1.0))
                sums += torch.tensor([out.loss.item() * n, n], dtype=torch.float64, device=d.device)
        # Sum of token losses over sum of tokens across ranks: exact, no division by world size.
        total, n = sharding.all_sum(d, sums.tolist())
        return total / max(n, 1.0)


# -- background evaluations ---------------------------------------------------------------------------


def eval_env() -> dict[str, str]:
    """The trainer's environment without its distributed variables: an evaluation is its own process."""
    return {k: v for k, v in os.environ.items() if k not in DIST_ENV and not k.startswith(DIST_ENV_PREFIXES)}


def eval_device(cfg: RunConfig, d: sharding.Dist) -> str:
    """`eval_device: auto`: the first GPU the trainer does not use, else the CPU (never a training GPU)."""
    if cfg.eval_device != "auto":
        return cfg.eval_device
    if d.device.type != "cuda":
        return "cpu"
    free = torch.cuda.device_count() - d.local_world
    return f"cuda:{d.local_world}" if free > 0 else "cpu"


class BackgroundEvals:
    """Evaluations of checkpoints in separate processes (rank 0 only), recorded as pending in
    RUN_DIR/evals/pending/ until they end, so evaluations lost with a killed trainer re-run on resume."""

    def __init__(self, cfg: RunConfig, d: sharding.Dist, log):
        self.cfg, self.d, self.log = cfg, d, log
        self.pending_dir = cfg.run_dir / "evals" / "pending"
        self.procs: dict[Path, subprocess.Popen] = {}

    def start(self, ckpt: Path) -> None:
        cfg = self.cfg
        device = eval_device(cfg, self.d)
        cmd = [sys.executable, "-m", "labkit.evaluate", str(ckpt), "--tasks", ",".join(cfg.eval_tasks),
               "--run-dir", str(cfg.run_dir), "--device", device]
        if cfg.eval_limit:
            cmd += ["--limit", str(cfg.eval_limit)]
        self.pending_dir.mkdir(parents=True, exist_ok=True)
        runfiles.write_json_atomic(self.pending_dir / ckpt.name, {"checkpoint": str(ckpt), "command": cmd,
                                                                  "started_at": time.time()})
        with (cfg.run_dir / "evals.log").open("a") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=eval_env())
        self.procs[ckpt] = proc
        self.log(f"evaluating {ckpt.name} in the background on {device} (pid {proc.pid})")

    def poll(self) -> None:
        for ckpt, proc in list(self.procs.items()):
            rc = proc.poll()
            if rc is not None:
                if rc:
                    self.log(f"evaluation of {ckpt.name} failed (exit {rc}); see evals.log")
                (self.pending_dir / ckpt.name).unlink(missing_ok=True)
                del self.procs[ckpt]

    def busy(self) -> frozenset[Path]:
        """Checkpoints an evaluation still needs (running or pending): pruning leaves them."""
        self.poll()
        names = {p.name for p in self.pending_dir.glob("step-*")} if self.pending_dir.is_dir() else set()
        return frozenset(self.procs) | {self.cfg.run_dir / "checkpoints" / n for n in names}

    def resume_pending(self) -> None:
        """Re-run the evaluations a killed trainer left unfinished (their checkpoint still complete)."""
        if not self.pending_dir.is_dir():
            return
        for marker in sorted(self.pending_dir.glob("step-*")):
            ckpt = self.cfg.run_dir / "checkpoints" / marker.name
            marker.unlink()
            if checkpoint.is_complete(ckpt):
                self.start(ckpt)

    def wait(self, timeout: float, interrupted=lambda: False) -> list[str]:
        """Wait for running evaluations (at most `timeout` s, or until `interrupted()`, e.g. a SIGTERM);
        returns those still pending (their markers stay: re-run on resume)."""
        deadline = time.time() + timeout
        while self.procs and time.time() < deadline and not interrupted():
            self.poll()
            time.sleep(0.2)
        left = sorted(c.name for c in self.procs)
        self.stop()
        if not left:
            # Checkpoints kept only for their evaluation can go now.
            checkpoint.prune(self.cfg.run_dir, self.cfg.keep_checkpoints)
        return left

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        self.procs.clear()  # their pending markers stay: the next resume re-runs them


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m labkit.train", description="Train one SFT run.")
    ap.add_argument("config", help="run config YAML (usually RUN_DIR/config.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field (dotted keys, YAML values)")
    ap.add_argument("--overwrite", action="store_true",
                    help="start over in a run dir that holds an earlier run (its metrics and checkpoints go)")
    args = ap.parse_args(argv)
    import yaml

    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    try:
        cfg = load_config(args.config, overrides, check=True)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    final = train(cfg, overwrite=args.overwrite)
    if final.get("state") == "refused":
        return 2
    return 0 if final.get("state") in ("finished", "stopped") else 1


if __name__ == "__main__":
    sys.exit(main())
