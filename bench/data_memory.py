"""Token store benchmark: build time, open time and private memory per rank, 1 and 8 ranks on one node.

Two cases:

- `store`: the paper's stacked set size (825,487 samples), lognormal lengths (median 600 tokens,
  sigma 0.6, clipped to [16, 4096]). The arrays are written straight from synthetic token ids (no
  tokenizer: this measures the store, not tokenization) through `labkit.buildonce`, as a rank
  would build it. Then R processes (R = 1, then 8) start at once, each opens the store, touches
  every sample's length (as the planner does) and a random 1% of the samples (ids and labels),
  and reports its memory from /proc/self/smaps_rollup while all R hold their maps: private
  memory (Private_Clean + Private_Dirty, i.e. what no other process shares) minus the same
  process's figure before opening the store, and the time to open it. Targets: private memory
  per rank < 1 GB, open < 5 s.
- `tokenize`: synthetic chat records through the tiny tokenizer into a store, 1 worker vs 2 (or
  `--workers`): samples per wall second and per CPU second (this process and its pool workers),
  the per-core speed that holds on a machine other jobs share.

    .venv/bin/python bench/data_memory.py           # full size: bench/results/data_memory.json
    .venv/bin/python bench/data_memory.py --quick   # 20,000 samples, 2,000 records, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/results.py, however this file is loaded
import results as bench_results  # noqa: E402

from labkit.buildonce import build_once  # noqa: E402
from labkit.data.tokenize import IGNORE  # noqa: E402
from labkit.data.tokenstore import StoreWriter, TokenStore, build_store  # noqa: E402

MB = 2**20


def smaps() -> dict[str, int]:
    """This process's memory from /proc/self/smaps_rollup, in bytes."""
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, value, *_ = line.split()
        out[key.rstrip(":")] = int(value) * 1024
    return out


def private(m: dict[str, int]) -> int:
    return m.get("Private_Clean", 0) + m.get("Private_Dirty", 0)


