"""Tokenized datasets as flat arrays on disk, built once per node, shared by every rank through the page cache.

A store is one cache directory holding
- `ids.bin`, `labels.bin`: every sample's token ids and labels back to back (int32, native order);
- `offsets.npy` (int64, samples + 1) and `lengths.npy` (int32): where each sample starts, its length;
- `meta.json`: the tokenization report and the array sizes;
- the completion marker of `labkit.buildonce`, written last.

Every rank maps `lengths` and `offsets` (`np.load(mmap_mode="r")`) and reads each sample it trains
on with `os.pread` from the shared page cache, so a rank's private memory does not grow with the
dataset (see `TokenStore.__getitem__` for why not slices of a map). Labels are stored as int32
rather than a loss mask so any labelling strategy (not only "label = id or ignore") fits.

The first process on a node builds the store under the entry's lock (`labkit.buildonce`); the
others wait, then open it. Large inputs are tokenized by a process pool over record chunks
(`LABKIT_TOKENIZE_WORKERS` caps the workers); chunks are written in input order, so the store is
the same bytes whatever the number of workers.

The cache key is a hash of everything the samples depend on. The data file enters it through a
streamed SHA-256 (1 MiB chunks, never the whole file in memory); since hashing a multi-GB file
takes seconds on every start of every rank, the digest is memoised next to the cache, keyed on
the file's path, size, mtime_ns and inode: a file rewritten in place changes its mtime_ns (and
almost always its size), a file replaced by rename changes its inode, and either re-hashes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from labkit import runfiles
from labkit.buildonce import build_once
from labkit.data.tokenize import LABELS_VERSION, TokenizedSample, tokenize_records

if TYPE_CHECKING:
    from labkit.catalog import Card

STORE_VERSION = 3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json")
REPORT_KEYS = ("samples", "dropped_overlong", "truncated", "no_loss_tokens", "skipped")
CHUNK_RECORDS = 2000
# Below this many records a pool costs more to start (a fresh interpreter importing transformers
# per worker, ~2 s) than it saves.
POOL_MIN_RECORDS = 8000
DTYPE = np.dtype("int32")


class TokenStore:
    """A built store, opened read-only. `store[i]` is sample i; `.lengths` is a memory map."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.meta = json.loads((self.directory / "meta.json").read_text())
        self.tokens = int(self.meta["tokens"])
        self.offsets = np.load(self.directory / "offsets.npy", mmap_mode="r")
        self.lengths = np.load(self.directory / "lengths.npy", mmap_mode="r")
        if len(self.offsets) != len(self.lengths) + 1 or int(self.offsets[-1]) != self.tokens:
            raise ValueError(f"{self.directory}: offsets do not match the token arrays")
        self._fds = {}
        for name in ("ids", "labels"):
            fd = os.open(self.directory / f"{name}.bin", os.O_RDONLY)
            size = os.fstat(fd).st_size
            if size != self.tokens * DTYPE.itemsize:
                os.close(fd)
                raise ValueError(f"{self.directory / name}.bin: {size} bytes, expected {self.tokens} tokens")
            self._fds[name] = fd
        self._maps: dict[str, np.ndarray] = {}

    def _read(self, name: str, a: int, b: int) -> np.ndarray:
        n = (b - a) * DTYPE.itemsize
        data = os.pread(self._fds[name], n, a * DTYPE.itemsize)
        if len(data) != n:
            raise OSError(f"{self.directory / name}.bin: short read at token {a}")
        return np.frombuffer(data, dtype=DTYPE)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> TokenizedSample:
        # pread, not a slice of a memory map: the kernel maps page-cache folios whole (large folios
        # on ext4/xfs), so each sample touched through a map added ~0.28 MB to the rank's RSS
        # (measured on Linux 6.18, ext4: ~2 GB for 1% of 825k samples); a read copies just the
        # sample, through the same shared page cache.
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} of a store of {n}")
        i = int(i) % n
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return TokenizedSample(self._read("ids", a, b), self._read("labels", a, b))

    def _map(self, name: str) -> np.ndarray:
        if name not in self._maps:
            if self.tokens == 0:  # mmap refuses an empty file
                self._maps[name] = np.empty(0, dtype=DTYPE)
            else:
                self._maps[name] = np.memmap(self.directory / f"{name}.bin", dtype=DTYPE, mode="r",
                                             shape=(self.tokens,))
        return self._maps[name]

    @property
    def ids(self) -> np.ndarray:
        """All token ids, back to back (a read-only memory map, for bulk readers)."""
        return self._map("ids")

    @property
    def labels(self) -> np.ndarray:
        """All labels, aligned with `ids` (a read-only memory map)."""
        return self._map("labels")

    @property
    def report(self) -> dict:
        return dict(self.meta["report"])

    def __reduce__(self):
        # File descriptors do not travel: a store sent to another process (a DataLoader worker) reopens.
        return (TokenStore, (str(self.directory),))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: os may be gone already
            pass


