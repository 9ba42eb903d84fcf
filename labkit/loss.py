"""Fused linear + cross-entropy over assistant tokens only, in chunks: logits are never materialized.

transformers' causal-LM loss builds logits for every position, `[tokens, vocab]`, then upcasts them
to fp32: at a 16k-token micro-batch and a 128k vocabulary that is 8 GiB before its gradient, most
of it for prompt and padding positions whose labels are -100. Here the lm head runs only on the
positions that carry a label, a chunk at a time, and each chunk's gradient (softmax minus one-hot)
is folded into the gradients of the hidden states and the head weight during the forward pass, as
fused linear cross-entropy kernels do. Peak extra memory is one chunk of logits plus one fp32 copy
of the head weight's gradient, and no matmul runs twice.

`chunked_loss(model, chunk_tokens)` swaps the forward of one model instance; DDP and FSDP wrap it as
usual (their hooks sit on `__call__`), and `save_pretrained` is unaffected. Models whose logits are
not a plain `lm_head(hidden)` (soft-capping, logit scaling, a head bias) keep transformers' loss.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

IGNORE = -100


def _matmul_dtype(t: torch.Tensor) -> torch.dtype:
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else t.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, y_i) / scale, with gradients computed chunk by chunk in the forward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, scale: float,
                chunk: int) -> torch.Tensor:
        dt = _matmul_dtype(hidden)
        w = weight.to(dt)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s:s + chunk].to(dt)
                y = target[s:s + chunk]
                logits = (h @ w.T).float()
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
                # d(loss)/d(logits) = softmax - one_hot, reusing the logits buffer.
                grad = logits.sub_(lse[:, None]).exp_()
                grad[torch.arange(len(y), device=y.device), y] -= 1.0
                grad = grad.div_(scale).to(dt)
                grad_hidden[s:s + chunk] = grad @ w
                grad_weight += (grad.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / scale

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        g = grad_out.float()
        return (grad_hidden * g.to(grad_hidden.dtype), (grad_weight * g).to(ctx.weight_dtype),
                None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         num_items_in_batch: float | None = None, chunk_tokens: int = 4096) -> torch.Tensor:
    """Causal-LM loss from the last hidden states `[B, T, H]` and head weight `[V, H]`.

    Same result as transformers' loss on `lm_head(hidden)`: position t predicts `labels[t + 1]`, -100
    is ignored, and the sum is divided by `num_items_in_batch` (the mean over labelled tokens when
    None).
    """
    target = labels[..., 1:].reshape(-1)
    keep = (target != IGNORE).nonzero().squeeze(1)
    h = hidden[..., :-1, :].reshape(-1, hidden.shape[-1]).index_select(0, keep)
    scale = float(num_items_in_batch) if num_items_in_batch is not None else float(max(len(keep), 1))
    if not torch.is_grad_enabled():
        return _no_grad_loss(h, weight, target[keep], scale, chunk_tokens)
    return _LinearCrossEntropy.apply(h, weight, target[keep], scale, chunk_tokens)


def _no_grad_loss(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, scale: float,
                  chunk: int) -> torch.Tensor:
    # Validation: no gradient buffers at all.
    dt = _matmul_dtype(h)
    w = weight.to(dt)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, h.shape[0], chunk):
        logits = (h[s:s + chunk].to(dt) @ w.T).float()
        total += nn.functional.cross_entropy(logits, target[s:s + chunk], reduction="sum")
    return total / scale


def supports_chunked_loss(model: nn.Module) -> str | None:
    """None when the model's logits are `lm_head(model.model(...))`; otherwise why not."""
    cfg = model.config
    if not (isinstance(getattr(model, "model", None), nn.Module) and isinstance(getattr(model, "lm_head", None),
                                                                                  nn.Linear)):
        return "no .model / .lm_head pair"
    if model.lm_head.bias is not None:
        return "lm_head has a bias"
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logits_scaling", 1.0) != 1.0:
        return "logits are soft-capped or scaled"
    return None


def chunked_loss(model: nn.Module, chunk_tokens: int) -> None:
    """Make `model(..., labels=...)` compute its loss with `linear_cross_entropy` (no logits returned)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    original = model.forward

    def forward(self, input_ids=None, labels=None, num_items_in_batch=None, **kwargs: Any):
        if labels is None:
            return original(input_ids=input_ids, **kwargs)
        hidden = self.model(input_ids=input_ids, **kwargs).last_hidden_state
        loss = linear_cross_entropy(hidden, self.lm_head.weight, labels, num_items_in_batch, chunk_tokens)
        return CausalLMOutputWithPast(loss=loss)

    model.forward = types.MethodType(forward, model)
