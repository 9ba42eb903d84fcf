"""GPU SFT throughput: labkit (packed, padded) vs Hugging Face TRL (padded, padding-free), to one JSON.

Every system trains a random-init Llama-3.2-shaped model (built from its config: no weights, no download)
on the same synthetic chat-like samples, in the same optimizer steps of the same samples, with the same
optimizer, and is timed over `--steps` steps after `--warmup-steps` untimed ones:

- labkit_packed: labkit's own trainer loop (`labkit.train.Loop`) with multipack micro-batches; rows are
  padding-free with a varlen attention kernel on CUDA, padded rows where labkit has none (CPU).
- labkit_padded: the same loop with `packing: false` (length-grouped, right-padded micro-batches).
- trl_padded: TRL's `SFTTrainer`, default right padding, fixed-size micro-batches.
- trl_padding_free: `SFTTrainer(padding_free=True)`; needs a varlen attention kernel, skipped without one.

    python bench/gpu_sft.py --preset 1b                      # H100: writes bench/results/gpu_sft.json
    python bench/gpu_sft.py --preset 3b --grad-ckpt --max-tokens-per-device 4096
    python bench/gpu_sft.py --dry-run --out /tmp/gpu_sft.json  # tiny model on CPU: keeps this script working
"""

from __future__ import annotations

import argparse
import gc
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/results.py, however this file is loaded
import results as bench_results  # noqa: E402
import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from labkit import attention, sharding
from labkit.config import RunConfig
from labkit.data.tokenize import IGNORE, TokenizedSample
from labkit.data.tokenstore import ConcatStore
from labkit.schedule import RunSchedule
from labkit.train import Loop, peak_memory_mb, plan_epoch

PRESETS = {
    # Llama-3.2-1B / 3B shapes; the tiny one only keeps the dry run fast.
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256),
}
SYSTEMS = ("labkit_packed", "labkit_padded", "trl_padded", "trl_padding_free")
PAD_ID = 0  # sample tokens are drawn from 2..vocab, so a pad is never a real token
# Small enough for 2 CPU cores in seconds; explicit flags still override these.
DRY_RUN = dict(preset="tiny", device="cpu", steps=2, warmup_steps=1, effective_batch=8,
               max_tokens_per_device=512, max_len=256, mu=4.6, sigma=0.9)


# -- data --------------------------------------------------------------------------------------


def make_samples(n: int, vocab: int, max_len: int, mu: float, sigma: float, seed: int) -> list[TokenizedSample]:
    """Chat-like samples: lognormal lengths clipped to 64..max_len, a 20-40% prompt without labels."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mu, sigma, n), 64, max_len).astype(int)
    samples = []
    for n_tok in lengths:
        ids = rng.integers(2, vocab, n_tok).tolist()
        prompt = int(n_tok * rng.uniform(0.2, 0.4))
        samples.append(TokenizedSample(ids, [IGNORE] * prompt + ids[prompt:]))
    return samples


def labkit_config(args: argparse.Namespace, packing: bool, root: Path) -> RunConfig:
    """The run config labkit would train with; TRL reads its optimizer settings from it too."""
    return RunConfig(
        name="packed" if packing else "padded", runs_root=str(root), datasets=["synthetic"], packing=packing,
        effective_batch_size=args.effective_batch, max_tokens_per_device=args.max_tokens_per_device,
        max_seq_len=args.max_len, learning_rate=args.lr, seed=args.seed, save_final=False,
        distributed={"cpu": args.device == "cpu", "activation_checkpointing": args.grad_ckpt},
    )


# -- model and metrics -------------------------------------------------------------------------


def build_model(preset: str, impl: str, device: torch.device, seed: int) -> torch.nn.Module:
    """Random init from a config, the same weights for every system (same seed, same device).

    fp32 weights as `labkit.train.load_model` loads them; on CUDA labkit (labkit.sharding) and Trainer (TRL)
    run the forward under bf16 autocast, so both train bf16 compute with fp32 master weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**PRESETS[preset], tie_word_embeddings=True, max_position_embeddings=8192,
                         pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=1)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=impl, dtype=torch.float32)
    model.config.use_cache = False
    return model


