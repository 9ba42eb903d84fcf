"""The run store at sweep scale: ingest, no-op sync, early-dynamics ranking and chart queries.

Generates RUNS synthetic runs of STEPS steps each (fixed seed; config.yaml, status.json and a
metrics.jsonl with every contract field), then times the store on them. Writes bench/results/store.json.

    python -m bench.store [--runs 500] [--steps 2000] [--root DIR] [--seed 0]

Query times exclude syncing (`auto_sync=False`) except `early_dynamics_autosync_s`, the path a
sweep's watcher takes: a no-op incremental sync, then the ranking.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/results.py, however this file is loaded
import results as bench_results  # noqa: E402

from labkit.config import RunConfig
from labkit.store import Store

LINE = ('{{"step": {step}, "phase": 0, "epoch": {epoch:.6f}, "samples": {samples}, "tokens": {tokens}, '
        '"loss_tokens": {lt}, "loss": {loss:.6f}, "grad_norm": {gn:.6f}, "lr": {lr:.6g}, '
        '"tokens_per_s": {tps:.1f}, "samples_per_s": {sps:.2f}, "step_time": {st:.4f}, '
        '"packing_efficiency": {pe:.4f}, "peak_mem_mb": 1234.5, "time": {t:.3f}, "ts": {ts:.3f}}}\n')


def generate(root: Path, runs: int, steps: int, seed: int) -> int:
    """Write the runs; returns the bytes of metrics written."""
    rng = np.random.default_rng(seed)
    t0 = 1.7e9
    nbytes = 0
    for i in range(runs):
        lr = float(10 ** rng.uniform(-5.5, -3.5))
        bs = int(rng.choice([16, 32, 64, 128, 256]))
        cfg = RunConfig(name=f"run-{i:04d}", runs_root=str(root), datasets=["skills"], learning_rate=lr,
                        effective_batch_size=bs, schedule=str(rng.choice(["constant", "cosine"])))
        cfg.save(cfg.run_dir / "config.yaml")
        s = np.arange(1, steps + 1)
        quality = float(np.clip(rng.normal(), -2, 2))  # how fast this run learns
        loss = 2.0 * np.exp(-s / (300 + 100 * quality)) + 0.8 + 0.05 * rng.standard_normal(steps)
        gn = (0.5 + 3e3 * lr + 0.2 * quality) * (1 + 0.1 * rng.standard_normal(steps)) / np.sqrt(s ** 0.2)
        step_time = 0.4 + 0.1 * rng.random(steps)
        t = np.cumsum(step_time)
        lines = [LINE.format(step=k, epoch=k * bs / 10_000, samples=k * bs, tokens=k * bs * 400, lt=bs * 200,
                             loss=loss[k - 1], gn=abs(gn[k - 1]), lr=lr, tps=bs * 400 / step_time[k - 1],
                             sps=bs / step_time[k - 1], st=step_time[k - 1], pe=0.95, t=t[k - 1],
                             ts=t0 + i * 10 + t[k - 1]) for k in range(1, steps + 1)]
        text = "".join(lines)
        (cfg.run_dir / "metrics.jsonl").write_text(text)
        nbytes += len(text)
        status = {"state": "finished", "step": steps, "samples": steps * bs, "total_steps": steps,
                  "total_samples": steps * bs, "started_at": t0 + i * 10, "updated_at": t0 + i * 10 + t[-1],
                  "ended_at": t0 + i * 10 + t[-1], "error": None, "stop_reason": None}
        (cfg.run_dir / "status.json").write_text(json.dumps(status))
    return nbytes


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t, 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=500, help="synthetic runs (default 500)")
    ap.add_argument("--steps", type=int, default=2000, help="optimizer steps per run (default 2000)")
    ap.add_argument("--root", type=Path, help="generate into this (new or empty) directory and keep it")
    ap.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "store.json",
                    help="results JSON (default bench/results/store.json)")
    args = ap.parse_args()

    root = args.root or Path(tempfile.mkdtemp(prefix="labkit-bench-store-"))
    if args.root and root.exists() and any(root.iterdir()):
        raise SystemExit(f"{root} is not empty; give a new directory")
    root.mkdir(parents=True, exist_ok=True)
    try:
        nbytes, t_gen = timed(lambda: generate(root, args.runs, args.steps, args.seed))
        store = Store(root, auto_sync=False)
        first, t_first = timed(store.sync)
        second, t_second = timed(store.sync)
        ranking, t_rank = timed(lambda: store.early_dynamics(first_steps=200))
        ids = [f"run-{i:04d}" for i in range(min(20, args.runs))]
        curves, t_curves = timed(lambda: store.metrics(ids, x="samples", columns=("loss", "grad_norm"),
                                                       max_points=1500))
        smooth, t_smooth = timed(lambda: store.metrics(ids, x="samples", smooth=0.1, color_by="learning_rate"))
        table, t_table = timed(store.runs_table)
        _, t_auto = timed(lambda: Store(root).early_dynamics(first_steps=200))

        # A live sweep: 50 runs log 10 more steps each (one of them torn), then sync again.
        for i in range(min(50, args.runs)):
            with (root / f"run-{i:04d}" / "metrics.jsonl").open("a") as fh:
                for k in range(args.steps + 1, args.steps + 11):
                    fh.write(json.dumps({"step": k, "samples": k * 16, "loss": 1.0, "grad_norm": 0.5}) + "\n")
                fh.write('{"step": 99999, "lo')
        append, t_append = timed(store.sync)

        con = store.live()
        live_rows, t_live = timed(lambda: con.execute(
            "SELECT run_id, count(*) AS n, min(loss) AS min_loss FROM metrics GROUP BY run_id").df())
        con.close()
        live_rank, t_live_rank = timed(lambda: store.early_dynamics(first_steps=200, live=True))
        results = {
            "runs": args.runs, "steps": args.steps, "metric_rows": args.runs * args.steps,
            "metrics_mb": round(nbytes / 2**20, 1), "generate_s": t_gen,
            "sync_first_s": t_first, "sync_first_rows": first["rows"],
            "sync_noop_s": t_second, "sync_noop_rows": second["rows"],
            "sync_append_s": t_append, "sync_append_rows": append["rows"],
            "early_dynamics_s": t_rank, "early_dynamics_runs": len(ranking), "early_dynamics_autosync_s": t_auto,
            "metrics_20_runs_s": t_curves, "metrics_20_runs_rows": len(curves),
            "metrics_20_runs_smooth_s": t_smooth,
            "runs_table_s": t_table, "runs_table_cols": table.shape[1],
            "live_group_by_s": t_live, "live_rows_runs": len(live_rows),
            "live_early_dynamics_s": t_live_rank,
            "db_mb": round(store.db.stat().st_size / 2**20, 1),
            **bench_results.machine(),
        }
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)
    bench_results.write(args.out, results)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