def sample_lengths(samples) -> np.ndarray:
    """Token counts of a dataset: a store's `lengths`, or measured from a list of samples."""
    lengths = getattr(samples, "lengths", None)
    if lengths is not None:
        return np.asarray(lengths)
    return np.fromiter((len(s.input_ids) for s in samples), dtype=DTYPE, count=len(samples))


class ConcatStore:
    """Several stores (a phase's datasets; lists of samples work too) indexed as one, in order."""

    def __init__(self, stores: list):
        self.stores = list(stores)
        sizes = [len(s) for s in self.stores]
        self.starts = np.cumsum([0, *sizes])
        self.lengths = np.concatenate([sample_lengths(s) for s in self.stores]) if self.stores \
            else np.empty(0, dtype=DTYPE)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> TokenizedSample:
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.stores[k][i - int(self.starts[k])]


# -- cache key ----------------------------------------------------------------------------------

def file_digest(path: str | Path, memo_dir: str | Path | None = None) -> str:
    """SHA-256 of a file's bytes, streamed; memoised in `memo_dir` under (path, size, mtime_ns, inode)."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = [str(path), st.st_size, st.st_mtime_ns, st.st_ino]
    memo = None
    if memo_dir is not None:
        memo = Path(memo_dir) / (hashlib.sha256(str(path).encode()).hexdigest()[:24] + ".json")
        try:
            saved = json.loads(memo.read_text())
            if saved["stamp"] == stamp:
                return saved["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    digest = h.hexdigest()
    if memo is not None and os.stat(path).st_mtime_ns == st.st_mtime_ns:  # not changed while hashed
        memo.parent.mkdir(parents=True, exist_ok=True)
        runfiles.write_json_atomic(memo, {"stamp": stamp, "sha256": digest})
    return digest


def cache_key(data_path: str | Path, tokenizer, tokenizer_dir: str | Path, max_seq_len: int, overlong: str,
              on_error: str = "raise", options: dict | None = None, memo_dir: str | Path | None = None) -> str:
    """Hash of everything the tokenized samples depend on: the data bytes, the tokenizer files and
    chat template, `max_seq_len`, `overlong`, `on_error`, the labelling `options` and code version,
    and the tokenizer's size (a configured chat template adds tokens that no file on disk shows yet)."""
    template = tokenizer.chat_template
    h = hashlib.sha256(json.dumps(
        [STORE_VERSION, LABELS_VERSION, max_seq_len, overlong, on_error, sorted((options or {}).items()),
         template if isinstance(template, str) else repr(template), len(tokenizer)], default=repr).encode())
    h.update(file_digest(data_path, memo_dir).encode())
    for name in TOKENIZER_FILES:
        f = Path(tokenizer_dir) / name
        if f.is_file():
            h.update(name.encode() + b"\0" + file_digest(f).encode())
    return h.hexdigest()[:20]


# -- building -----------------------------------------------------------------------------------

_worker_tokenizer = None


def _init_worker(tokenizer) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism
    _worker_tokenizer = tokenizer


