"""Chat samples to token ids with assistant-only labels (stored on disk by `labkit.data.tokenstore`).

Labels come from where the template puts each message, found with placeholders, not from
template-specific markers, so any chat template works (Llama-3, Qwen2.5/3, Mistral, Gemma, Phi,
Granite, DeepSeek-R1, the tiny one). Each conversation is rendered ONCE with every message's content
replaced by a unique placeholder; the placeholders show where each content landed, whatever the
template does around it (drops reasoning from earlier turns, moves the system prompt into the last
user turn, appends an end-of-text token, opens a think block in the generation prompt, trims).
Strategy "placeholder": one render per conversation, where the older prefix method needed 1 + 2k
renders for k assistant turns and refused every template whose prefixes are not prefixes.

Labelled: each trained message's content as the template writes it (trimmed if it trims), the
reasoning block when reasoning is kept, and the end-of-turn token the template writes after it (the
first special token after the content). Not labelled: headers, the template's empty think block,
and whatever follows the end-of-turn token (the newline after `<|im_end|>`, an end-of-text token
after the last turn): generation stops at the end-of-turn token, so the model never produces them.

Tokens are those inference sees: the text is cut at each reply's start and end and at the template's
own special tokens, and each piece is tokenized alone, so a reply's leading whitespace never merges
with the header's newline (at inference the prompt is tokenized alone and the reply starts a new
token). Message content is tokenized as text with special-token splitting: `<|im_end|>` typed by a
user stays text; only the template's own markers become control tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

IGNORE = -100
# Bumped whenever the labels of a given (record, tokenizer, options) change; part of the cache key.
LABELS_VERSION = 3

Reasoning = Literal["keep", "drop", "template"]
TrainOn = Literal["assistant", "last_assistant", "all"]
REASONING = ("keep", "drop", "template")
TRAIN_ON = ("assistant", "last_assistant", "all")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# Private-use code points: no template writes them and no real text has them.
_PH_OPEN, _PH_CLOSE = "\ue000", "\ue001"
_PH_RE = re.compile("\ue000([cr])(\\d+)\ue001")
_THINK_RE = re.compile(r"^\s*<think>(.*?)</think>\s*", re.S)
STRATEGY = "placeholder"
# An end-of-turn marker written as text: `<|eot_id|>`, `<｜end▁of▁sentence｜>`, `</s>`, else up to whitespace.
_TEXT_MARK = re.compile(r"<\|[^|]*\|>|<｜[^｜]*｜>|<[^<>\s]+>|[^\s\ue000]+")


@dataclass
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]


class TemplateError(ValueError):
    """A chat template (or a conversation it rejects) for which assistant turns cannot be labelled."""


def _ph(kind: str, j: int) -> str:
    return f"{_PH_OPEN}{kind}{j}{_PH_CLOSE}"


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    import jinja2

    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            "the tokenizer has no chat template (a base model?): set chat_template in the run config "
            "(or --chat-template): chatml, llama3, granite or a .jinja file")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except jinja2.TemplateError as e:
        raise TemplateError(f"the chat template rejects this conversation: {e}") from None


# -- per-template analysis (a few renders, once per tokenizer and template) -------------------------


@dataclass(frozen=True)
class Analysis:
    """What labelling needs to know about one tokenizer + template, found by probing it."""

    special_re: re.Pattern | None  # the tokenizer's special tokens (control tokens when the template writes them)
    transforms: dict[str, str]  # role -> "none" | "strip" | "lstrip" | "rstrip": what the template does to content
    gen_opens_think: bool  # the generation prompt opens a think block (DeepSeek-R1 style)
    end_of_turn: str | None  # the special token the template writes after an assistant reply
    max_token_chars: int  # longest vocabulary entry: a lower bound on tokens is chars / this


_ANALYSES: dict[tuple, Analysis] = {}


def _special_tokens(tokenizer) -> list[str]:
    out = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(tok, "special", False):
            out.add(str(tok.content))
    return sorted((t for t in out if t), key=len, reverse=True)


def _transform(rendered: str, ph: str) -> str:
    i = rendered.find(ph)
    if i < 0:
        return "none"
    lead, trail = rendered[:i].endswith(" \n"), rendered[i + len(ph):].startswith(" \n")
    return {(True, True): "none", (False, False): "strip", (False, True): "lstrip", (True, False): "rstrip"}[
        (lead, trail)]


def _apply(transform: str, text: str) -> str:
    return {"none": text, "strip": text.strip(), "lstrip": text.lstrip(), "rstrip": text.rstrip()}[transform]


def analyse(tokenizer) -> Analysis:
    """Probe the tokenizer's chat template (cached per template and special-token set)."""
    if not getattr(tokenizer, "chat_template", None):
        _render(tokenizer, [])  # raises: no chat template, say how to set one
    specials = _special_tokens(tokenizer)
    key = (str(getattr(tokenizer, "chat_template", "")), tuple(specials), len(tokenizer))
    if key in _ANALYSES:
        return _ANALYSES[key]
    special_re = re.compile("|".join(map(re.escape, specials))) if specials else None
    pad = " \n"
    transforms = {}
    probes = {
        "user": [{"role": "user", "content": pad + _ph("c", 0) + pad}, {"role": "assistant", "content": "a"}],
        "assistant": [{"role": "user", "content": "u"}, {"role": "assistant", "content": pad + _ph("c", 1) + pad}],
        "system": [{"role": "system", "content": pad + _ph("c", 0) + pad}, {"role": "user", "content": "u"},
                   {"role": "assistant", "content": "a"}],
    }
    for role, msgs in probes.items():
        try:
            transforms[role] = _transform(_render(tokenizer, msgs), msgs[0 if role != "assistant" else 1]["content"]
                                          .strip())
        except TemplateError:
            transforms[role] = "none"  # the template rejects this role; conversations with it are refused later
    one = [{"role": "user", "content": _ph("c", 0)}]
    try:
        with_gen = _render(tokenizer, one, generation_prompt=True)
        gen_tail = with_gen[with_gen.find(_ph("c", 0)) + len(_ph("c", 0)):]
        gen_opens_think = THINK_OPEN in gen_tail and THINK_CLOSE not in gen_tail.split(THINK_OPEN)[-1]
    except TemplateError:
        gen_opens_think = False
    end = None
    try:
        text = _render(tokenizer, [{"role": "user", "content": "u"}, {"role": "assistant", "content": _ph("c", 1)}])
        after = text[text.find(_ph("c", 1)) + len(_ph("c", 1)):]
        m = special_re.search(after) if special_re else None
        end = m.group(0) if m else None
    except TemplateError:
        pass
    vocab = tokenizer.get_vocab()
    a = Analysis(special_re, transforms, gen_opens_think, end, max(map(len, vocab)) if vocab else 1)
    _ANALYSES[key] = a
    return a


