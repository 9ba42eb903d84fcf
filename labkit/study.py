"""The miniature study: `python -m labkit.study` (what `make demo` runs).

On the shipped data and the tiny model, on CPU: a batch-size x learning-rate sweep with early
termination, optionally the same grid run in full to check the stopping decisions, a phased vs
stacked pair, early dynamics against final scores, and HTML reports of everything. The study
itself is `notebooks/00_study.ipynb`, executed by papermill into `RUNS_ROOT/study/report.ipynb`;
this module holds its analysis helpers and the command that runs it and renders the reports.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from labkit import runfiles
from labkit.sweep import ROOT, compute_saved, is_number, read_sweep, summary

STUDY_NOTEBOOK = ROOT / "notebooks" / "00_study.ipynb"


# -- phased vs stacked -------------------------------------------------------------------------


def _val_curve(run_dir: Path) -> list[tuple[int, float]]:
    return [(m["samples"], m["val_loss"]) for m in runfiles.read_metrics(run_dir) if m.get("val_loss") is not None]


def phased_vs_stacked(sweep_dir: str | Path):
    """Per run: mode, final scores, best validation loss and the samples needed to reach it.

    `samples_to_target` is the samples each run needed to reach the validation loss that every
    run of the sweep reached (the worst of their best losses): a like-for-like speed measure.
    """
    import pandas as pd

    from labkit.config import load_config

    df = summary(sweep_dir)
    rec = read_sweep(sweep_dir)
    dirs = {r["name"]: Path(r["notebook"]).parent for r in rec["runs"]}
    curves = {name: _val_curve(d) for name, d in dirs.items()}
    bests = [min(v for _, v in c) for c in curves.values() if c]
    target = max(bests) if bests else None
    rows = []
    for _, r in df.iterrows():
        d = dirs[r["run"]]
        cfg_path = d / "config.yaml"
        phases = len(load_config(cfg_path).training_phases()) if cfg_path.is_file() else None
        curve = curves[r["run"]]
        best = min(curve, key=lambda t: t[1]) if curve else (None, None)
        reach = next((s for s, v in curve if target is not None and v <= target), None)
        rows.append({"run": r["run"], "mode": "phased" if (phases or 1) > 1 else "stacked", "phases": phases,
                     "state": r["state"], "samples": r["samples"], "final_loss": r["final_loss"],
                     "best_val_loss": best[1], "samples_to_best": best[0], "target_val_loss": target,
                     "samples_to_target": reach,
                     **{k: r[k] for k in df.columns if "/" in k}})
    return pd.DataFrame(rows)


def phased_markdown(table) -> str:
    if table is None or not len(table):
        return "No runs to compare."
    lines = []
    for _, r in table.iterrows():
        scores = ", ".join(f"{k} {r[k]:.3f}" for k in table.columns if "/" in k and is_number(r[k]))
        best = f"best val loss {r['best_val_loss']:.4f} at {r['samples_to_best']} samples" if is_number(
            r["best_val_loss"]) else "no validation loss"
        reach = (f"reached {r['target_val_loss']:.4f} after {r['samples_to_target']} samples"
                 if is_number(r["samples_to_target"]) else "never reached the common target")
        lines.append(f"- **{r['mode']}** (`{r['run']}`): {best}; {reach}" + (f"; {scores}" if scores else ""))
    done = table.dropna(subset=["best_val_loss"])
    if len(done) >= 2:
        win = done.loc[done["best_val_loss"].idxmin()]
        lines.append(f"\n**{win['mode']}** reaches the lower validation loss on this data.")
    return "\n".join(lines)


# -- the grid ----------------------------------------------------------------------------------


def check_markdown(check: dict[str, Any] | None) -> str:
    if not check:
        return "No full sweep to compare with."
    if not check["stopped"]:
        return "Early termination stopped no run."
    word = "lower" if check["lower_is_better"] else "higher"
    lines = [f"Final `{check['score']}` ({word} is better) in the full sweep, and the early decision:", "",
             "| run | final | rank | stopped early | among the worst |", "| --- | --- | --- | --- | --- |"]
    for r in check["runs"]:
        final = f"{r['final']:.4f}" if is_number(r["final"]) else "-"
        lines.append(f"| {r['key']} | {final} | {r['final_rank']} | {'yes' if r['stopped'] else ''} | "
                     f"{'yes' if r['in_worst'] else ''} |")
    lines += ["", f"{check['stopped_in_worst']} of {len(check['stopped'])} stopped runs were among the worst "
              f"{len(check['stopped'])} by final score; the best run was "
              + ("kept." if check["best_run_kept"] else "**stopped**.")]
    return "\n".join(lines)


def findings(grid_dir: str | Path, pair_dir: str | Path | None = None,
             check: dict[str, Any] | None = None, score: str = "final_val_loss") -> dict[str, Any]:
    """The study's headline numbers, as plain JSON."""
    grid = summary(grid_dir)
    rec = read_sweep(grid_dir)
    et = rec.get("early_termination") or {}
    dirs = {r["name"]: Path(r["notebook"]).parent for r in rec["runs"]}
    compute = rec.get("compute") or compute_saved(dirs, et.get("stopped", {}))
    finished = grid[grid["state"] == "finished"]
    best = None
    if score in finished.columns and finished[score].notna().any():
        lower = "loss" in score
        row = finished.loc[finished[score].idxmin() if lower else finished[score].idxmax()]
        best = {"run": row["run"], "key": row["key"], score: float(row[score])}
    out = {"grid": {"runs": len(grid), "finished": int((grid["state"] == "finished").sum()),
                    "stopped_early": [r for r in grid.loc[grid["stopped_early"], "run"]],
                    "failed": int((grid["state"] == "failed").sum()), "best": best, "score": score,
                    "compute": compute, "seconds": (rec.get("ended_at") or 0) - rec["started_at"]},
           "check": check}
    if pair_dir is not None:
        table = phased_vs_stacked(pair_dir)
        out["phased_vs_stacked"] = table.to_dict(orient="records")
    return out


