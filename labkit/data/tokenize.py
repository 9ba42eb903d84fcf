"""Chat samples to token ids with assistant-only labels (stored on disk by `labkit.data.tokenstore`).

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

from dataclasses import dataclass
from typing import Literal

import numpy as np

IGNORE = -100


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


def __getattr__(name: str):
    # Transitional: `load_tokenized` moved to labkit.data.tokenstore (which imports this module, so
    # it is re-exported lazily). Remove once nothing imports it from here.
    if name == "load_tokenized":
        from labkit.data.tokenstore import load_tokenized

        return load_tokenized
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