def end_of_turn(tokenizer) -> str | None:
    """The special token the chat template writes after an assistant reply (generation should stop there)."""
    return analyse(tokenizer).end_of_turn


# -- one conversation -------------------------------------------------------------------------------


def split_reasoning(message: dict) -> tuple[str | None, str]:
    """(reasoning, answer) of an assistant message: a `reasoning_content` field or a leading <think> block."""
    content = message["content"]
    if isinstance(message.get("reasoning_content"), str) and message["reasoning_content"].strip():
        return message["reasoning_content"].strip("\n"), content
    m = _THINK_RE.match(content)
    if m:
        return m.group(1).strip("\n"), content[m.end():]
    return None, content


def _trained(messages: list[dict], train_on: str) -> list[bool]:
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    out = []
    for i, m in enumerate(messages):
        default = (train_on == "all" or (m["role"] == "assistant" and (train_on == "assistant" or i == last)))
        out.append(bool(m["train"]) if isinstance(m.get("train"), bool) else default)
    return out


@dataclass
class Layout:
    """A rendered conversation as pieces to tokenize: (text, is_control_token, labelled), in order."""

    pieces: list[tuple[str, bool, bool]]
    labelled_turns: int
    reasoning_kept: int
    reasoning_dropped: int
    reasoning_restored: int = 0  # kept although the template drops it (reasoning: keep, earlier turns)


