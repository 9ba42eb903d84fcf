"""The data catalog: YAML dataset cards pointing at data files, directories or cached hub datasets.

A card names a dataset so configs can say `datasets: [knowledge]` instead of a path; a plain
path (`.jsonl`, `.json`, `.parquet`, `.csv`, a save_to_disk directory) or `hf:owner/name` works
too. Cards say the format (labkit.data.formats converts every format to chat records); loading
validates every record and names the file and line (or record) of anything wrong.
"""

from __future__ import annotations

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
    """A bad record in a data file; the message names file and line (or `record n`)."""

    def __init__(self, path: Path | str, line: int | str, problem: str):
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
    if not path.is_absolute() and not str(data["path"]).startswith("hf:"):
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


def _looks_like_path(name_or_path: str) -> bool:
    from labkit.data.formats import FILE_KINDS, HUB_PREFIX

    return (name_or_path.startswith(HUB_PREFIX) or Path(name_or_path).suffix.lower() in FILE_KINDS
            or os.sep in name_or_path or Path(name_or_path).expanduser().is_dir())


def resolve(name_or_path: str, directory: Path | None = None) -> Card:
    """A catalog name, a data path or `hf:owner/name`, as a Card (a bare path's format is sniffed)."""
    from labkit.data import formats

    if _looks_like_path(name_or_path):
        p = name_or_path if name_or_path.startswith(formats.HUB_PREFIX) else Path(name_or_path).expanduser()
        formats.container(p)  # a clear error for a missing, empty or wrong kind of path
        try:
            sniffed = formats.sniff(p)
        except CatalogError:
            sniffed = {"format": "chat"}  # the converter then names the bad records
        name = str(p).removeprefix(formats.HUB_PREFIX).replace("/", "_") if isinstance(p, str) else p.stem
        return Card(name=name, path=Path(p), format=sniffed["format"],
                    extra={"fields": sniffed["fields"]} if "fields" in sniffed else {})
    known = cards(directory)
    if name_or_path not in known:
        raise CatalogError(
            f"{name_or_path!r} is not in the data catalog ({catalog_dir() if directory is None else directory}); "
            f"known: {', '.join(sorted(known)) or 'none'}"
        )
    card = known[name_or_path]
    try:
        formats.container(card.path)
    except CatalogError as e:
        raise CatalogError(f"{card.card_file}: {e}") from None
    return card


def load_jsonl(
    path: str | Path, on_error: Literal["raise", "skip"] = "raise"
) -> tuple[list[dict[str, Any]], LoadReport]:
    """Read and validate a chat JSONL file (through labkit.data.formats).

    With `on_error="raise"` the first bad line raises DataError naming file and line;
    with `"skip"` bad lines are left out and counted in the report.
    """
    from labkit.data import formats

    return formats.read(card_for_path(Path(path)), on_error=on_error)


def card_for_path(path: Path) -> Card:
    """The catalog card of a data path (its format and field mapping), else the path with its format sniffed.

    Callers that hold only a path (`labkit.data.tokenstore.load_tokenized` given one) read it as its card says.
    """
    try:
        target = Path(path).resolve()
        for card in cards().values():
            if not str(card.path).startswith("hf:") and card.path.resolve() == target:
                return card
    except CatalogError:
        pass  # a broken card elsewhere in the catalog does not stop a load by path
    return resolve(str(path))


def load(name_or_path: str, on_error: Literal["raise", "skip"] = "raise") -> list[dict[str, Any]]:
    """Normalized chat records of a catalog dataset (or path), validated."""
    from labkit.data import formats

    records, _ = formats.read(resolve(name_or_path), on_error=on_error)
    return records


def validate_catalog(directory: Path | None = None) -> dict[str, LoadReport]:
    """Validate every card and data file; raises on the first problem, with file and line."""
    from labkit.data import formats

    out = {}
    for name, card in cards(directory).items():
        try:
            formats.container(card.path)
        except CatalogError as e:
            raise CatalogError(f"{card.card_file}: {e}") from None
        _, report = formats.read(card)
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
