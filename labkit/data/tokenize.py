"""Chat samples to token ids with assistant-only labels, cached on disk.

Labels come from character spans, not from template-specific markers, so any chat template works
(Llama-3, Qwen, the tiny one). Assistant turn i spans from the end of the rendered prompt
`messages[:i]` + generation prompt to the end of the rendered `messages[:i+1]`; a token is
labelled when its first character lies inside a span. This needs the template to render a
conversation's prefixes as prefixes of the whole, which is checked (a clear error otherwise).

Choice: whitespace the template writes after the end-of-turn token (the newline after `<|end|>`
or `<|im_end|>`) is NOT labelled: generation stops at the end token, so the model never produces
what follows it. Labelled tokens are exactly the assistant content and its end-of-turn token.
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
CACHE_VERSION = 2
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json")
REPORT_KEYS = ("dropped_overlong", "truncated", "no_loss_tokens", "skipped")


@dataclass
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]


class TemplateError(ValueError):
    """A chat template whose renderings cannot locate the assistant turns."""


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _prefix_error(tokenizer, what: str) -> TemplateError:
    return TemplateError(
        f"the chat template renders {what} differently from the start of the whole conversation, so "
        "assistant turns cannot be located for assistant-only labels (template starts "
        f"{(tokenizer.chat_template or '')[:80]!r}); use a template whose rendering of a conversation's "
        "first turns is a prefix of the rendering of the whole conversation"
    )


def assistant_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans `[start, end)` of its assistant turns."""
    text = _render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        turn = _render(tokenizer, messages[: i + 1])
        if not text.startswith(turn):
            raise _prefix_error(tokenizer, f"messages[:{i + 1}]")
        if i:
            prompt = _render(tokenizer, messages[:i], generation_prompt=True)
            if not text.startswith(prompt):
                raise _prefix_error(tokenizer, f"messages[:{i}] with the generation prompt")
            start = len(prompt)
        else:
            # Templates refuse to render an empty conversation: locate the opening reply by its content.
            start = max(turn.find(m["content"]), 0)
        end = len(turn.rstrip())  # see the module docstring: whitespace after the end token is not trained
        if end > start:
            spans.append((start, end))
    return text, spans


def _labels(ids: list[int], offsets, spans: list[tuple[int, int]]) -> list[int]:
    starts = np.fromiter((a for a, _ in offsets), dtype=np.int64, count=len(ids))
    inside = np.zeros(len(ids), dtype=bool)
    for a, b in spans:
        inside |= (starts >= a) & (starts < b)
    return np.where(inside, np.asarray(ids, dtype=np.int64), IGNORE).tolist()


def tokenize_chat(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation; labels are the ids inside assistant turns, -100 elsewhere."""
    text, spans = assistant_spans(messages, tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], _labels(enc["input_ids"], enc["offset_mapping"], spans)


def tokenize_records(records, tokenizer, max_seq_len: int, overlong: Literal["drop", "truncate"] = "drop",
                     source: str = "", batch_size: int = 512) -> tuple[list[TokenizedSample], dict]:
    """Tokenized samples of chat records (dicts with `messages`) and a report of what was left out.

    Samples longer than `max_seq_len` are dropped or truncated; samples left with no label to
    predict (labels after the first token, as the model shifts them) are dropped and counted.
    """
    if overlong not in ("drop", "truncate"):
        raise ValueError(f"overlong must be 'drop' or 'truncate', got {overlong!r}")
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
    out: list[TokenizedSample] = []
    report = {"source": source, "samples": 0, "dropped_overlong": 0, "truncated": 0, "no_loss_tokens": 0}
    records = list(records)
    for lo in range(0, len(records), batch_size):
        rendered = [assistant_spans(r["messages"], tokenizer) for r in records[lo : lo + batch_size]]
        # One batched call: fast tokenizers encode a batch in Rust.
        enc = tokenizer([t for t, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
        for ids, offsets, (_, spans) in zip(enc["input_ids"], enc["offset_mapping"], rendered):
            labels = _labels(ids, offsets, spans)
            if len(ids) > max_seq_len:
                if overlong == "drop":
                    report["dropped_overlong"] += 1
                    continue
                ids, labels = ids[:max_seq_len], labels[:max_seq_len]
                report["truncated"] += 1
            if all(x == IGNORE for x in labels[1:]):
                report["no_loss_tokens"] += 1
                continue
            out.append(TokenizedSample(list(ids), labels))
    report["samples"] = len(out)
    return out, report


def cache_key(data_path: Path, tokenizer, tokenizer_dir: Path, max_seq_len: int, overlong: str,
              on_error: str = "raise") -> str:
    """Hash of everything the tokenized samples depend on."""
    h = hashlib.sha256(f"{CACHE_VERSION}|{max_seq_len}|{overlong}|{on_error}|".encode())
    h.update((tokenizer.chat_template or "").encode() if isinstance(tokenizer.chat_template, str)
             else repr(tokenizer.chat_template).encode())
    h.update(Path(data_path).read_bytes())
    for name in TOKENIZER_FILES:
        f = Path(tokenizer_dir) / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:20]


def _read_cache(path: Path) -> tuple[list[TokenizedSample], dict]:
    with np.load(path, allow_pickle=False) as z:
        ids, labels, offsets = z["ids"].tolist(), z["labels"].tolist(), z["offsets"].tolist()
        report = {k: int(z[k]) for k in REPORT_KEYS}
    samples = [TokenizedSample(ids[a:b], labels[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
    return samples, report


def _write_cache(path: Path, samples: list[TokenizedSample], report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    offsets = np.cumsum([0] + [len(s.input_ids) for s in samples], dtype=np.int64)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(
                fh,
                ids=np.fromiter((t for s in samples for t in s.input_ids), dtype=np.int32, count=int(offsets[-1])),
                labels=np.fromiter((t for s in samples for t in s.labels), dtype=np.int32, count=int(offsets[-1])),
                offsets=offsets,
                **{k: np.int64(report[k]) for k in REPORT_KEYS},
            )
        # Ranks and processes racing here write identical bytes; readers see a whole file or none.
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tokenized(data_path: Path, tokenizer, tokenizer_dir: Path, max_seq_len: int,
                   overlong: Literal["drop", "truncate"] = "drop", cache_dir: Path | None = None,
                   on_error: Literal["raise", "skip"] = "raise") -> tuple[list[TokenizedSample], dict]:
    """Validated, tokenized samples of a chat JSONL file, cached: the second call for the same inputs
    (data bytes, tokenizer files, chat template, max_seq_len, overlong) loads the cache.

    The report holds `source`, `samples`, `dropped_overlong`, `truncated`, `no_loss_tokens`,
    `skipped` (bad lines, with `on_error="skip"`) and `cached`.
    """
    from labkit.catalog import load_jsonl
    from labkit.tiny import home

    data_path = Path(data_path)
    cache_dir = Path(cache_dir) if cache_dir is not None else home() / "tokenized"
    key = cache_key(data_path, tokenizer, tokenizer_dir, max_seq_len, overlong, on_error)
    path = cache_dir / f"{data_path.stem}-{key}.npz"
    if path.is_file():
        try:
            samples, report = _read_cache(path)
            return samples, {"source": str(data_path), "samples": len(samples), **report, "cached": True}
        except (OSError, KeyError, ValueError):
            pass  # an unreadable cache file is rebuilt below

    records, load_report = load_jsonl(data_path, on_error=on_error)
    samples, report = tokenize_records(records, tokenizer, max_seq_len, overlong, source=str(data_path))
    report["skipped"] = load_report.skipped
    _write_cache(path, samples, report)
    return samples, {**report, "cached": False}