def synthetic_store(out: Path, n: int, seed: int, chunk: int = 50_000) -> dict:
    """Build the store of n synthetic samples under build_once; its build time and size."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(math.log(600), 0.6, n), 16, 4096).astype(np.int32)

    def build(tmp: Path) -> None:
        writer = StoreWriter(tmp)
        for lo in range(0, n, chunk):
            lens = lengths[lo : lo + chunk]
            ids = rng.integers(3, 32_000, int(lens.sum()), dtype=np.int32)
            labels = ids.copy()
            starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
            prompt = (lens // 3).astype(np.int64)  # the first third of each sample is prompt: no label
            mask = np.arange(len(ids)) < np.repeat(starts + prompt, lens)
            labels[mask] = IGNORE
            writer.add(ids, labels, lens)
        writer.finish({"source": "synthetic"})

    t = time.perf_counter()
    build_once(out, build)
    seconds = time.perf_counter() - t
    return {"samples": n, "tokens": int(lengths.sum(dtype=np.int64)), "build_seconds": seconds,
            "bytes_on_disk": sum(f.stat().st_size for f in out.iterdir()),
            "median_length": float(np.median(lengths)), "mean_length": float(lengths.mean())}


def rank(store_dir: Path, rank_id: int, ranks: int, sync: Path) -> None:
    """One rank: open, touch lengths and 1% of samples, report memory while every rank holds its maps."""
    before = smaps()
    t = time.perf_counter()
    store = TokenStore(store_dir)
    open_s = time.perf_counter() - t
    t = time.perf_counter()
    lengths = np.asarray(store.lengths)
    total = int(lengths.sum(dtype=np.int64))
    picks = np.random.default_rng(rank_id).choice(len(store), max(1, len(store) // 100), replace=False)
    checksum = 0
    for i in picks.tolist():
        s = store[i]
        checksum += int(s.input_ids[-1]) + int(s.labels[-1])
    touch_s = time.perf_counter() - t
    (sync / f"ready-{rank_id}").touch()
    while len(list(sync.glob("ready-*"))) < ranks:
        time.sleep(0.01)
    after = smaps()
    print(json.dumps({
        "rank": rank_id, "open_seconds": open_s, "touch_seconds": touch_s, "tokens": total, "checksum": checksum,
        "private_mb": (private(after) - private(before)) / MB, "private_total_mb": private(after) / MB,
        "private_dirty_mb": (after.get("Private_Dirty", 0) - before.get("Private_Dirty", 0)) / MB,
        "pss_mb": (after.get("Pss", 0) - before.get("Pss", 0)) / MB,
        "rss_mb": (after.get("Rss", 0) - before.get("Rss", 0)) / MB}), flush=True)
    while not (sync / "done").exists():  # keep the maps until every rank has measured
        time.sleep(0.01)


def ranks_on_node(store_dir: Path, ranks: int) -> dict:
    with tempfile.TemporaryDirectory() as sync:
        procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(store_dir), str(r), str(ranks), sync],
                                  stdout=subprocess.PIPE, text=True) for r in range(ranks)]
        lines = [p.stdout.readline() for p in procs]
        Path(sync, "done").touch()
        for p in procs:
            p.wait(timeout=600)
    per_rank = [json.loads(line) for line in lines]
    return {"ranks": ranks, "per_rank": per_rank,
            "max_private_mb": max(r["private_mb"] for r in per_rank),
            "max_private_dirty_mb": max(r["private_dirty_mb"] for r in per_rank),
            "max_open_seconds": max(r["open_seconds"] for r in per_rank)}


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the pool's workers, once joined)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def chat_records(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = ["river", "capital", "quill", "mere", "north", "silver", "run", "the", "of", "and", "sum", "is",
             "sort", "these", "numbers", "reverse", "word", "answer", "briefly", "field", "json"]
    def text(k: int) -> str:
        return " ".join(words[j] for j in rng.integers(0, len(words), k))
    return [{"messages": [{"role": "system", "content": "Answer briefly."},
                          {"role": "user", "content": text(int(rng.integers(5, 120)))},
                          {"role": "assistant", "content": text(int(rng.integers(5, 300)))}]}
            for _ in range(n)]


def tokenize_case(n: int, workers: list[int], seed: int) -> list[dict]:
    from transformers import AutoTokenizer

    from labkit.tiny import ensure_tiny

    tok = AutoTokenizer.from_pretrained(ensure_tiny())
    records = chat_records(n, seed)
    out = []
    for w in workers:
        with tempfile.TemporaryDirectory() as d:
            t, cpu = time.perf_counter(), cpu_seconds()
            report = build_store(d, records, tok, 4096, workers=w, pool_min_records=0 if w > 1 else 10**9)
            s, c = time.perf_counter() - t, cpu_seconds() - cpu
            used = json.loads(Path(d, "meta.json").read_text())["workers"]
        out.append({"workers": used, "records": n, "samples": report["samples"], "seconds": s, "cpu_seconds": c,
                    "samples_per_second": n / s, "samples_per_cpu_second": n / c})
        print(f"tokenize: {n} records, {used} worker(s): {s:.1f} s, {n / s:,.0f} samples/s, "
              f"{n / c:,.0f} samples per CPU second", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=825_487)
    ap.add_argument("--records", type=int, default=20_000, help="chat records for the tokenize case")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", type=Path, default=None, help="where to build the store (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the built store")
    ap.add_argument("--cases", nargs="+", choices=["store", "tokenize"], default=["store", "tokenize"])
    ap.add_argument("--quick", action="store_true", help="20,000 samples, 2,000 records")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "data_memory.json")
    ap.add_argument("--rank", nargs=4, metavar=("STORE", "RANK", "RANKS", "SYNC"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rank:
        rank(Path(args.rank[0]), int(args.rank[1]), int(args.rank[2]), Path(args.rank[3]))
        return 0
    if args.quick:
        args.samples, args.records = 20_000, 2_000

    built, nodes, tokenize = None, [], []
    if "store" in args.cases:
        base = args.dir or Path(tempfile.mkdtemp(prefix="labkit-bench-store-"))
        entry = base / f"synthetic-{args.samples}-{args.seed}"
        try:
            built = synthetic_store(entry, args.samples, args.seed)
            print(f"store: {built['samples']:,} samples, {built['tokens']:,} tokens, "
                  f"{built['bytes_on_disk'] / 2**30:.2f} GiB, built in {built['build_seconds']:.1f} s", flush=True)
            for r in args.ranks:
                node = ranks_on_node(entry, r)
                nodes.append(node)
                print(f"{r} rank(s): private memory per rank max {node['max_private_mb']:.1f} MB "
                      f"(dirty {node['max_private_dirty_mb']:.1f} MB), open max {node['max_open_seconds']:.3f} s",
                      flush=True)
        finally:
            if not args.keep:
                import shutil

                shutil.rmtree(entry, ignore_errors=True)
                if args.dir is None:
                    shutil.rmtree(base, ignore_errors=True)
    if "tokenize" in args.cases:
        tokenize = tokenize_case(args.records, args.workers, args.seed)
    result = {
        **bench_results.machine(),
        "store": built, "ranks_on_node": nodes, "tokenize": tokenize,
        "targets": {"private_mb_per_rank_below": 1024, "open_seconds_below": 5},
        "ok": all(n["max_private_mb"] < 1024 and n["max_open_seconds"] < 5 for n in nodes),
    }
    bench_results.write(args.out, result)
    print(f"targets met: {result['ok']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
