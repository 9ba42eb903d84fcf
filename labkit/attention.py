"""Attention backend for padding-free (packed) batches, chosen once at start and logged.

Packed rows hold several samples; attention must not cross sample boundaries:
- `flash_attention_2` (flash-attn installed, CUDA): varlen kernels driven by `cu_seq_lens_*`.
- `labkit_varlen` (CUDA, no flash-attn): PyTorch's own `torch.nn.attention.varlen.varlen_attn`,
  registered through transformers' attention interface.
- otherwise (CPU) `sdpa`. transformers would turn restarting `position_ids` into an exact
  block-diagonal mask, but attention over a whole packed row is quadratic in its length, so the
  trainer plans and runs padded micro-batches instead (length-sorted, rows x longest within the
  token budget, the same effective batch per step).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect

import torch

VARLEN = "labkit_varlen"


def _varlen_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from torch.nn.attention.varlen import varlen_attn

    cu = kwargs.get("cu_seq_lens_q")
    max_len = kwargs.get("max_length_q")
    if cu is None or max_len is None:
        raise RuntimeError("labkit_varlen attention needs cu_seq_lens_q/max_length_q (packed batches only)")
    if query.dtype == torch.float32 or value.dtype != query.dtype:
        # fp32 weights under bf16 autocast hand over fp32 q/k (RoPE promotes them) and bf16 v;
        # the varlen kernel takes fp16/bf16 only, all three alike (flash-attn callers cast too).
        dt = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
        query, key, value = query.to(dt), key.to(dt), value.to(dt)
    b, hq, t, d = query.shape
    # transformers hands (batch, heads, tokens, dim); varlen wants (tokens, heads, dim) with batch 1.
    q = query.transpose(1, 2).reshape(b * t, hq, d)
    k = key.transpose(1, 2).reshape(b * t, key.shape[1], d)
    v = value.transpose(1, 2).reshape(b * t, value.shape[1], d)
    extra = {"enable_gqa": True} if hq != key.shape[1] and "enable_gqa" in _varlen_params() else {}
    out = varlen_attn(q, k, v, cu, cu, int(max_len), int(max_len), scale=scaling, window_size=(-1, 0), **extra)
    return out.view(b, t, hq, d), None


@functools.cache
def _varlen_params() -> frozenset[str]:
    # torch 2.11's varlen_attn takes fewer KV heads natively and has no `enable_gqa`; 2.13 needs the flag.
    # Ask the installed kernel rather than the torch version.
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def register_varlen() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(VARLEN, _varlen_forward)
    # Like flash attention, varlen needs no dense mask: boundaries come from cu_seq_lens.
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, flash_attention_mask)
    return VARLEN


def varlen_available() -> bool:
    if not torch.cuda.is_available():
        return False
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def choose(requested: str, packing: bool, device: torch.device) -> str:
    """The attention implementation to load the model with."""
    cuda = device.type == "cuda"
    if requested == "flash_attention_2" or (
        requested == "auto" and cuda and importlib.util.find_spec("flash_attn") is not None
    ):
        return "flash_attention_2"
    if requested == "varlen" or (requested == "auto" and packing and cuda and varlen_available()):
        if not cuda:
            raise ValueError("attention: 'varlen' needs a CUDA device; use 'auto' or 'sdpa' on CPU")
        return register_varlen()
    if requested == "eager":
        return "eager"
    return "sdpa"


def needs_cu_seqlens(impl: str) -> bool:
    return impl in ("flash_attention_2", VARLEN)
