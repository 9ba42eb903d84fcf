"""Micro-batches as tensors: one padding-free packed row, or a right-padded batch."""

from __future__ import annotations

import torch

from labkit.data.tokenize import IGNORE, TokenizedSample


def _dummy(pad_token_id: int) -> list[TokenizedSample]:
    # A rank with nothing to do in a micro-batch still runs forward/backward (collectives must
    # match across ranks); two pad tokens without labels contribute no loss.
    return [TokenizedSample([pad_token_id, pad_token_id], [IGNORE, IGNORE])]


def collate_packed(samples: list[TokenizedSample], pad_token_id: int) -> dict[str, torch.Tensor | int]:
    """One row `[1, T]` holding all samples, positions restarting per sample, and `cu_seqlens`."""
    samples = samples or _dummy(pad_token_id)
    ids, labels, pos, cu = [], [], [], [0]
    for s in samples:
        n = len(s.input_ids)
        ids += s.input_ids
        # HF shifts labels inside the model: the first label of a sample would make the previous
        # sample's last token predict this sample's first token. Never train across samples.
        labels += [IGNORE, *s.labels[1:]]
        pos += range(n)
        cu.append(cu[-1] + n)
    labels_t = torch.tensor([labels], dtype=torch.long)
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": labels_t,
        "position_ids": torch.tensor([pos], dtype=torch.long),
        "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
        "max_seqlen": max(len(s.input_ids) for s in samples),
        "num_loss_tokens": (labels_t[..., 1:] != IGNORE).sum(),
    }


def collate_padded(samples: list[TokenizedSample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """A `[B, L]` right-padded batch with an attention mask (the `packing: false` path)."""
    samples = samples or _dummy(pad_token_id)
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        ids[row, :n] = torch.tensor(s.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(s.labels, dtype=torch.long)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "num_loss_tokens": (labels[..., 1:] != IGNORE).sum()}