def layout(messages: list[dict], tokenizer, reasoning: str = "keep", train_on: str = "assistant",
           analysis: Analysis | None = None) -> Layout:
    """Render once with placeholders; cut the text at control tokens and at each labelled span's ends."""
    if reasoning not in REASONING:
        raise ValueError(f"reasoning must be one of {REASONING}, got {reasoning!r}")
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
    an = analysis or analyse(tokenizer)
    trained = _trained(messages, train_on)
    ph_msgs, subst, thoughts = [], {}, {}
    dropped = 0  # reasoning blocks left out by reasoning="drop" (counted here, where they are split off)
    for j, m in enumerate(messages):
        content = m["content"]
        if _PH_OPEN in content or _PH_CLOSE in content:
            raise TemplateError(f"messages[{j}] holds the private-use characters U+E000/U+E001 labkit reserves")
        r = None
        if m["role"] == "assistant":
            r, content = split_reasoning(m)
            if reasoning == "drop":
                dropped += r is not None
                r = None
        subst[_ph("c", j)] = _apply(an.transforms.get(m["role"], "none"), content)
        ph = _ph("c", j)
        if r is not None:
            thoughts[j] = r
            subst[_ph("r", j)] = r
            ph = f"{THINK_OPEN}\n{_ph('r', j)}\n{THINK_CLOSE}\n\n{ph}"
        ph_msgs.append({"role": m["role"], "content": ph})
    text = _render(tokenizer, ph_msgs)

    # Split into fixed template text and placeholders.
    segs: list[tuple[str, str | None]] = []  # (text, placeholder or None)
    pos, seen = 0, set()
    for mt in _PH_RE.finditer(text):
        if mt.start() > pos:
            segs.append((text[pos:mt.start()], None))
        if mt.group(0) in seen and mt.group(1) == "c" and trained[int(mt.group(2))]:
            raise TemplateError(f"the template writes the content of messages[{mt.group(2)}] twice")
        seen.add(mt.group(0))
        segs.append((mt.group(0), mt.group(0)))
        pos = mt.end()
    if pos < len(text):
        segs.append((text[pos:], None))
    kept = restored = 0
    for j, r in thoughts.items():
        if _ph("r", j) in seen:
            kept += 1
        elif reasoning == "keep":
            # The template dropped this turn's reasoning (earlier turns, usually): put it back as written.
            subst[_ph("c", j)] = f"{THINK_OPEN}\n{r}\n{THINK_CLOSE}\n\n" + subst[_ph("c", j)]
            kept += 1
            restored += 1
        else:
            dropped += 1

    # Pieces: fixed text split at special tokens (controls), content as text.
    pieces: list[list] = []  # [text, is_control, labelled, placeholder]
    for s, ph in segs:
        if ph is not None:
            pieces.append([subst[ph], False, False, ph])
            continue
        i = 0
        for ms in (an.special_re.finditer(s) if an.special_re else ()):
            pieces.extend(_text_pieces(s[i:ms.start()]))
            pieces.append([ms.group(0), True, False, None])
            i = ms.end()
        pieces.extend(_text_pieces(s[i:]))

    labelled_turns = 0
    where = {p[3]: k for k, p in enumerate(pieces) if p[3]}
    for j, m in enumerate(messages):
        if not trained[j] or train_on == "all":
            continue
        c = where.get(_ph("c", j))
        if c is None:
            raise TemplateError(f"the template does not write the content of messages[{j}] ({m['role']})")
        start = c
        r = where.get(_ph("r", j))
        if r is not None:
            start = min(r, c)
            # The template's opening <think> is the model's to write, unless the generation prompt wrote it.
            prev = pieces[start - 1] if start else None
            if not an.gen_opens_think and prev and not prev[1] and prev[0].startswith(THINK_OPEN):
                start -= 1
        end, after = None, max(c, r if r is not None else c) + 1
        for k in range(after, len(pieces)):
            if pieces[k][1]:
                end = k
                break
            if pieces[k][3]:
                break
        if end is None and after < len(pieces) and not pieces[after][3] and \
                (mark := _TEXT_MARK.match(pieces[after][0])):
            # An end marker the tokenizer has no token for (a template set without its tokens):
            # train it as text.
            rest = pieces[after][0][mark.end():]
            pieces[after:after + 1] = [[mark.group(0), False, False, None]] + ([[rest, False, False, None]] if rest
                                                                                   else [])
            where = {p[3]: k for k, p in enumerate(pieces) if p[3]}
            end = after
        if end is None:
            raise TemplateError(
                f"the template writes no end-of-turn token after {m['role']} content, so a fine-tuned model "
                "would not learn to stop; use a template that ends each turn with a special token "
                "(e.g. chat_template: chatml)")
        for k in range(start, end + 1):
            pieces[k][2] = True
        labelled_turns += 1
    if train_on == "all":
        for p in pieces:
            p[2] = True
        labelled_turns = sum(trained)
    # Neighbouring text of the same label is one piece: the prompt is tokenized as inference tokenizes it
    # (a header's newline with the user's text), and only reply starts and ends cut the text.
    merged: list[tuple[str, bool, bool]] = []
    for text_, control, lab in ((p[0], p[1], p[2]) for p in pieces if p[0]):
        if merged and not control and not merged[-1][1] and merged[-1][2] == lab:
            merged[-1] = (merged[-1][0] + text_, False, lab)
        else:
            merged.append((text_, control, lab))
    return Layout(merged, labelled_turns, kept, dropped, restored)


