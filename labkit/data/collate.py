"""Micro-batches as tensors: one padding-free packed row, or a right-padded batch.

Samples are anything with `input_ids` and `labels` sequences: numpy views into a token store
(the trainer's case) or plain lists. Rows are built with numpy (one concatenate per micro-batch)
rather than Python list appends, which cost more than the forward pass of a small model at
tens of thousands of tokens per micro-batch.
"""

from __future__ import annotations

import numpy as np
import torch

from labkit.data.tokenize import IGNORE, TokenizedSample


def _dummy(pad_token_id: int) -> list[TokenizedSample]:
    # A rank with nothing to do in a micro-batch still runs forward/backward (collectives must
    # match across ranks); two pad tokens without labels contribute no loss.
    return [TokenizedSample([pad_token_id, pad_token_id], [IGNORE, IGNORE])]


def _flat(samples) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lens = np.fromiter((len(s.input_ids) for s in samples), dtype=np.int64, count=len(samples))
    ids = np.concatenate([np.asarray(s.input_ids, dtype=np.int64) for s in samples])
    labels = np.concatenate([np.asarray(s.labels, dtype=np.int64) for s in samples])
    return ids, labels, lens


def collate_packed(samples: list[TokenizedSample], pad_token_id: int) -> dict[str, torch.Tensor | int]:
    """One row `[1, T]` holding all samples, positions restarting per sample, and `cu_seqlens`."""
    samples = samples or _dummy(pad_token_id)
    ids, labels, lens = _flat(samples)
    cu = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=cu[1:])
    # HF shifts labels inside the model: the first label of a sample would make the previous
    # sample's last token predict this sample's first token. Never train across samples.
    labels[cu[:-1]] = IGNORE
    pos = np.arange(len(ids), dtype=np.int64) - np.repeat(cu[:-1], lens)
    labels_t = torch.from_numpy(labels)[None]
    return {
        "input_ids": torch.from_numpy(ids)[None],
        "labels": labels_t,
        "position_ids": torch.from_numpy(pos)[None],
        "cu_seqlens": torch.from_numpy(cu.astype(np.int32)),
        "max_seqlen": int(lens.max()),
        "num_loss_tokens": (labels_t[..., 1:] != IGNORE).sum(),
    }


def collate_padded(samples: list[TokenizedSample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """A `[B, L]` right-padded batch with an attention mask (the `packing: false` path)."""
    samples = samples or _dummy(pad_token_id)
    width = max(len(s.input_ids) for s in samples)
    ids = np.full((len(samples), width), pad_token_id, dtype=np.int64)
    labels = np.full((len(samples), width), IGNORE, dtype=np.int64)
    mask = np.zeros((len(samples), width), dtype=np.int64)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        ids[row, :n] = s.input_ids
        labels[row, :n] = s.labels
        mask[row, :n] = 1
    labels_t = torch.from_numpy(labels)
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask), "labels": labels_t,
            "num_loss_tokens": (labels_t[..., 1:] != IGNORE).sum()}
