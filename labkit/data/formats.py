"""One converter layer: every dataset format and container becomes chat records `{"messages": [...]}`.

Formats: `chat` (OpenAI messages; content may be a list of text parts), `sharegpt`
(conversations/from/value), `alpaca` (instruction/input/output), `prompt-completion` and `text`
(a single assistant turn: the whole text is trained, as the template frames it). Containers:
`.jsonl`, `.json`, `.parquet`, `.csv` files, a `datasets` `save_to_disk` directory, and a dataset
already in the local Hugging Face cache (`hf:owner/name`, read offline).

The `datasets` library reads json/parquet/csv/save_to_disk/hub data. JSONL is read line by line here
instead, because a bad line must be reported by its line number and be skippable (invalid UTF-8, a
record nested 100,000 deep, a 50 MB line), which a columnar reader cannot do: it fails the file.

A dataset card says the format and any mapping:

    format: sharegpt
    fields: {messages: conversations, role: from, content: value}
    roles: {human: user, gpt: assistant}
    split: train          # save_to_disk DatasetDicts and hub datasets
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from labkit.catalog import ROLES, Card, CatalogError, DataError, LoadReport

FORMATS = ("chat", "sharegpt", "alpaca", "prompt-completion", "text")
ALIASES = {"chat-jsonl": "chat", "messages": "chat", "openai": "chat", "prompt_completion": "prompt-completion",
           "completion": "prompt-completion", "plain": "text"}
DEFAULT_FIELDS: dict[str, dict[str, str]] = {
    "chat": {"messages": "messages", "role": "role", "content": "content"},
    "sharegpt": {"messages": "conversations", "role": "from", "content": "value"},
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output", "system": "system"},
    "prompt-completion": {"prompt": "prompt", "completion": "completion"},
    "text": {"text": "text"},
}
DEFAULT_ROLES = {"human": "user", "gpt": "assistant", "chatgpt": "assistant", "bot": "assistant",
                 "model": "assistant", "user": "user", "assistant": "assistant", "system": "system"}
FILE_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
HUB_PREFIX = "hf:"
# One record above this is refused before parsing it: no chat sample is 16 MB, and one such line
# otherwise costs minutes of tokenizing (and gigabytes) before being dropped as overlong.
MAX_RECORD_BYTES = 16 * 2**20
# A full pre-launch pass reads files up to this size; bigger ones are checked on their first records.
FULL_CHECK_BYTES = 256 * 2**20
SAMPLE_RECORDS = 20_000


class RecordProblem(ValueError):
    """Why one record cannot be converted; the message names the field."""


def format_of(card: Card) -> str:
    fmt = ALIASES.get(card.format, card.format)
    if fmt not in FORMATS:
        raise CatalogError(f"{card.card_file or card.path}: format {card.format!r} is not one of "
                           f"{', '.join(FORMATS)}")
    return fmt


def container(path: Path | str) -> str:
    """jsonl | json | parquet | csv | disk | hub, or a CatalogError saying what the path is instead."""
    s = str(path)
    if s.startswith(HUB_PREFIX):
        return "hub"
    p = Path(path)
    if p.is_dir():
        if any((p / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return "disk"
        raise CatalogError(f"{p} is a directory, not a data file (a datasets save_to_disk directory would hold "
                           "dataset_info.json or dataset_dict.json)")
    if not p.exists():
        raise CatalogError(f"{p}: no such data file")
    kind = FILE_KINDS.get(p.suffix.lower())
    if kind is None:
        raise CatalogError(f"{p}: unknown data file type {p.suffix!r} (expected one of {', '.join(FILE_KINDS)}, "
                           "a save_to_disk directory or hf:owner/name)")
    if p.stat().st_size == 0:
        raise CatalogError(f"{p}: the data file is empty (0 bytes)")
    return kind


# -- raw rows -----------------------------------------------------------------------------------------


def _check_str(s: str, where: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RecordProblem(f"{where}: holds {s[e.start]!r} at character {e.start}, a lone UTF-16 surrogate that "
                            "is not a character (the JSON has an unpaired \\ud800-\\udfff escape)") from None


def _jsonl_rows(path: Path, limit: int | None) -> Iterator[tuple[str, Any]]:
    """(where, parsed object or RecordProblem) per non-blank line."""
    n = 0
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            if len(raw) > MAX_RECORD_BYTES:
                yield where, RecordProblem(f"record is {len(raw) / 2**20:.1f} MB, over the "
                                           f"{MAX_RECORD_BYTES // 2**20} MB limit for one sample")
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, RecordProblem(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, RecordProblem(f"invalid JSON ({e.msg} at column {e.colno})")
                continue
            except RecursionError:
                yield where, RecordProblem("JSON nested too deeply to read (a record of chat messages is a few "
                                           "levels deep)")
                continue
            yield where, obj
            n += 1
            if limit is not None and n >= limit:
                return


@contextlib.contextmanager
def _offline():
    """Hub datasets are read from the local cache only: a missing one fails at once, not after timeouts."""
    import datasets

    old = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = old


def _hf_dataset(location: str, kind: str, split: str | None):
    import datasets

    try:
        if kind == "disk":
            ds = datasets.load_from_disk(location)
        elif kind == "hub":
            name = location[len(HUB_PREFIX):]
            with _offline():
                ds = datasets.load_dataset(name, split=split)
        else:
            ds = datasets.load_dataset(kind, data_files=str(location), split="train")
    except CatalogError:
        raise
    except Exception as e:  # datasets/pyarrow raise many types; the user needs the file and the cause
        hint = " (not in the local Hugging Face cache: load it once online first)" if kind == "hub" else ""
        raise CatalogError(f"{location}: cannot be read as {kind}{hint}: {type(e).__name__}: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        pick = split or ("train" if "train" in ds else names[0] if len(names) == 1 else None)
        if pick not in ds:
            raise CatalogError(f"{location}: holds splits {names}: set split: in the card")
        ds = ds[pick]
    return ds


def raw_rows(location: str | Path, split: str | None = None, limit: int | None = None) -> Iterator[tuple[str, Any]]:
    """(where, row or RecordProblem) of any container; `where` is `file:line` or `location[record n]`."""
    kind = container(location)
    if kind == "jsonl":
        yield from _jsonl_rows(Path(location), limit)
        return
    ds = _hf_dataset(str(location), kind, split)
    n = len(ds) if limit is None else min(limit, len(ds))
    for i, row in enumerate(ds.select(range(n)) if n < len(ds) else ds):
        yield f"{location}[record {i + 1}]", row


# -- one record -----------------------------------------------------------------------------------------


def _text(value: Any, where: str) -> str:
    """Message content as a string: a string, or OpenAI-style text parts joined."""
    if isinstance(value, list):
        parts = []
        for k, part in enumerate(value):
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RecordProblem(f"{where}[{k}]: only text parts can be trained on, got {kind!r}")
        value = "".join(parts)
    if not isinstance(value, str):
        raise RecordProblem(f"{where}: expected text, got {type(value).__name__}")
    _check_str(value, where)
    return value


def _messages(obj: dict, fields: dict[str, str], roles: dict[str, str]) -> list[dict]:
    key, role_key, content_key = fields["messages"], fields["role"], fields["content"]
    msgs = obj.get(key)
    if msgs is None:
        raise RecordProblem(f"missing '{key}'")
    if not isinstance(msgs, list) or not msgs:
        raise RecordProblem(f"'{key}' must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        where = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise RecordProblem(f"{where} must be an object with '{role_key}' and '{content_key}'")
        raw_role = m.get(role_key)
        role = roles.get(raw_role, raw_role) if isinstance(raw_role, str) else raw_role
        if role not in ROLES:
            raise RecordProblem(f"{where}: unknown role {raw_role!r} (expected one of {', '.join(ROLES)}"
                                + (", or map it with roles: in the card)" if roles is not DEFAULT_ROLES else ")"))
        content = _text(m.get(content_key), f"{where}.{content_key}")
        if not content.strip():
            raise RecordProblem(f"{where} ({role}): empty content")
        msg: dict[str, Any] = {"role": role, "content": content}
        if isinstance(m.get("reasoning_content"), str) and m["reasoning_content"].strip():
            _check_str(m["reasoning_content"], f"{where}.reasoning_content")
            msg["reasoning_content"] = m["reasoning_content"]
        if m.get("train") is not None:
            if not isinstance(m["train"], bool):
                raise RecordProblem(f"{where}.train must be true or false, got {m['train']!r}")
            msg["train"] = m["train"]
        out.append(msg)
    if not any(m["role"] == "assistant" for m in out) and not any(m.get("train") for m in out):
        raise RecordProblem("no assistant turn (nothing to train on)")
    return out


def _field(obj: dict, name: str, required: bool = True) -> str:
    if name not in obj or obj[name] is None:
        if required:
            raise RecordProblem(f"missing '{name}'")
        return ""
    value = obj[name]
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)  # CSV columns of numbers ("input": 4)
    return _text(value, name)


def convert(obj: Any, fmt: str, fields: dict[str, str] | None = None,
            roles: dict[str, str] | None = None) -> dict[str, Any]:
    """One raw record as `{"messages": [...]}` (string contents; `train`/`reasoning_content` kept)."""
    if not isinstance(obj, dict):
        raise RecordProblem(f"expected a JSON object, got {type(obj).__name__}")
    f = {**DEFAULT_FIELDS[fmt], **(fields or {})}
    if fmt in ("chat", "sharegpt"):
        msgs = _messages(obj, f, {**DEFAULT_ROLES, **(roles or {})} if roles else DEFAULT_ROLES)
        # Other fields stay (eval items carry their answers beside the messages).
        return {**{k: v for k, v in obj.items() if k != f["messages"]}, "messages": msgs}
    if fmt == "alpaca":
        instruction, extra = _field(obj, f["instruction"]), _field(obj, f["input"], required=False)
        output, system = _field(obj, f["output"]), _field(obj, f["system"], required=False)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        msgs = ([{"role": "system", "content": system}] if system.strip() else []) + [
            {"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    elif fmt == "prompt-completion":
        msgs = [{"role": "user", "content": _field(obj, f["prompt"])},
                {"role": "assistant", "content": _field(obj, f["completion"])}]
    else:
        msgs = [{"role": "assistant", "content": _field(obj, f["text"])}]
    for m in msgs:
        if not m["content"].strip():
            raise RecordProblem(f"empty {m['role']} text")
    return {"messages": msgs}


def guess_format(obj: Any) -> tuple[str, dict[str, str]] | None:
    """(format, field mapping) a record looks like, or None."""
    if not isinstance(obj, dict):
        return None
    for key in ("messages", "conversations"):
        msgs = obj.get(key)
        if isinstance(msgs, list) and msgs and isinstance(msgs[0], dict):
            if "from" in msgs[0] and "value" in msgs[0]:
                return "sharegpt", ({} if key == "conversations" else {"messages": key})
            if "role" in msgs[0]:
                return "chat", ({} if key == "messages" else {"messages": key})
    if "instruction" in obj and "output" in obj:
        return "alpaca", {}
    if "prompt" in obj and ("completion" in obj or "response" in obj):
        return "prompt-completion", ({} if "completion" in obj else {"completion": "response"})
    if "text" in obj:
        return "text", {}
    return None


def _hint(obj: Any, fmt: str) -> str:
    guess = guess_format(obj)
    if guess is None or guess[0] == fmt:
        return ""
    extra = f" and fields: {guess[1]}" if guess[1] else ""
    return f" (looks like {guess[0]}: set format: {guess[0]}{extra} in the dataset card)"


# -- datasets ---------------------------------------------------------------------------------------


def iter_records(card: Card, on_error: Literal["raise", "skip"] = "raise", limit: int | None = None,
                 report: LoadReport | None = None) -> Iterator[dict[str, Any]]:
    """Normalized records of a dataset card; bad records raise DataError (file, record, field) or are counted."""
    fmt = format_of(card)
    fields, roles = card.extra.get("fields") or {}, card.extra.get("roles") or {}
    report = report if report is not None else LoadReport(str(card.path))
    for where, row in raw_rows(card.path, card.extra.get("split"), limit):
        try:
            if isinstance(row, RecordProblem):
                raise row
            rec = convert(row, fmt, fields, roles)
        except RecordProblem as e:
            problem = str(e) + (_hint(row, fmt) if not isinstance(row, RecordProblem) else "")
            if on_error == "raise":
                raise DataError(*_split_where(where), problem) from None
            report.skipped += 1
            report.problems.append(f"{where}: {problem}")
            continue
        rec["_where"] = where
        report.loaded += 1
        yield rec


def _split_where(where: str) -> tuple[str, int | str]:
    """`file:line` or `location[record n]` as DataError's (path, line)."""
    if where.endswith("]") and "[record " in where:
        path, _, n = where[:-1].rpartition("[record ")
        return path, f"record {n}"
    path, _, line = where.rpartition(":")
    return path, int(line)