def _text_pieces(s: str) -> list[list]:
    """Fixed template text as pieces, cut before each <think> (a reply may start there)."""
    parts = s.split(THINK_OPEN)
    out = [[parts[0], False, False, None]] if parts[0] else []
    out.extend([THINK_OPEN + p, False, False, None] for p in parts[1:])
    return out


def _encode_text(texts: list[str], tokenizer) -> list[list[int]]:
    """Ids of each text, special-token strings in it tokenized as text (split_special_tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_special_tokens"):
        return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    # The Rust tokenizer directly: transformers' per-encoding conversion to dicts cost more than encoding.
    old = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    finally:
        backend.encode_special_tokens = old


def _encode_layouts(layouts: list[Layout], tokenizer) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels of each layout: text pieces in one batched call, controls by id."""
    texts = [p[0] for lay in layouts for p in lay.pieces if not p[1]]
    enc = _encode_text(texts, tokenizer) if texts else []
    control_ids: dict[str, int] = {}
    out, t = [], 0
    for lay in layouts:
        ids: list[int] = []
        labels: list[int] = []
        for piece, control, lab in lay.pieces:
            if control:
                if piece not in control_ids:
                    control_ids[piece] = tokenizer.convert_tokens_to_ids(piece)
                part = [control_ids[piece]]
            else:
                part = enc[t]
                t += 1
            ids.extend(part)
            labels.extend(part if lab else [IGNORE] * len(part))
        out.append((ids, labels))
    return out


