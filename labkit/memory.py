"""Per-GPU memory of a run, estimated from the model's config.json before any process starts.

What a rank holds while it trains (bytes; P parameters, N ranks, T = max_tokens_per_device):

- model state, as labkit trains (fp32 master weights, fp32 gradients, AdamW's two fp32 moments):
  16·P under ddp/single, 16·P/N under fsdp. This is the rule of thumb of the ZeRO paper (Rajbhandari et
  al. 2020: 2+2+12 = 16 bytes per parameter for mixed-precision Adam); labkit keeps no separate half-
  precision copy, so its 4+4+8 is the same 16. ddp adds the bf16 weight copies autocast caches during
  a forward (2·P); fsdp adds the bf16 all-gathered weights of the two decoder blocks in flight (the
  current one and the prefetched next) and the unsharded root (embeddings, head) with its fp32 gradient.
- activations of one micro-batch of T tokens, in the compute dtype (b bytes: 2 for bf16):
  without activation checkpointing, per token and decoder layer b·(10·h + 3·kv + 4·i): the inputs of
  both norms (kept in fp32: 2·h each), the q/k/v input, q, k, v, rotated q and k, the attention output
  and the o-projection input, the MLP input, and the four intermediate-size tensors of a gated MLP
  (gate, up, act(gate), product). That is Korthikanti et al. 2022's per-layer 34·s·h (GPT block, flash
  attention, so no s² term) with the GeLU MLP's 16·h replaced by the gated MLP's 8·i (their rule,
  adapted: 18·h + 8·i bytes); tests hold the estimate within 25% of the adapted rule.
  With activation checkpointing (one checkpoint per block) only each block's input stays (2·h per
  token and layer, their "full recomputation" 2·s·h·L) plus one block's activations while it is
  recomputed.
- the loss: labkit's chunked head + cross-entropy holds fp32 logits of `loss_chunk_tokens` tokens (and
  their gradient); transformers' loss holds all T tokens' logits.
- 1 GiB for the CUDA context and kernels, and 10% of the rest for allocator fragmentation.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from labkit.config import RunConfig

GiB = 2**30
CONTEXT_BYTES = 1 * GiB
FRAGMENTATION = 0.10
# Activation checkpointing `auto` turns on from here: "3B" models (Llama-3.2-3B 3.21B, Qwen2.5-3B 3.09B).
AUTO_CHECKPOINTING_PARAMS = 2.5e9


@dataclass(frozen=True)
class Shape:
    """The sizes of a decoder-only transformer that memory depends on."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @classmethod
    def from_config(cls, cfg: dict) -> Shape:
        text = cfg.get("text_config") or {}
        cfg = {**text, **cfg} if text and "hidden_size" not in cfg else cfg
        try:
            hidden, layers = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
            heads = int(cfg["num_attention_heads"])
            inter, vocab = int(cfg["intermediate_size"]), int(cfg["vocab_size"])
        except KeyError as e:
            raise ValueError(f"config.json has no {e.args[0]!r}: not a decoder-only transformer labkit can size") from None
        kv = int(cfg.get("num_key_value_heads") or heads)
        return cls(hidden, layers, inter, vocab, heads, kv, int(cfg.get("head_dim") or hidden // heads),
                   bool(cfg.get("tie_word_embeddings", False)))

    @property
    def block_params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return h * q + 2 * h * kv + q * h + 3 * h * self.intermediate + 2 * h

    @property
    def root_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.block_params + self.root_params

    def activation_bytes_per_token_layer(self, b: int = 2) -> int:
        kv = self.kv_heads * self.head_dim
        return b * (10 * self.hidden + 3 * kv + 4 * self.intermediate)


@dataclass(frozen=True)
class Estimate:
    """Bytes per GPU, by part."""

    strategy: str
    world: int
    activation_checkpointing: bool
    params: int
    model_state: int  # weights + gradients + optimizer state (+ transient weight copies)
    activations: int
    loss: int
    total: int

    def summary(self) -> str:
        ac = "on" if self.activation_checkpointing else "off"
        return (f"~{self.total / GiB:.1f} GiB per GPU ({self.strategy} over {self.world}: weights+grads+Adam "
                f"{self.model_state / GiB:.1f} GiB, activations {self.activations / GiB:.1f} GiB with activation "
                f"checkpointing {ac}, loss {self.loss / GiB:.1f} GiB)")


def estimate(shape: Shape, strategy: str, world: int, tokens: int, checkpointing: bool,
             loss_chunk_tokens: int | None = 4096, compute_bytes: int = 2) -> Estimate:
    """Per-GPU bytes of training `shape` (see the module docstring for every term)."""
    p = shape.params
    if strategy == "fsdp":
        state = 16 * p // world + 2 * 2 * shape.block_params + (2 + 4) * shape.root_params
    else:
        state = 16 * p + (2 * p if compute_bytes == 2 else 0)
    per_layer = shape.activation_bytes_per_token_layer(compute_bytes) * tokens
    if checkpointing:
        acts = 2 * shape.hidden * tokens * shape.layers + per_layer
    else:
        acts = per_layer * shape.layers
    logit_tokens = min(tokens, loss_chunk_tokens) if loss_chunk_tokens else tokens
    loss = 3 * 4 * shape.vocab * logit_tokens + 4 * shape.hidden * tokens
    total = int((state + acts + loss) * (1 + FRAGMENTATION)) + CONTEXT_BYTES
    return Estimate(strategy, world, checkpointing, p, state, acts, loss, total)


def wants_checkpointing(setting: bool | str, params: int) -> bool:
    """`activation_checkpointing: auto` is on from ~3B parameters."""
    return params >= AUTO_CHECKPOINTING_PARAMS if setting == "auto" else bool(setting)


def visible_gpu_memory() -> list[int]:
    """Total bytes of each GPU this process may use, without initializing CUDA (the notebook kernel must
    not hold a CUDA context); [] when there is none. Asked once per CUDA_VISIBLE_DEVICES value."""
    return list(_gpu_memory(os.environ.get("CUDA_VISIBLE_DEVICES")))


@functools.lru_cache(maxsize=8)
def _gpu_memory(visible: str | None) -> tuple[int, ...]:
    if visible == "" or not shutil.which("nvidia-smi"):
        return ()
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    sizes = [int(float(x)) * 2**20 for x in out.split() if x.strip()]
    if visible:
        idx = [int(x) for x in visible.split(",") if x.strip().isdigit()]
        sizes = [sizes[i] for i in idx if i < len(sizes)] if idx else sizes
    return tuple(sizes)


def _model_shape(cfg: RunConfig) -> Shape | None:
    if cfg.model == "tiny":
        return None
    path = Path(cfg.model).expanduser() / "config.json"
    if not path.is_file():
        return None  # RunConfig.check names the missing checkpoint itself
    try:
        return Shape.from_config(json.loads(path.read_text()))
    except (ValueError, json.JSONDecodeError):
        return None


def plan(cfg: RunConfig, strategy: str | None = None) -> Estimate | None:
    """The estimate for this config's model, strategy and token budget; None when it cannot be sized."""
    shape = _model_shape(cfg)
    return None if shape is None else _plan(cfg, shape, strategy)


def _compute_bytes(cfg: RunConfig) -> int:
    return 4 if cfg.distributed.mixed_precision == "no" else 2


def _plan(cfg: RunConfig, shape: Shape, strategy: str | None = None, checkpointing: bool | None = None,
          tokens: int | None = None) -> Estimate:
    d = cfg.distributed
    world = d.num_processes
    strategy = strategy or (d.strategy if d.strategy != "auto" else ("single" if world == 1 else "ddp"))
    ac = wants_checkpointing(d.activation_checkpointing, shape.params) if checkpointing is None else checkpointing
    return estimate(shape, strategy, world, cfg.max_tokens_per_device if tokens is None else tokens, ac,
                    cfg.loss_chunk_tokens, _compute_bytes(cfg))


def auto_strategy(cfg: RunConfig, world: int) -> str:
    """`strategy: auto` on several ranks: ddp when it fits the GPUs (or there are none), else fsdp."""
    gpus = [] if cfg.distributed.cpu else visible_gpu_memory()
    return auto_strategy_for(cfg, gpus) if gpus else "ddp"


def check(cfg: RunConfig, gpus: list[int] | None = None) -> list[str]:
    """Problems of the memory plan, one message each ([] when it fits or there is no GPU to size against)."""
    shape = None if cfg.distributed.cpu else _model_shape(cfg)
    if shape is None:
        return []
    gpus = visible_gpu_memory() if gpus is None else gpus
    if not gpus:
        return []
    d = cfg.distributed
    have = min(gpus)
    strategy = d.strategy if d.strategy != "auto" else (
        "single" if d.num_processes == 1 else _auto_strategy(cfg, shape, have))
    est = _plan(cfg, shape, strategy)
    if est.total <= have:
        return []
    advice = []
    if strategy != "fsdp" and d.num_processes > 1 and _plan(cfg, shape, "fsdp").total <= have:
        advice.append("distributed.strategy: fsdp")
    if not est.activation_checkpointing and _plan(cfg, shape, strategy, checkpointing=True).total <= have:
        advice.append("distributed.activation_checkpointing: true")
    tokens = _largest_fitting_tokens(cfg, shape, strategy, est.activation_checkpointing, have)
    if tokens:
        advice.append(f"max_tokens_per_device: {tokens} or less")
    if not advice:
        advice.append("more GPUs with fsdp (the weights, gradients and Adam state alone do not fit)")
    return [f"distributed: the memory plan needs {est.summary()} but the GPUs have {have / GiB:.0f} GiB; "
            f"change {' or '.join(advice)}"]


def auto_strategy_for(cfg: RunConfig, gpus: list[int]) -> str:
    shape = _model_shape(cfg)
    return "ddp" if shape is None else _auto_strategy(cfg, shape, min(gpus))


def _auto_strategy(cfg: RunConfig, shape: Shape, have: int) -> str:
    return "ddp" if _plan(cfg, shape, "ddp").total <= have else "fsdp"


def _largest_fitting_tokens(cfg: RunConfig, shape: Shape, strategy: str, checkpointing: bool, have: int) -> int:
    lo, hi = 0, 1 << 20
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _plan(cfg, shape, strategy, checkpointing, tokens=mid).total <= have:
            lo = mid
        else:
            hi = mid - 1
    return lo if lo >= 256 else 0