def read(dataset: str | Path | Card, on_error: Literal["raise", "skip"] = "raise",
         limit: int | None = None) -> tuple[list[dict[str, Any]], LoadReport]:
    """All normalized records of a catalog name, a path or a card, and a report of what was skipped.

    A dataset with no usable record at all is an error even with `on_error="skip"`.
    """
    from labkit import catalog

    card = dataset if isinstance(dataset, Card) else catalog.resolve(str(dataset))
    report = LoadReport(str(card.path))
    records = list(iter_records(card, on_error, limit, report))
    if not records:
        first = f"; first problem: {report.problems[0]}" if report.problems else ""
        raise CatalogError(f"{card.path}: holds no usable records ({report.skipped} skipped{first})")
    return records, report


def check(dataset: str | Path | Card, on_error: Literal["raise", "skip"] = "raise") -> str:
    """Read a dataset through the converter before launch; a line saying what was checked.

    Files up to FULL_CHECK_BYTES (and every save_to_disk / hub dataset) are read in full; bigger
    files are checked on their first SAMPLE_RECORDS records, and the line says so.
    """
    from labkit import catalog

    card = dataset if isinstance(dataset, Card) else catalog.resolve(str(dataset))
    path = card.path
    big = not str(path).startswith(HUB_PREFIX) and Path(path).is_file() and Path(path).stat().st_size > FULL_CHECK_BYTES
    records, report = read(card, on_error, SAMPLE_RECORDS if big else None)
    what = f"first {len(records)} records checked (file over {FULL_CHECK_BYTES // 2**20} MB)" if big else str(report)
    return f"{card.name}: {what}"


def sniff(location: str | Path, rows: int = 50) -> dict[str, Any]:
    """What a data file or directory holds: {'format', 'fields'?, 'samples'?} (for `labkit data add`)."""
    seen: dict[str, int] = {}
    guess = None
    for _, row in raw_rows(location, limit=rows):
        if isinstance(row, RecordProblem):
            continue
        g = guess_format(row)
        if g:
            seen[g[0]] = seen.get(g[0], 0) + 1
            guess = guess or g
    if not seen:
        raise CatalogError(f"{location}: cannot tell its format from its first {rows} records (expected "
                           "messages, conversations, instruction/output, prompt/completion or text fields)")
    fmt = max(seen, key=seen.get)
    out: dict[str, Any] = {"format": fmt}
    if guess and guess[0] == fmt and guess[1]:
        out["fields"] = guess[1]
    return out