def tokenize_chat(messages: list[dict], tokenizer, reasoning: Reasoning = "keep",
                  train_on: TrainOn = "assistant") -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation; labels are the ids of trained turns, -100 elsewhere."""
    return _encode_layouts([layout(messages, tokenizer, reasoning, train_on)], tokenizer)[0]


def _total_chars(messages: list[dict]) -> int:
    return sum(len(m["content"]) + len(m.get("reasoning_content") or "") for m in messages)


def tokenize_records(records, tokenizer, max_seq_len: int, overlong: Literal["drop", "truncate"] = "drop",
                     source: str = "", batch_size: int = 512, *, reasoning: Reasoning = "keep",
                     train_on: TrainOn = "assistant",
                     on_error: Literal["raise", "skip"] = "raise") -> tuple[list[TokenizedSample], dict]:
    """Tokenized samples of chat records (dicts with `messages`) and a report of what was left out.

    Samples longer than `max_seq_len` are dropped or truncated (a sample whose text is surely longer,
    by its character count, is dropped or cut before tokenizing it: a 50 MB line costs nothing);
    samples left with no label to predict (labels after the first token, as the model shifts them)
    are dropped and counted. A conversation the template rejects raises TemplateError naming the
    record, or is counted in `rejected` with `on_error="skip"`.
    """
    if overlong not in ("drop", "truncate"):
        raise ValueError(f"overlong must be 'drop' or 'truncate', got {overlong!r}")
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
    an = analyse(tokenizer)
    # No token covers more than max_token_chars characters, so text this long has > 2x max_seq_len tokens.
    char_limit = 2 * max_seq_len * an.max_token_chars
    out: list[TokenizedSample] = []
    report: dict[str, Any] = {
        "source": source, "samples": 0, "dropped_overlong": 0, "truncated": 0, "no_loss_tokens": 0,
        "rejected": 0, "strategy": STRATEGY, "reasoning": reasoning, "train_on": train_on,
        "reasoning_kept": 0, "reasoning_dropped": 0, "reasoning_restored": 0, "labelled_turns": 0, "turns_with_end": 0,
        "end_of_turn": an.end_of_turn, "problems": []}
    end_id = tokenizer.convert_tokens_to_ids(an.end_of_turn) if an.end_of_turn else None
    records = list(records)
    for lo in range(0, len(records), batch_size):
        lays = []
        for k, r in enumerate(records[lo: lo + batch_size], start=lo):
            cut = _total_chars(r["messages"]) > char_limit
            if cut and overlong == "drop":
                report["dropped_overlong"] += 1
                continue
            try:
                lay = layout(r["messages"], tokenizer, reasoning, train_on, an)
            except TemplateError as e:
                where = r.get("_where") or f"{source or 'records'}: record {k + 1}"
                if on_error == "raise":
                    raise TemplateError(f"{where}: {e}") from None
                report["rejected"] += 1
                report["problems"].append(f"{where}: {e}")
                continue
            if cut:
                lay.pieces = _cut_pieces(lay.pieces, char_limit)
            report["reasoning_kept"] += lay.reasoning_kept
            report["reasoning_restored"] += lay.reasoning_restored
            report["reasoning_dropped"] += lay.reasoning_dropped
            lays.append(lay)
        for lay, (ids, labels) in zip(lays, _encode_layouts(lays, tokenizer)):
            if len(ids) > max_seq_len:
                if overlong == "drop":
                    report["dropped_overlong"] += 1
                    continue
                ids, labels = ids[:max_seq_len], labels[:max_seq_len]
                report["truncated"] += 1
            if all(x == IGNORE for x in labels[1:]):
                report["no_loss_tokens"] += 1
                continue
            report["labelled_turns"] += lay.labelled_turns
            if end_id is not None:
                report["turns_with_end"] += sum(1 for x in labels if x == end_id)
            out.append(TokenizedSample(list(ids), labels))
    report["samples"] = len(out)
    return out, report


def _cut_pieces(pieces: list[tuple[str, bool, bool]], limit: int) -> list[tuple[str, bool, bool]]:
    out, n = [], 0
    for text, control, lab in pieces:
        if n + len(text) > limit:
            if not control:
                out.append((text[: limit - n], control, lab))
            break
        out.append((text, control, lab))
        n += len(text)
    return out