def pick_device(args: argparse.Namespace) -> torch.device:
    """The device every system trains on; labkit.sharding.setup decides the same (`distributed.cpu`)."""
    return torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    # On CPU labkit reports the process's max RSS, which cannot be reset: it grows over the systems run.
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def train_flops(n_params: int, layers: int, hidden: int, lengths: list[int]) -> float:
    """Model FLOPs of one forward+backward over `lengths` samples (padding excluded: it is waste).

    Dense: 6 * N_params per token (2 forward + 4 backward per multiply-add; the tied embedding counts once,
    as the LM-head matmul). Attention scores and weighted values: 2 matmuls * 2 FLOPs * s^2 * hidden per
    layer forward, x3 for forward+backward = 12 * layers * hidden * s^2, halved for causal masking:
    6 * layers * hidden * sum(s^2)."""
    return 6 * n_params * sum(lengths) + 12 * layers * hidden * sum(s * s for s in lengths) / 2


def summarize(ends: list[float], losses: list[float], step_lengths: list[list[int]], fed: int,
              model: torch.nn.Module, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Throughput over the timed steps; `ends[k]` is when step k finished (step 0: the first warm-up step)."""
    if not len(ends) == len(losses) == len(step_lengths):
        raise RuntimeError(f"{len(step_lengths)} steps planned, {len(ends)} timed, {len(losses)} losses logged")
    w = args.warmup_steps
    timed = step_lengths[w:]
    seconds = ends[-1] - ends[w - 1]
    tokens = sum(sum(s) for s in timed)
    c = model.config
    flops = sum(train_flops(model.num_parameters(), c.num_hidden_layers, c.hidden_size, s) for s in timed)
    all_real = sum(sum(s) for s in step_lengths)
    return {
        "params": model.num_parameters(), "steps_timed": len(timed), "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
        "samples_per_s": sum(len(s) for s in timed) / seconds,
        # MFU against a GPU's peak means nothing on a CPU.
        "mfu": flops / seconds / (args.peak_tflops * 1e12) if device.type == "cuda" else None,
        "peak_mem_mb": peak_memory_mb(device),
        "padding_fraction": 1 - all_real / fed,  # over all steps run, warm-up included
        "step_times": [b - a for a, b in zip(ends[w - 1:], ends[w:])],
        "losses": losses, "final_loss": losses[-1],
    }


# -- labkit ------------------------------------------------------------------------------------


class TimedLoop(Loop):
    """labkit's trainer loop as is; each step's end is timed and its metrics row kept instead of logged."""

    def __init__(self, *a: Any, **kw: Any):
        super().__init__(*a, **kw)
        self.ends: list[float] = []
        self.rows: list[dict[str, Any]] = []
        self.fed = 0

    def batch(self, mb: list) -> dict[str, torch.Tensor]:
        b = super().batch(mb)
        self.fed += b["input_ids"].numel()  # shape only: no device sync
        return b

    def after_step(self, row: dict[str, Any], n_samples: int) -> None:
        # No progress bar, metrics file, checkpoint or early stop in a benchmark. The step's loss already
        # went to the host, which waits for the GPU; the explicit sync keeps the clock honest regardless.
        sync(self.d.device)
        self.ends.append(time.perf_counter())
        self.rows.append(row)
        self.done = self.step >= self.total_steps


def run_labkit(packing: bool, samples: list[TokenizedSample], args: argparse.Namespace, root: Path) -> dict:
    cfg = labkit_config(args, packing, root)
    d = sharding.setup(cfg)  # one process: no process group, strategy single
    dtype = sharding.compute_dtype(cfg, d.device)
    impl = attention.choose(cfg.attention, cfg.packing, d.device)
    reset_peak_memory(d.device)
    model = build_model(args.preset, impl, d.device, args.seed)
    if cfg.distributed.activation_checkpointing is True:  # as labkit.train.load_model does
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = sharding.wrap(model, "single", d, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            eps=cfg.adam_eps, weight_decay=cfg.weight_decay, fused=d.device.type == "cuda")
    n_steps = args.warmup_steps + args.steps
    pos = {"step": 0, "samples": 0, "tokens": 0, "phase": 0, "epoch": 0, "step_in_epoch": 0}
    loop = TimedLoop(cfg, d, "single", dtype, model, model, opt, SimpleNamespace(pad_token_id=PAD_ID), impl, None,
                     n_steps, pos, None, None, SimpleNamespace(count=0), lambda msg: None)
    # The constant schedule of every system here, over the steps timed and untimed.
    schedule = RunSchedule(cfg.learning_rate, "constant", 0.0, (n_steps,), (0,))
    loop.run_phase(0, cfg.training_phases()[0], ConcatStore([samples]), schedule, resumed=False)
    # labkit counts each step's tokens itself; they must be the planned steps every system trains on.
    steps = [[len(samples[i].input_ids) for i in step] for step in plan_steps(cfg, samples)]
    counted = np.diff([0] + [r["tokens"] for r in loop.rows]).tolist()
    if counted != [sum(s) for s in steps]:
        raise RuntimeError(f"labkit trained other steps than planned: {counted} tokens per step")
    result = summarize(loop.ends, [r["loss"] for r in loop.rows], steps, loop.fed, model, d.device, args)
    rows = "packed" if cfg.packing and attention.needs_cu_seqlens(impl) else "padded"  # as Loop.batch decides
    del loop, model, opt
    if d.device.type == "cuda":
        torch.cuda.empty_cache()
    return {"attention": impl, "rows": rows, **result}


def plan_steps(cfg: RunConfig, samples: list[TokenizedSample]) -> list[list[int]]:
    """Sample indices of each optimizer step, as labkit plans its first epoch (one process)."""
    plan = plan_epoch(cfg, [len(s.input_ids) for s in samples], 1, 0)
    return [sorted(i for mb in step[0] for i in mb) for step in plan]


# -- TRL ---------------------------------------------------------------------------------------


def trl_micro_batch(args: argparse.Namespace) -> int:
    """Samples per TRL micro-batch: `--trl-batch-size`, else the largest divisor of the effective batch
    whose worst-case padded batch (every row `--max-len`) fits labkit's per-device token budget."""
    if args.trl_batch_size:
        return args.trl_batch_size
    fits = [b for b in range(1, args.effective_batch + 1)
            if args.effective_batch % b == 0 and b * args.max_len <= args.max_tokens_per_device]
    return max(fits, default=1)


def trl_tokenizer() -> Any:
    """TRL wants a tokenizer for its pad token only: the samples are already token ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD_ID, "<eos>": 1}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
                                   pad_token="<pad>", eos_token="<eos>")


def run_trl(padding_free: bool, samples: list[TokenizedSample], args: argparse.Namespace, root: Path) -> dict:
    try:
        import trl
    except ImportError:
        return {"skipped": "trl not installed"}
    from datasets import Dataset

    device = pick_device(args)
    cfg = labkit_config(args, padding_free, root)
    # The attention labkit would use for the same rows: a varlen kernel for padding-free rows (TRL supports
    # only those: a flattened row under sdpa is quadratic in its length), labkit's padded choice otherwise.
    impl = attention.choose("auto", padding_free, device)
    if padding_free and not attention.needs_cu_seqlens(impl):
        return {"skipped": f"padding_free needs a varlen attention kernel (flash-attn, or torch varlen on CUDA); "
                           f"{device.type} has {impl} only"}
    # The same steps as labkit, in order: a sequential sampler over the steps' samples laid end to end,
    # with micro-batch x accumulation = the effective batch, gives each optimizer step the same samples.
    steps = plan_steps(cfg, samples)
    order = [i for step in steps for i in step]
    data = Dataset.from_dict({"input_ids": [samples[i].input_ids for i in order],
                              "labels": [samples[i].labels for i in order]})
    micro = trl_micro_batch(args)
    accum = args.effective_batch // micro
    # transformers 5.23 renamed gradient_checkpointing (the old name still works, with a FutureWarning).
    ckpt = next(f for f in ("activation_checkpointing", "gradient_checkpointing") if hasattr(trl.SFTConfig, f))
    n_steps = args.warmup_steps + args.steps
    sft = trl.SFTConfig(
        output_dir=str(root / "trl"), max_steps=n_steps, per_device_train_batch_size=micro,
        gradient_accumulation_steps=accum, train_sampling_strategy="sequential",
        learning_rate=cfg.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=cfg.weight_decay, adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2,
        adam_epsilon=cfg.adam_eps, max_grad_norm=cfg.max_grad_norm,
        optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch",
        bf16=device.type == "cuda", use_cpu=device.type == "cpu",  # SFTConfig defaults to bf16 even on CPU
        **{ckpt: args.grad_ckpt, f"{ckpt}_kwargs": {"use_reentrant": False}},  # SFTConfig defaults to True
        padding_free=padding_free, max_length=None,  # samples are within --max-len already
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=args.seed,
    )
    timer = StepTimer(device)
    reset_peak_memory(device)
    model = build_model(args.preset, impl, device, args.seed)
    trainer = trl.SFTTrainer(model=model, args=sft, train_dataset=data, processing_class=trl_tokenizer(),
                             callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # it prints every step's logs: the table says it all
    trainer.data_collator = CountingCollator(trainer.data_collator)
    trainer.train()
    lengths = [[len(samples[i].input_ids) for i in step] for step in steps]
    per_step = np.add.reduceat(trainer.data_collator.real, range(0, len(trainer.data_collator.real), accum))
    if per_step.tolist() != [sum(s) for s in lengths]:
        raise RuntimeError(f"TRL trained other steps than labkit's: {per_step.tolist()} tokens per step")
    result = summarize(timer.ends, timer.losses, lengths, trainer.data_collator.fed, model, device, args)
    trainer.accelerator.free_memory()
    return {"attention": impl, "rows": "packed" if padding_free else "padded", "micro_batch": micro, **result}


class StepTimer(TrainerCallback):
    """When each optimizer step ends, and its loss (the step's mean over loss tokens, as labkit's)."""

    def __init__(self, device: torch.device):
        self.device, self.ends, self.losses = device, [], []

    def on_step_end(self, args, state, control, **kwargs):
        sync(self.device)
        self.ends.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:  # logging_steps=1: once per step; the end-of-run summary says train_loss
            self.losses.append(logs["loss"])


class CountingCollator:
    """Counts the tokens a collator feeds the model (`fed`, pads included) and each micro-batch's real ones."""

    def __init__(self, collate):
        self.collate, self.fed, self.real = collate, 0, []

    def __call__(self, examples: list[dict]) -> dict:
        b = self.collate(examples)
        self.fed += b["input_ids"].numel()
        self.real.append(sum(len(e["input_ids"]) for e in examples))
        return b


# -- main --------------------------------------------------------------------------------------


def run_system(name: str, samples: list[TokenizedSample], args: argparse.Namespace, root: Path) -> dict:
    runs = {"labkit_packed": lambda: run_labkit(True, samples, args, root),
            "labkit_padded": lambda: run_labkit(False, samples, args, root),
            "trl_padded": lambda: run_trl(False, samples, args, root),
            "trl_padding_free": lambda: run_trl(True, samples, args, root)}
    try:
        return runs[name]()
    except Exception as e:  # noqa: BLE001 - one failing system must not cost the others' results
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        free_memory(pick_device(args))


def versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "accelerate", "trl", "datasets", "flash-attn"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def print_table(systems: dict[str, dict]) -> None:
    print(f"{'system':17s} {'attention':17s} {'rows':6s} {'tokens/s':>10s} {'MFU':>6s} {'peak MB':>8s} "
          f"{'pad %':>6s} {'loss@1':>8s} {'final':>8s}")
    for name, r in systems.items():
        if "tokens_per_s" not in r:
            print(f"{name:17s} {r.get('skipped') or r.get('error')}")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"{name:17s} {r['attention']:17s} {r['rows']:6s} {r['tokens_per_s']:10.0f} {mfu:>6s} "
              f"{r['peak_mem_mb']:8.0f} {r['padding_fraction']:6.1%} {r['losses'][0]:8.4f} {r['final_loss']:8.4f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="1b", help="model shape (random init)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, from {', '.join(SYSTEMS)}")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    ap.add_argument("--warmup-steps", type=int, default=3,
                    help="untimed steps first (at least 1: a step is timed from the end of the previous one)")
    ap.add_argument("--effective-batch", type=int, default=64, help="samples per optimizer step")
    ap.add_argument("--max-tokens-per-device", type=int, default=8192, help="labkit's micro-batch token budget")
    ap.add_argument("--trl-batch-size", type=int, default=0,
                    help="TRL samples per micro-batch; 0: the most whose padded batch fits the token budget")
    ap.add_argument("--max-len", type=int, default=4096, help="longest sample (lengths clip to 64..max-len)")
    ap.add_argument("--mu", type=float, default=6.3, help="lognormal mu of sample lengths (median e^mu)")
    ap.add_argument("--sigma", type=float, default=0.9, help="lognormal sigma of sample lengths")
    ap.add_argument("--lr", type=float, default=2e-5, help="learning rate, constant (the same for all)")
    ap.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="for MFU (H100 SXM bf16 dense: 989)")
    ap.add_argument("--seed", type=int, default=0, help="for the samples, the model init and the step order")
    ap.add_argument("--dry-run", action="store_true", help="tiny model on CPU, a few short steps: "
                    + " ".join(f"{k}={v}" for k, v in DRY_RUN.items()) + " (flags given still win)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/gpu_sft.json"))
    if "--dry-run" in (sys.argv[1:] if argv is None else argv):
        ap.set_defaults(**DRY_RUN)  # flags given explicitly still win
    args = ap.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if unknown := set(args.systems) - set(SYSTEMS):
        ap.error(f"unknown system(s) {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    if args.warmup_steps < 1 or args.steps < 1:
        ap.error("--steps and --warmup-steps must be at least 1")
    if not 64 <= args.max_len <= args.max_tokens_per_device:
        ap.error("--max-len must be at least 64 (the shortest sample) and at most --max-tokens-per-device")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    if args.trl_batch_size and args.effective_batch % args.trl_batch_size:
        ap.error("--trl-batch-size must divide --effective-batch (TRL accumulates whole micro-batches)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # TRL's advice on padding-free and friends would drown the table
    hf_logging.disable_progress_bar()
    n = args.effective_batch * (args.warmup_steps + args.steps)
    samples = make_samples(n, PRESETS[args.preset]["vocab_size"], args.max_len, args.mu, args.sigma, args.seed)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.systems:
            print(f"[gpu_sft] {name} ...", flush=True)
            results[name] = run_system(name, samples, args, Path(tmp) / name)
    device = pick_device(args)
    report = {"device": device_name(device), "versions": versions(),
              "peak_mem": "torch.cuda.max_memory_allocated, per system" if device.type == "cuda"
              else "process max RSS: it cannot be reset, so it grows over the systems in run order",
              "args": {**vars(args), "out": str(args.out)}, "systems": results}
    bench_results.write(args.out, report)
    print_table(results)
    print(f"-> {args.out}")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