def _tokenize_chunk(records: list[dict], tokenizer, max_seq_len: int, overlong: str, source: str,
                    options: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    samples, report = tokenize_records(records, tokenizer, max_seq_len, overlong, source=source, **options)
    lengths = np.fromiter((len(s.input_ids) for s in samples), dtype=DTYPE, count=len(samples))
    ids = np.fromiter(itertools.chain.from_iterable(s.input_ids for s in samples), dtype=DTYPE,
                      count=int(lengths.sum()))
    labels = np.fromiter(itertools.chain.from_iterable(s.labels for s in samples), dtype=DTYPE,
                         count=int(lengths.sum()))
    return ids, labels, lengths, report


def _pooled_chunk(records, max_seq_len, overlong, source, options):
    return _tokenize_chunk(records, _worker_tokenizer, max_seq_len, overlong, source, options)


def default_workers() -> int:
    """Cores this process may use, capped by `LABKIT_TOKENIZE_WORKERS`."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cap = os.environ.get("LABKIT_TOKENIZE_WORKERS")
    if cap:
        try:
            n = min(n, int(cap))
        except ValueError:
            raise ValueError(f"LABKIT_TOKENIZE_WORKERS must be a whole number, got {cap!r}") from None
    return max(1, n)


def _chunks(records: Iterable[dict], size: int) -> Iterator[list[dict]]:
    it = iter(records)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


class StoreWriter:
    """Appends tokenized chunks to the store files in `out_dir`, in order; `finish` writes the index."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self._ids = open(self.out_dir / "ids.bin", "wb")
        self._labels = open(self.out_dir / "labels.bin", "wb")
        self._lengths: list[np.ndarray] = []

    def add(self, ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray) -> None:
        lengths = np.asarray(lengths, dtype=DTYPE)
        if len(ids) != len(labels) or len(ids) != int(lengths.sum(dtype=np.int64)):
            raise ValueError(f"{len(ids)} ids and {len(labels)} labels for lengths summing to {lengths.sum()}")
        self._ids.write(np.ascontiguousarray(ids, dtype=DTYPE).tobytes())
        self._labels.write(np.ascontiguousarray(labels, dtype=DTYPE).tobytes())
        self._lengths.append(lengths)

    def finish(self, report: dict, workers: int = 1) -> dict:
        self._ids.close()
        self._labels.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.empty(0, dtype=DTYPE)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        np.save(self.out_dir / "lengths.npy", lengths)
        np.save(self.out_dir / "offsets.npy", offsets)
        report = {"source": "", **{k: 0 for k in REPORT_KEYS}, **report, "samples": len(lengths)}
        (self.out_dir / "meta.json").write_text(json.dumps({
            "version": STORE_VERSION, "tokens": int(offsets[-1]), "samples": len(lengths), "dtype": DTYPE.str,
            "workers": workers, "report": report}))
        return report


def build_store(out_dir: str | Path, records: Iterable[dict], tokenizer, max_seq_len: int,
                overlong: Literal["drop", "truncate"] = "drop", source: str = "", options: dict | None = None,
                workers: int | None = None, chunk_records: int = CHUNK_RECORDS,
                pool_min_records: int = POOL_MIN_RECORDS,
                extra_report: Callable[[], dict] | None = None) -> dict:
    """Tokenize `records` (any iterable of chat records) into the store files in `out_dir`; the report.

    Records are consumed in chunks, and at most two chunks per worker are in flight, so memory stays
    flat whatever the input size. A pool starts only when the input holds at least
    `pool_min_records` records and more than one worker is allowed. `extra_report()` is called
    once the records are consumed (a streaming source knows its skipped lines only then).
    """
    options = dict(options or {})
    workers = default_workers() if workers is None else max(1, int(workers))
    chunks = _chunks(records, chunk_records)
    head = list(itertools.islice(chunks, max(1, -(-pool_min_records // chunk_records))))
    pooled = workers > 1 and sum(len(c) for c in head) >= pool_min_records
    totals = {k: 0 for k in REPORT_KEYS}
    writer = StoreWriter(out_dir)

    def write(result) -> None:
        ids, labels, lengths, report = result
        writer.add(ids, labels, lengths)
        for k in ("dropped_overlong", "truncated", "no_loss_tokens"):
            totals[k] += int(report.get(k, 0))

    all_chunks = itertools.chain(head, chunks)
    if not pooled:
        for chunk in all_chunks:
            write(_tokenize_chunk(chunk, tokenizer, max_seq_len, overlong, source, options))
    else:
        # spawn, not fork: the parent may hold threads (tokenizers, torch) that fork would copy mid-state.
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                                 initargs=(tokenizer,)) as pool:
            pending: deque = deque()
            for chunk in all_chunks:
                pending.append(pool.submit(_pooled_chunk, chunk, max_seq_len, overlong, source, options))
                if len(pending) >= 2 * workers:
                    write(pending.popleft().result())
            while pending:
                write(pending.popleft().result())
    totals.update({k: int(v) for k, v in (extra_report() if extra_report else {}).items()})
    return writer.finish({"source": source, **totals}, workers=workers if pooled else 1)


def load_tokenized(data: str | Path | Card, tokenizer, tokenizer_dir: str | Path, max_seq_len: int,
                   overlong: Literal["drop", "truncate"] = "drop", cache_dir: str | Path | None = None,
                   on_error: Literal["raise", "skip"] = "raise", options: dict | None = None,
                   workers: int | None = None) -> tuple[TokenStore, dict]:
    """The token store of a dataset, built on first use (once per node) and mapped after.

    `data` is a catalog card (read as it says: format, fields, roles, split) or a data path (read as
    the catalog card of that file says, else as its sniffed format). How the card reads the file is
    part of the cache key, so editing a card's field mapping rebuilds the store. `options` are labelling options passed to `tokenize_records` as keyword arguments (and part
    of the cache key). The report holds `source`, `samples`, `dropped_overlong`, `truncated`,
    `no_loss_tokens`, `skipped` (bad lines, with `on_error="skip"`) and `cached` (False only in
    the process that built the store).
    """
    from labkit.catalog import Card, card_for_path
    from labkit.data import formats
    from labkit.tiny import home

    card = data if isinstance(data, Card) else card_for_path(Path(data))
    data_path = Path(card.path)
    reader = {"format": card.format, **{k: card.extra.get(k) for k in ("fields", "roles", "split")}}
    cache_dir = Path(cache_dir) if cache_dir is not None else home() / "tokenized"
    key = cache_key(data_path, tokenizer, tokenizer_dir, max_seq_len, overlong, on_error,
                    {**(options or {}), "reader": reader}, memo_dir=cache_dir / ".digests")
    entry = cache_dir / f"{data_path.stem}-{key}"

    def build(tmp: Path) -> None:
        records, load_report = formats.read(card, on_error=on_error)
        build_store(tmp, records, tokenizer, max_seq_len, overlong, source=str(data_path), options=options,
                    workers=workers, extra_report=lambda: {"skipped": load_report.skipped})

    built = build_once(entry, build)
    store = TokenStore(entry)
    return store, {**store.report, "source": str(data_path), "cached": not built}
