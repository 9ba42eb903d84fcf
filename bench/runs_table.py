"""The lab's runs table at sweep scale: what `labkit ls`, each Board refresh and the report index cost.

Generates RUNS synthetic runs (bench/store.py's generator: config, status, metrics), all in one sweep
cohort with a probe budget, then times `labkit.table.runs_table` (first call with the store's
ingest, then a refresh), `readable()` and the offline sortable HTML. Writes bench/results/runs_table.json.

    python bench/runs_table.py [--runs 200] [--steps 500] [--quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/results.py, however this file is loaded
import results as bench_results  # noqa: E402
from store import generate, timed  # bench/store.py's generator

from labkit import table
from labkit.store import Store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200, help="synthetic runs (default 200)")
    ap.add_argument("--steps", type=int, default=500, help="optimizer steps per run (default 500)")
    ap.add_argument("--quick", action="store_true", help="20 runs x 100 steps")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "runs_table.json",
                    help="results JSON (default bench/results/runs_table.json)")
    args = ap.parse_args()
    runs, steps = (20, 100) if args.quick else (args.runs, args.steps)
    root = Path(tempfile.mkdtemp(prefix="labkit-bench-table-"))
    try:
        generate(root, runs, steps, seed=0)
        sweep = root / "sweeps" / "bench"
        sweep.mkdir(parents=True)
        (sweep / "sweep.json").write_text(json.dumps({
            "name": "bench", "runs": [{"name": f"run-{i:04d}", "key": str(i), "overrides": {}} for i in range(runs)],
            "early_termination": {"probe_samples": 16 * steps // 4, "stop_fraction": 0.5}}))
        store = Store(root)
        first, t_first = timed(lambda: table.runs_table(root, store=store))
        again, t_again = timed(lambda: table.runs_table(root, store=store))
        _, t_where = timed(lambda: table.runs_table(root, store=store, where="learning_rate > 1e-5",
                                                    sort="early_score"))
        _, t_readable = timed(lambda: table.readable(again))
        page, t_html = timed(lambda: table.to_html(again))
        results = {"runs": runs, "steps": steps, "first_s": t_first, "refresh_s": t_again, "where_sort_s": t_where,
                   "readable_s": t_readable, "html_s": t_html, "html_kb": round(len(page) / 1024, 1),
                   "ranked": int(again["early_rank"].notna().sum()), "columns": again.shape[1],
                   **bench_results.machine()}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    bench_results.write(args.out, results)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
