"""The SFT trainer: `accelerate launch -m labkit.train RUN_DIR/config.yaml`.

Reads top to bottom: load config, model and data; for each phase plan the epochs with
multipack, then run optimizer steps. Each step's loss is the mean over all assistant tokens
of the step across micro-batches and ranks: every micro-batch's summed token loss is divided
by the step's global token count (times the world size, which DDP/FSDP gradient averaging
divides out again), so accumulation and data parallelism give the gradient of one big batch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm

from labkit import attention, runfiles
from labkit.catalog import resolve
from labkit.config import ConfigError, RunConfig, load_config
from labkit.data import multipack
from labkit.data.collate import collate_packed, collate_padded
from labkit.data.tokenize import load_tokenized
from labkit.loss import chunked_loss, supports_chunked_loss
from labkit.runfiles import checkpoints
from labkit.schedule import lr_factor, warmup_steps
from labkit.tiny import resolve_model


def make_accelerator(cfg: RunConfig) -> Accelerator:
    cpu = cfg.distributed.cpu or not torch.cuda.is_available()
    mp = cfg.distributed.mixed_precision
    if mp == "auto":
        mp = "bf16" if not cpu and torch.cuda.is_bf16_supported() else "no"
    # We step the scheduler once per optimizer step ourselves; accelerate would otherwise
    # step it num_processes times.
    return Accelerator(cpu=cpu, mixed_precision=mp, step_scheduler_with_optimizer=False)


def load_model(cfg: RunConfig, model_dir: Path, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"model: {model_dir} is not a Hugging Face checkpoint directory (no config.json)")
    impl = attention.choose(cfg.attention, cfg.packing, device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=impl, dtype=torch.float32)
    model.config.use_cache = False
    if cfg.loss_chunk_tokens and supports_chunked_loss(model) is None:
        chunked_loss(model, cfg.loss_chunk_tokens)
    if cfg.distributed.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer, impl


def load_phase_data(cfg: RunConfig, datasets: list[str], tokenizer, model_dir: Path, log) -> list:
    samples = []
    for name in datasets:
        part, report = load_tokenized(
            resolve(name).path, tokenizer, model_dir, cfg.max_seq_len, overlong=cfg.overlong
        )
        log(f"data {name}: {report}")
        samples.extend(part)
    if not samples:
        raise ConfigError(f"datasets: {datasets} hold no usable samples after tokenization")
    return samples


def plan_epoch(cfg: RunConfig, lengths: list[int], world: int, epoch: int, packed_rows: bool = True) -> list:
    # Micro-batches that will run as padded rows (packing off, or no varlen kernel) cost
    # rows x longest, so they are planned for that; packed rows cost their real tokens.
    planner = multipack.plan_epoch if cfg.packing and packed_rows else multipack.padded_plan_epoch
    return planner(lengths, cfg.effective_batch_size, cfg.max_tokens_per_device, world, cfg.seed, epoch)


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


# -- checkpoints -------------------------------------------------------------------------------


def save_checkpoint(accel, model, tokenizer, run_dir: Path, state: dict[str, Any], keep: int | None,
                    protect: frozenset[Path] = frozenset()) -> Path:
    """Write model (safetensors) + full accelerate state to a temp dir, then rename it into place.

    `keep` prunes all but the newest `keep` checkpoints, except those in `protect` (a background
    evaluation is still reading them)."""
    root = run_dir / "checkpoints"
    final = root / f"step-{state['step']:08d}"
    tmp = root / f".tmp-step-{state['step']:08d}"
    if accel.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accel.wait_for_everyone()
    accel.save_state(str(tmp / "accelerate"))
    save_model(accel, model, tokenizer, tmp)
    if accel.is_main_process:
        (tmp / "checkpoint.json").write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        prune_checkpoints(run_dir, keep, protect)
    accel.wait_for_everyone()
    return final


def prune_checkpoints(run_dir: Path, keep: int | None, protect: frozenset[Path] = frozenset()) -> None:
    if keep:
        for old in checkpoints(run_dir)[:-keep]:
            if old not in protect:
                shutil.rmtree(old, ignore_errors=True)


def save_model(accel, model, tokenizer, out: Path) -> None:
    state_dict = accel.get_state_dict(model)
    if accel.is_main_process:
        accel.unwrap_model(model).save_pretrained(out, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(out)


# -- the run -----------------------------------------------------------------------------------


def train(cfg: RunConfig) -> dict[str, Any]:
    """Train per `cfg`; returns the final status. Must run under `accelerate launch` for >1 process."""
    run_dir = cfg.run_dir
    accel = make_accelerator(cfg)
    main = accel.is_main_process
    world = accel.num_processes
    started = time.time()

    def log(msg: str) -> None:
        if main:
            print(f"[labkit] {msg}", flush=True)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one progress bar per run: ours
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.yaml")
        (run_dir / runfiles.STOP).unlink(missing_ok=True)
        runfiles.update_status(run_dir, state="running", pid=os.getpid(), started_at=started,
                               error=None, stop_reason=None, ended_at=None, world_size=world)
    writer = None
    try:
        set_seed(cfg.seed)
        model_dir = resolve_model(cfg.model)
        model, tokenizer, impl = load_model(cfg, model_dir, accel.device)
        rows = "packed rows" if cfg.packing and attention.needs_cu_seqlens(impl) else "padded rows"
        why_not = supports_chunked_loss(model)
        loss = (f"chunked linear cross-entropy ({cfg.loss_chunk_tokens} tokens)" if cfg.loss_chunk_tokens and not why_not
                else f"transformers' ({why_not or 'loss_chunk_tokens is null'})")
        log(f"model {model_dir} ({model.num_parameters() / 1e6:.2f}M params), attention={impl} ({rows}), loss={loss}, "
            f"processes={world}, device={accel.device}, mixed_precision={accel.mixed_precision}")
        model = accel.prepare(model)

        phases = cfg.training_phases()
        data = [load_phase_data(cfg, p.datasets, tokenizer, model_dir, log) for p in phases]
        packed_rows = attention.needs_cu_seqlens(impl)
        steps_per_epoch = [len(plan_epoch(cfg, [len(s.input_ids) for s in d], world, 0, packed_rows)) for d in data]
        phase_steps = [n * p.epochs for n, p in zip(steps_per_epoch, phases)]
        total_steps = min(sum(phase_steps), cfg.max_steps or sum(phase_steps))
        total_samples = samples_in_steps(cfg.effective_batch_size, [len(d) for d in data],
                                         [p.epochs for p in phases], total_steps)
        val = load_phase_data(cfg, [cfg.val_dataset], tokenizer, model_dir, log) if cfg.val_dataset else None

        resume = checkpoints(run_dir)[-1] if cfg.resume and checkpoints(run_dir) else None
        pos = json.loads((resume / "checkpoint.json").read_text()) if resume else {
            "step": 0, "samples": 0, "tokens": 0, "phase": 0, "epoch": 0, "step_in_epoch": 0, "time": 0.0}
        if main:
            writer = runfiles.MetricsWriter(run_dir, truncate_after_step=pos["step"] if resume else 0)
            runfiles.update_status(run_dir, total_steps=total_steps, total_samples=total_samples,
                                   step=pos["step"], samples=pos["samples"], attention=impl)
        log(f"{total_steps} optimizer steps over {len(phases)} phase(s); "
            + (f"resuming from {resume.name}" if resume else "starting fresh"))

        loop = Loop(cfg, accel, model, tokenizer, impl, writer, run_dir, total_steps, pos, started, val, log)
        # In a log file (launched runs) a bar redraws as lines: redraw rarely there.
        loop.bar = tqdm(total=total_steps, initial=pos["step"], unit="step", disable=not main, dynamic_ncols=True,
                        mininterval=0.5 if sys.stderr.isatty() else 15)
        for p_idx, (phase, samples) in enumerate(zip(phases, data)):
            if p_idx < pos["phase"]:
                continue
            loop.run_phase(p_idx, phase, samples, phase_steps[p_idx], resume if p_idx == pos["phase"] else None)
            if loop.done:
                break
        state, reason = "finished", loop.stop_reason
        if loop.stopped:
            state = "stopped"
        if cfg.save_final and not (loop.stopped and not loop.save_on_stop):
            save_model(accel, model, tokenizer, run_dir / "final")
            if main:
                (run_dir / "final" / "checkpoint.json").write_text(json.dumps(loop.position()))
        loop.bar.close()
        loop.wait_evals()
        final = {"state": state, "stop_reason": reason, "step": loop.step, "samples": loop.samples}
    except Exception as e:  # noqa: BLE001 - any failure must end in a readable status
        final = {"state": "failed", "error": f"{type(e).__name__}: {e}"}
        if main:
            traceback.print_exc()
    finally:
        if writer:
            writer.close()
    if main:
        final = runfiles.update_status(run_dir, ended_at=time.time(), **final)
    accel.end_training()
    return final


class Loop:
    """Optimizer steps of one run, across phases; holds the position for checkpoints and logs."""

    def __init__(self, cfg, accel, model, tokenizer, impl, writer, run_dir, total_steps, pos, started, val, log):
        self.cfg, self.accel, self.model, self.tokenizer = cfg, accel, model, tokenizer
        self.impl, self.writer, self.run_dir, self.total_steps = impl, writer, run_dir, total_steps
        self.val, self.log = val, log
        self.step, self.samples, self.tokens = pos["step"], pos["samples"], pos["tokens"]
        self.phase, self.epoch, self.step_in_epoch = pos["phase"], pos["epoch"], pos["step_in_epoch"]
        self.time_offset = pos.get("time", 0.0)
        self.t0 = time.time()
        self.done = self.stopped = False
        self.save_on_stop, self.stop_reason = True, None
        self.high_grad_steps = 0
        self.evals: dict[Path, subprocess.Popen] = {}
        self.bar: tqdm | None = None
        self.pad_id = tokenizer.pad_token_id
        self.ddp = accel.distributed_type.name == "MULTI_GPU" or accel.distributed_type.name == "MULTI_CPU"

    def position(self) -> dict[str, Any]:
        return {"step": self.step, "samples": self.samples, "tokens": self.tokens, "phase": self.phase,
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "time": self.time_offset + time.time() - self.t0}

    def run_phase(self, p_idx: int, phase, samples: list, n_steps: int, resume: Path | None) -> None:
        cfg, accel = self.cfg, self.accel
        # A phase starts from the previous phase's weights with a fresh optimizer and schedule
        # (as the paper's phased training does). accelerate keeps every prepared optimizer for
        # save_state, so forget the previous phase's before preparing this one's.
        accel._optimizers.clear()
        accel._schedulers.clear()
        opt = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
            fused=accel.device.type == "cuda",
        )
        warm = warmup_steps(cfg, n_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, n_steps, cfg.schedule, warm, cfg.min_lr_ratio)
        )
        opt, sched = accel.prepare(opt, sched)
        if resume is not None:
            accel.load_state(str(resume / "accelerate"))
            self.log(f"resumed optimizer, scheduler and RNG state from {resume}")
        else:
            self.phase, self.epoch, self.step_in_epoch = p_idx, 0, 0
        lengths = [len(s.input_ids) for s in samples]
        for epoch in range(self.epoch, phase.epochs):
            self.epoch = epoch
            plan = plan_epoch(cfg, lengths, accel.num_processes, epoch + 1000 * p_idx,
                              attention.needs_cu_seqlens(self.impl))
            for i in range(self.step_in_epoch, len(plan)):
                micro = [[samples[j] for j in mb] for mb in plan[i][accel.process_index]]
                n_samples = sum(len(mb) for r in plan[i] for mb in r)
                eff = multipack.packing_efficiency(plan[i], lengths, cfg.max_tokens_per_device)
                self.step_in_epoch = i + 1  # the position a checkpoint taken after this step resumes from
                self.optimizer_step(opt, sched, micro, n_samples, eff, epoch + (i + 1) / len(plan), p_idx)
                if self.done:
                    return
            self.step_in_epoch = 0
        self.epoch = phase.epochs

    def batch(self, mb: list) -> dict[str, torch.Tensor]:
        if self.cfg.packing and attention.needs_cu_seqlens(self.impl):
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
        cuda = self.accel.device.type == "cuda"
        return {k: (v.pin_memory() if cuda else v).to(self.accel.device, non_blocking=True)
                if torch.is_tensor(v) else v for k, v in kw.items()}

    def optimizer_step(self, opt, sched, micro: list[list], n_samples: int, eff: float, epoch: float, p_idx):
        accel, cfg, model = self.accel, self.cfg, self.model
        t = time.time()
        batches = [self.batch(mb) for mb in micro]
        # Global count of loss tokens in this step, known before any forward pass.
        local = torch.tensor(
            [float(sum(b.pop("n_loss_tokens") for b in batches)),
             float(sum(len(s.input_ids) for mb in micro for s in mb))], device=accel.device)
        totals = accel.reduce(local, reduction="sum")
        global_tokens = max(totals[0].item(), 1.0)
        loss_sum = torch.zeros((), device=accel.device)
        model.train()
        for k, b in enumerate(batches):
            sync = k == len(batches) - 1 or not self.ddp
            with nullcontext() if sync else accel.no_sync(model):
                # HF's loss with num_items_in_batch is sum(token losses) / num_items_in_batch.
                out = model(**b, num_items_in_batch=global_tokens / accel.num_processes)
                accel.backward(out.loss)
            loss_sum += out.loss.detach() * global_tokens / accel.num_processes
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm else float("inf")
        grad_norm = accel.clip_grad_norm_(model.parameters(), max_norm)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

        loss = accel.reduce(loss_sum, reduction="sum").item() / global_tokens
        grad_norm = float(grad_norm)
        self.step += 1
        self.samples += n_samples
        self.tokens += int(totals[1].item())
        dt = time.time() - t
        row = {
            "step": self.step, "phase": p_idx, "epoch": round(epoch, 6), "samples": self.samples,
            "tokens": self.tokens, "loss_tokens": int(global_tokens), "loss": loss, "grad_norm": grad_norm,
            "lr": lr, "tokens_per_s": totals[1].item() / dt, "samples_per_s": n_samples / dt, "step_time": dt,
            "packing_efficiency": eff, "peak_mem_mb": peak_memory_mb(accel.device),
            "time": self.time_offset + time.time() - self.t0, "ts": time.time(),
        }
        self.after_step(row, n_samples)

    def crossed(self, every: int | None, n_samples: int) -> bool:
        """True when this step's samples pass a multiple of `every` (cadences round to whole steps)."""
        return bool(every) and self.samples // every > (self.samples - n_samples) // every

    def after_step(self, row: dict[str, Any], n_samples: int) -> None:
        cfg, accel = self.cfg, self.accel
        if self.val and self.crossed(cfg.val_every_samples, n_samples):
            row["val_loss"] = self.validation_loss()
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{row['loss']:.3f}", gnorm=f"{row['grad_norm']:.2f}", refresh=False)
        if self.writer:
            self.writer.write(row)
            runfiles.update_status(self.run_dir, step=self.step, samples=self.samples, loss=row["loss"])
        reason = self.stop_request(row)
        if reason:
            self.done = self.stopped = True
            self.stop_reason, self.save_on_stop = reason
        elif cfg.max_steps and self.step >= cfg.max_steps:
            self.done, self.stop_reason = True, "max_steps"
        wants_eval = bool(cfg.eval_tasks) and self.crossed(cfg.eval_every_samples, n_samples)
        if self.crossed(cfg.save_every_samples, n_samples) or wants_eval or (self.stopped and self.save_on_stop):
            ckpt = save_checkpoint(accel, self.model, self.tokenizer, self.run_dir, self.position(),
                                   cfg.keep_checkpoints, self.in_eval())
            if wants_eval and accel.is_main_process:
                self.start_eval(ckpt)

    def stop_request(self, row: dict[str, Any]) -> tuple[str, bool] | None:
        """(reason, save a checkpoint?) when the run must stop; decided on rank 0, shared with all."""
        cfg, accel = self.cfg, self.accel
        reason = None
        if accel.is_main_process:
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
            if reason:
                self._reason = reason
                accel.set_trigger()
        return self._shared_reason() if accel.check_trigger() else None

    def _shared_reason(self) -> tuple[str, bool]:
        from accelerate.utils import broadcast_object_list

        obj = [getattr(self, "_reason", None)]
        broadcast_object_list(obj, from_process=0)
        return obj[0]

    def validation_loss(self) -> float:
        accel, world = self.accel, self.accel.num_processes
        mine = self.val[accel.process_index::world]
        budget = self.cfg.max_tokens_per_device
        sums = torch.zeros(2, device=accel.device)
        self.model.eval()
        chunks = _chunks(mine, budget)
        # Every rank must run the same number of forwards (DDP/FSDP collectives): pad with empty
        # micro-batches, which collate to a dummy row without loss tokens.
        most = torch.tensor(len(chunks), device=accel.device)
        if world > 1:
            torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        chunks += [[] for _ in range(int(most) - len(chunks))]
        with torch.no_grad():
            for mb in chunks:
                b = self.batch(mb)
                n = float(b.pop("n_loss_tokens"))
                out = self.model(**b, num_items_in_batch=max(n, 1.0))
                sums += torch.stack([out.loss.detach() * n, torch.tensor(n, device=accel.device)])
        # Sum of token losses over sum of tokens across ranks: exact, no division by world size.
        sums = accel.reduce(sums, reduction="sum")
        return (sums[0] / sums[1].clamp(min=1)).item()

    def start_eval(self, ckpt: Path) -> None:
        cmd = [sys.executable, "-m", "labkit.evaluate", str(ckpt), "--tasks", ",".join(self.cfg.eval_tasks),
               "--run-dir", str(self.run_dir)]
        if self.cfg.eval_limit:
            cmd += ["--limit", str(self.cfg.eval_limit)]
        log = (self.run_dir / "evals.log").open("a")
        proc = self.evals[ckpt] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        self.log(f"evaluating {ckpt.name} in the background (pid {proc.pid})")

    def in_eval(self) -> frozenset[Path]:
        return frozenset(c for c, p in self.evals.items() if p.poll() is None)

    def wait_evals(self) -> None:
        for p in self.evals.values():
            p.wait()
        if self.evals:
            # Checkpoints kept only for their evaluation can go now.
            prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints)


def _chunks(samples: list, budget: int) -> list[list]:
    out, cur, used = [], [], 0
    for s in samples:
        n = len(s.input_ids)
        if cur and used + n > budget:
            out.append(cur)
            cur, used = [], 0
        cur.append(s)
        used += n
    if cur:
        out.append(cur)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m labkit.train", description="Train one SFT run.")
    ap.add_argument("config", help="run config YAML (usually RUN_DIR/config.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field (dotted keys, YAML values)")
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
    final = train(cfg)
    return 0 if final.get("state") in ("finished", "stopped") else 1


if __name__ == "__main__":
    sys.exit(main())
