"""The data catalog: YAML dataset cards pointing at chat-format JSONL files.

A card names a dataset so configs can say `datasets: [knowledge]` instead of a path;
a plain path to a `.jsonl` file works too. Loading validates every line and names the
file and line of anything wrong.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

ROLES = ("system", "user", "assistant")
KINDS = ("knowledge", "skills", "eval", "other")
CARD_FIELDS = ("name", "path", "kind", "format", "license", "description", "samples")


class CatalogError(ValueError):
    """A dataset or card that cannot be used."""


class DataError(CatalogError):
    """A bad line in a chat JSONL file; the message names file and line."""

    def __init__(self, path: Path | str, line: int, problem: str):
        self.path, self.line, self.problem = str(path), line, problem
        super().__init__(f"{path}:{line}: {problem}")


@dataclass(frozen=True)
class Card:
    name: str
    path: Path
    kind: str = "other"
    format: str = "chat-jsonl"
    license: str = "unknown"
    description: str = ""
    samples: int | None = None
    card_file: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadReport:
    path: str
    loaded: int = 0
    skipped: int = 0
    problems: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        s = f"{self.path}: {self.loaded} samples"
        return s + (f", {self.skipped} skipped" if self.skipped else "")


def catalog_dir() -> Path:
    """`$LABKIT_CATALOG`, else `./data_catalog`, else the one shipped beside the package."""
    if env := os.environ.get("LABKIT_CATALOG"):
        return Path(env)
    here = Path.cwd() / "data_catalog"
    return here if here.is_dir() else Path(__file__).resolve().parent.parent / "data_catalog"


def read_card(card_file: Path) -> Card:
    try:
        data = yaml.safe_load(card_file.read_text())
    except yaml.YAMLError as e:
        raise CatalogError(f"{card_file}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise CatalogError(f"{card_file}: a dataset card must be a YAML mapping")
    for key in ("name", "path"):
        if not data.get(key):
            raise CatalogError(f"{card_file}: missing field '{key}'")
    kind = data.get("kind", "other")
    if kind not in KINDS:
        raise CatalogError(f"{card_file}: field 'kind' must be one of {KINDS}, got {kind!r}")
    path = Path(data["path"])
    if not path.is_absolute():
        path = card_file.parent / path
    extra = {k: v for k, v in data.items() if k not in CARD_FIELDS}
    return Card(
        name=str(data["name"]),
        path=path,
        kind=kind,
        format=data.get("format", "chat-jsonl"),
        license=data.get("license", "unknown"),
        description=data.get("description", ""),
        samples=data.get("samples"),
        card_file=card_file,
        extra=extra,
    )


def cards(directory: Path | None = None) -> dict[str, Card]:
    """All cards in the catalog, by name."""
    directory = directory or catalog_dir()
    out: dict[str, Card] = {}
    for f in sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml")):
        card = read_card(f)
        if card.name in out:
            raise CatalogError(f"{f}: dataset name {card.name!r} is already used by {out[card.name].card_file}")
        out[card.name] = card
    return out


def resolve(name_or_path: str, directory: Path | None = None) -> Card:
    """A catalog name, or a path to a chat JSONL file, as a Card."""
    p = Path(name_or_path).expanduser()
    if p.suffix in (".jsonl", ".json") or os.sep in name_or_path:
        if not p.is_file():
            raise CatalogError(f"{name_or_path!r}: no such data file")
        return Card(name=p.stem, path=p)
    known = cards(directory)
    if name_or_path not in known:
        raise CatalogError(
            f"{name_or_path!r} is not in the data catalog ({catalog_dir() if directory is None else directory}); "
            f"known: {', '.join(sorted(known)) or 'none'}"
        )
    card = known[name_or_path]
    if not card.path.is_file():
        raise CatalogError(f"{card.card_file}: data file {card.path} does not exist")
    return card


def validate_record(obj: Any) -> str | None:
    """Why a parsed JSON line is not a usable chat sample, or None if it is."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    msgs = obj.get("messages")
    if msgs is None:
        return "missing 'messages'"
    if not isinstance(msgs, list) or not msgs:
        return "'messages' must be a non-empty list"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            return f"messages[{i}] must be an object with 'role' and 'content'"
        role = m.get("role")
        if role not in ROLES:
            return f"messages[{i}]: unknown role {role!r} (expected one of {', '.join(ROLES)})"
        content = m.get("content")
        if not isinstance(content, str) or not content.strip():
            return f"messages[{i}] ({role}): empty content"
    if not any(m["role"] == "assistant" for m in msgs):
        return "no assistant turn (nothing to train on)"
    return None


def load_jsonl(
    path: str | Path, on_error: Literal["raise", "skip"] = "raise"
) -> tuple[list[dict[str, Any]], LoadReport]:
    """Read and validate a chat JSONL file.

    With `on_error="raise"` the first bad line raises DataError naming file and line;
    with `"skip"` bad lines are left out and counted in the report.
    """
    path = Path(path)
    report = LoadReport(str(path))
    records: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                problem = validate_record(obj)
            except json.JSONDecodeError as e:
                problem = f"invalid JSON ({e.msg} at column {e.colno})"
            if problem is None:
                records.append(obj)
                continue
            if on_error == "raise":
                raise DataError(path, lineno, problem)
            report.skipped += 1
            report.problems.append(f"{path}:{lineno}: {problem}")
    report.loaded = len(records)
    return records, report


def load(name_or_path: str, on_error: Literal["raise", "skip"] = "raise") -> list[dict[str, Any]]:
    """Records of a catalog dataset (or JSONL path), validated."""
    records, _ = load_jsonl(resolve(name_or_path).path, on_error=on_error)
    return records


def validate_catalog(directory: Path | None = None) -> dict[str, LoadReport]:
    """Validate every card and data file; raises on the first problem, with file and line."""
    out = {}
    for name, card in cards(directory).items():
        if not card.path.is_file():
            raise CatalogError(f"{card.card_file}: data file {card.path} does not exist")
        _, report = load_jsonl(card.path)
        if card.samples is not None and card.samples != report.loaded:
            raise CatalogError(
                f"{card.card_file}: card says {card.samples} samples, {card.path} has {report.loaded}"
            )
        out[name] = report
    return out


def summary(directory: Path | None = None) -> list[dict[str, Any]]:
    """One row per card (for tables and the configurator)."""
    return [
        {"name": c.name, "kind": c.kind, "samples": c.samples, "license": c.license,
         "path": str(c.path), "description": c.description}
        for c in cards(directory).values()
    ]
