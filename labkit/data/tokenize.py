"""Chat samples to token ids with assistant-only labels, cached on disk.

Labels are found from character spans, not from template-specific markers: for assistant turn i
the span runs from the end of the rendered prompt `messages[:i]` + generation prompt to the end of
the rendered `messages[:i+1]`, so the turn's content and its end-of-turn token are trained on, for
any chat template whose renderings of a conversation's prefixes are prefixes of the whole.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

IGNORE = -100
CACHE_VERSION = 1


@dataclass
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    text = _render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], generation_prompt=True)) if i else 0
        prefix = _render(tokenizer, messages[: i + 1])
        if not text.startswith(prefix):
            raise ValueError(
                "the chat template renders a conversation's prefix differently from the whole conversation; "
                "assistant-only labels cannot be located (template: "
                f"{(tokenizer.chat_template or '')[:80]!r}...)"
            )
        spans.append((start, len(prefix)))
    return text, spans


def tokenize_chat(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation, labels = ids inside assistant turns, -100 elsewhere.

    Whitespace the template puts after the end-of-turn token (a newline in many templates) lies
    inside the span and is trained on too: it is what the model must produce before the next turn.
    """
    text, spans = assistant_spans(messages, tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [IGNORE] * len(ids)
    for k, (start, _end) in enumerate(enc["offset_mapping"]):
        if any(a <= start < b for a, b in spans):
            labels[k] = ids[k]
    return ids, labels


def tokenize_records(records, tokenizer, max_seq_len: int, overlong: Literal["drop", "truncate"] = "drop",
                     source: str = "") -> tuple[list[TokenizedSample], dict]:
    out: list[TokenizedSample] = []
    report = {"source": source, "samples": 0, "dropped_overlong": 0, "truncated": 0, "no_loss_tokens": 0}
    for rec in records:
        ids, labels = tokenize_chat(rec["messages"], tokenizer)
        if len(ids) > max_seq_len:
            if overlong == "drop":
                report["dropped_overlong"] += 1
                continue
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            report["truncated"] += 1
        # The model predicts labels[1:] from ids[:-1]: a sample needs a label after its first token.
        if all(x == IGNORE for x in labels[1:]):
            report["no_loss_tokens"] += 1
            continue
        out.append(TokenizedSample(ids, labels))
    report["samples"] = len(out)
    return out, report


def _cache_key(data_path: Path, tokenizer, tokenizer_dir: Path, max_seq_len: int, overlong: str) -> str:
    h = hashlib.sha256(f"{CACHE_VERSION}|{max_seq_len}|{overlong}|{tokenizer.chat_template}".encode())
    h.update(Path(data_path).read_bytes())
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        f = Path(tokenizer_dir) / name
        if f.is_file():
            h.update(name.encode() + f.read_bytes())
    return h.hexdigest()[:20]


def load_tokenized(data_path: Path, tokenizer, tokenizer_dir: Path, max_seq_len: int,
                   overlong: Literal["drop", "truncate"] = "drop", cache_dir: Path | None = None,
                   on_error: Literal["raise", "skip"] = "raise") -> tuple[list[TokenizedSample], dict]:
    """Validated, tokenized samples of a chat JSONL file; the second call for the same inputs is a cache hit."""
    from labkit.catalog import load_jsonl
    from labkit.tiny import home

    data_path = Path(data_path)
    cache_dir = Path(cache_dir) if cache_dir else home() / "tokenized"
    path = cache_dir / f"{data_path.stem}-{_cache_key(data_path, tokenizer, tokenizer_dir, max_seq_len, overlong)}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            ids, labels, offsets = z["ids"], z["labels"], z["offsets"]
            report = {k: int(z[k]) for k in ("dropped_overlong", "truncated", "no_loss_tokens", "skipped")}
        samples = [TokenizedSample(ids[a:b].tolist(), labels[a:b].tolist()) for a, b in zip(offsets[:-1], offsets[1:])]
        return samples, {"source": str(data_path), "samples": len(samples), **report, "cached": True}

    records, load_report = load_jsonl(data_path, on_error=on_error)
    samples, report = tokenize_records(records, tokenizer, max_seq_len, overlong, source=str(data_path))
    report["skipped"] = load_report.skipped
    offsets = np.cumsum([0] + [len(s.input_ids) for s in samples])
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".npz.tmp")
    with os.fdopen(fd, "wb") as fh:
        np.savez(
            fh,
            ids=np.fromiter((t for s in samples for t in s.input_ids), dtype=np.int32),
            labels=np.fromiter((t for s in samples for t in s.labels), dtype=np.int32),
            offsets=offsets.astype(np.int64),
            **{k: np.int64(report[k]) for k in ("dropped_overlong", "truncated", "no_loss_tokens", "skipped")},
        )
    os.replace(tmp, path)  # concurrent ranks may race here: both write the same bytes
    return samples, {**report, "cached": False}