def findings_markdown(f: dict[str, Any]) -> str:
    g = f["grid"]
    c = g["compute"]
    lines = ["### Findings", "",
             f"- Grid: {g['runs']} runs, {g['finished']} finished, {len(g['stopped_early'])} stopped early, "
             f"{g['failed']} failed, in {g['seconds']:.0f} s."]
    if g["best"]:
        lines.append(f"- Best finished run by `{g['score']}`: `{g['best']['key']}` ({g['best'][g['score']]:.4f}).")
    lines.append(f"- Early termination saved {c['saved_samples']} of {c['planned_samples']} planned samples "
                 f"({100 * c['saved_fraction']:.0f}%).")
    if f.get("check") and f["check"]["stopped"]:
        ch = f["check"]
        lines.append(f"- Check against the full grid: {ch['stopped_in_worst']}/{len(ch['stopped'])} stopped runs "
                     f"were among the worst by final score; best run {'kept' if ch['best_run_kept'] else 'stopped'}.")
    for r in f.get("phased_vs_stacked") or []:
        if is_number(r.get("best_val_loss")):
            lines.append(f"- {r['mode'].capitalize()}: best val loss {r['best_val_loss']:.4f} "
                         f"after {r['samples_to_best']} samples.")
    return "\n".join(lines)


# -- the command -------------------------------------------------------------------------------


def run_study(runs_root: str | Path = "runs", full_grid: bool = True, parameters: dict[str, Any] | None = None,
              log=print) -> Path:
    """Execute the study notebook into RUNS_ROOT/study/report.ipynb and render all reports."""
    from labkit import catalog, report, tiny

    t0 = time.time()
    for name, rep in catalog.validate_catalog().items():
        log(f"catalog  {name:<11} {rep.loaded:>5} samples")
    log(f"model    {tiny.ensure_tiny()}")
    root = Path(runs_root).resolve()
    out_dir = root / "study"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "report.ipynb"
    log(f"study    executing {STUDY_NOTEBOOK.name} -> {out}")
    error = None
    try:
        report.execute(STUDY_NOTEBOOK, out, {"runs_root": str(root), "full_grid": full_grid,
                                             "interactive": False, "parameters": parameters or {}},
                       log_output=True)
    except Exception as e:  # noqa: BLE001 - render what there is; the notebook shows the error
        error = e
    index = report.build_reports(root)
    log(f"reports  {index}")
    log(f"done in {time.time() - t0:.0f}s")
    if error is not None:
        raise error
    return index


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m labkit.study", description=__doc__.splitlines()[0])
    ap.add_argument("--runs-root", default="runs")
    ap.add_argument("--no-full-grid", action="store_true", help="skip the full grid run that checks the stops")
    ap.add_argument("--eval-limit", type=int, default=None, help="items per eval task (default: the specs')")
    args = ap.parse_args(argv)
    # The study notebook's printed lines (sweep progress) come through papermill's logger.
    handler = logging.StreamHandler(sys.stdout)
    # Only the sweep's own lines: not papermill's bookkeeping nor the text fallbacks of rich outputs.
    noise = ("Executing", "Ending Cell", "Input Notebook", "Output Notebook", "alt.", "<IPython.")
    handler.addFilter(lambda r: not r.getMessage().lstrip().startswith(noise))
    pm_log = logging.getLogger("papermill")
    pm_log.addHandler(handler)
    pm_log.setLevel(logging.INFO)
    params = {"eval_limit": args.eval_limit} if args.eval_limit else {}
    index = run_study(args.runs_root, full_grid=not args.no_full_grid, parameters=params)
    print(index)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
