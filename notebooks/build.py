"""Build the lab notebooks from the cell sources below: `python notebooks/build.py`.

The notebooks are thin: every cell calls into labkit. Each has one cell tagged `parameters`
(papermill injects its values after it) and runs both interactively (widgets) and headless
(`interactive=False`: charts as SVG, plain log lines, results kept with `report.record`).
Cells tagged `hide-input` show only their output in HTML reports.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


def md(text: str):
    return new_markdown_cell(text.strip())


def code(text: str, *tags: str):
    cell = new_code_cell(text.strip())
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def params(text: str):
    return code(text, "parameters")


SETUP = """
from IPython.display import Markdown, display

from labkit import report

report.setup(interactive)
"""

# -- 01: one run -------------------------------------------------------------------------------

RUN = [
    md("""
# One run: configure, launch, monitor, evaluate

Interactively the form below edits the config and the monitor follows training live. Under
papermill (`interactive=False`) the same cells run headless and the run's report shows the loss
curves, the final metrics and the evaluation scores.
"""),
    params("""
config_path = "templates/runs/demo.yaml"  # a run config YAML
overrides = {}  # dotted config fields, e.g. {"learning_rate": 1e-3, "distributed.num_processes": 2}
runs_root = "runs"
evaluate_tasks = ["labkit_knowledge_mc", "labkit_skills_exact"]  # [] to skip evaluation
eval_limit = 20  # items per task (None: all)
wait = True  # wait for the run to end, then evaluate and summarise
interactive = True  # papermill runs set this to False
poll_seconds = 2.0
threads = None  # CPU threads per training process (sweeps set it when runs share the cores)
"""),
    code(SETUP + """
import os

from labkit.config import load_config
from labkit.launch import launch

if threads:
    os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the trainer
""", "hide-input"),
    md("## Configure"),
    code("""
cfg = load_config(config_path, {**overrides, "runs_root": runs_root}, check=True)
if interactive:
    from labkit.widgets import Configurator

    configurator = Configurator(cfg)
    display(configurator)  # edit, then run the next cell (or press Launch)
else:
    display(report.config_table(cfg))
"""),
    md("## Launch and monitor"),
    code("""
if interactive:
    from labkit.widgets import Monitor

    run = configurator.launched[-1] if configurator.launched else launch(configurator.config)
    display(Monitor(run))
else:
    run = launch(cfg)
print(f"{run.name}: {run.dir}")
status = run.status()
if wait:
    status = run.wait() if interactive else report.follow(run, poll=poll_seconds)
    if status.get("state") == "failed":
        raise RuntimeError(f"run {run.name} failed: {status.get('error')}\\n{run.tail(30)}")
"""),
    md("## Evaluate"),
    code("""
evals = None
if wait and evaluate_tasks and status.get("state") in ("finished", "stopped"):
    from labkit.evaluate import evaluate

    with report.quiet():  # lm-eval's progress bars
        evals = evaluate(run.dir, tasks=list(evaluate_tasks), limit=eval_limit)
    display(report.eval_table(run.dir))
"""),
    md("## Summary"),
    code("""
summary = report.run_summary(run.dir)
display(Markdown(report.run_markdown(summary)))
display(report.curves_chart(run.dir))
report.record("run", summary)
"""),
]

# -- 02: a sweep -------------------------------------------------------------------------------

SWEEP = [
    md("""
# A sweep: batch size x learning rate

Every run of the sweep executes `01_run.ipynb` headless (its report is `RUN_DIR/report.ipynb`).
With early termination on, the runs whose early-training score ranks in the worst fraction after
the probe budget (samples seen) are stopped; `sweep.json` keeps the decisions.
"""),
    params("""
sweep_spec = "templates/sweeps/bs_lr.yaml"
runs_root = "runs"
sweep_name = None  # default: the spec's name
early_termination = True
parameters = {}  # extra parameters for every run's notebook, e.g. {"eval_limit": 10}
overwrite = False  # delete this sweep's earlier runs first
interactive = True
"""),
    code(SETUP + """
from labkit import sweep
""", "hide-input"),
    code("""
spec = sweep.load_spec(sweep_spec)
configs = sweep.expand(spec, runs_root)
display(Markdown(f"**{sweep_name or spec.name}**: {len(configs)} runs, concurrency {spec.concurrency}, "
                 f"early termination {'on' if early_termination and spec.early_termination else 'off'}"))
"""),
    code("""
df = sweep.run_sweep(spec, runs_root, early_termination=early_termination, parameters=parameters,
                     name=sweep_name, overwrite=overwrite, log=print)
sweep_dir = sweep.sweep_dir(runs_root, sweep_name or spec.name)
display(df.dropna(axis=1, how="all"))
"""),
    md("## Results"),
    code("""
display(report.sweep_heatmap(df, spec))
display(Markdown(report.sweep_markdown(sweep_dir)))
display(report.decisions_table(sweep_dir))
report.record("sweep", sweep.read_sweep(sweep_dir))
report.record("summary", df)
"""),
]

# -- 03: early dynamics ------------------------------------------------------------------------

EARLY = [
    md("""
# Early-training dynamics

The paper's observation: runs that end best show a *lower gradient norm* and a *higher loss*
early in training. This notebook compares runs from the store over the same first samples and
checks how well the early signals predict the final scores.
"""),
    params("""
runs_root = "runs"
runs = None  # run names to compare (None: all)
first_samples = 256  # early window, in samples seen
task = "labkit_knowledge_mc"  # final score: an lm-eval task ...
metric = "acc"  # ... and its metric
interactive = True
"""),
    code(SETUP + """
from labkit import viz
from labkit.store import Store
""", "hide-input"),
    code("""
store = Store(runs_root)
store.sync()
table = store.runs_table()
if runs:
    table = table[table[report.run_column(table)].isin(runs)]
display(table)
"""),
    md("## Curves, by samples seen"),
    code("""
display(report.store_curves(store, runs, y="loss"))
display(report.store_curves(store, runs, y="grad_norm"))
"""),
    md("## Early dynamics and final scores"),
    code("""
early = store.early_dynamics(first_samples=first_samples)
if runs:
    early = early[early[report.run_column(early)].isin(runs)]
display(early)
display(viz.early_scatter(early, title=f"first {first_samples} samples"))
corr = store.correlate_early_with_final(task, metric)
display(corr)
report.record("early", early)
report.record("correlation", corr)
"""),
]

# -- 04: phased vs stacked ---------------------------------------------------------------------

PHASED = [
    md("""
# Phased or stacked?

The same data trained two ways: *phased* (knowledge first, then skills, each phase with a fresh
optimizer and schedule) and *stacked* (all data mixed in one phase). We compare final scores and
how many samples each needed to reach its best validation loss.
"""),
    params("""
sweep_spec = "templates/sweeps/phased_vs_stacked.yaml"
runs_root = "runs"
sweep_name = None
run_sweep = True  # False: only analyse runs of an earlier execution
parameters = {}
overwrite = False
interactive = True
"""),
    code(SETUP + """
from labkit import study, sweep
""", "hide-input"),
    code("""
spec = sweep.load_spec(sweep_spec)
sweep_dir = sweep.sweep_dir(runs_root, sweep_name or spec.name)
if run_sweep:
    sweep.run_sweep(spec, runs_root, early_termination=False, parameters=parameters, name=sweep_name,
                    overwrite=overwrite, log=print)
df = sweep.summary(sweep_dir)
display(df)
"""),
    code("""
comparison = study.phased_vs_stacked(sweep_dir)
display(comparison)
display(report.sweep_curves(sweep_dir, y="val_loss"))
display(Markdown(study.phased_markdown(comparison)))
report.record("phased_vs_stacked", comparison)
"""),
]

# -- 00: the study -----------------------------------------------------------------------------

STUDY = [
    md("""
# The miniature study

A small reproduction of the paper's recipe study on the shipped data and the tiny model:

1. a batch-size x learning-rate sweep with early termination (weak runs stopped after a probe budget),
2. optionally the same grid without early termination, to check the stopping decisions,
3. the same data trained phased and stacked,
4. early-training dynamics against final scores.
"""),
    params("""
runs_root = "runs"
grid_spec = "templates/sweeps/bs_lr.yaml"
pair_spec = "templates/sweeps/phased_vs_stacked.yaml"
full_grid = False  # also run the grid without early termination (checks the decisions; costs time)
parameters = {}  # for every run's notebook, e.g. {"eval_limit": 10}
score = "final_val_loss"  # summary column that ranks final results
task = "labkit_knowledge_mc"
metric = "acc"
first_samples = None  # early window; None: the grid's probe budget
overwrite = True
interactive = True
"""),
    code(SETUP + """
from labkit import study, sweep, viz
""", "hide-input"),
    md("## 1. Batch size x learning rate, early termination on"),
    code("""
grid = sweep.load_spec(grid_spec)
grid_df = sweep.run_sweep(grid, runs_root, parameters=parameters, overwrite=overwrite, log=print)
grid_dir = sweep.sweep_dir(runs_root, grid.name)
display(grid_df.dropna(axis=1, how="all"))
display(report.sweep_heatmap(grid_df, grid))
display(Markdown(report.sweep_markdown(grid_dir)))
display(report.decisions_table(grid_dir))
"""),
    md("## 2. Were the stopped runs really worse?"),
    code("""
check = None
if full_grid:
    full_name = grid.name + "-full"
    sweep.run_sweep(grid, runs_root, early_termination=False, parameters=parameters, name=full_name,
                    overwrite=overwrite, log=print)
    check = sweep.compare_with_full(grid_dir, sweep.sweep_dir(runs_root, full_name), score)
    display(Markdown(study.check_markdown(check)))
else:
    display(Markdown("Skipped (`full_grid=False`)."))
"""),
    md("## 3. Phased vs stacked"),
    code("""
pair = sweep.load_spec(pair_spec)
sweep.run_sweep(pair, runs_root, early_termination=False, parameters=parameters, overwrite=overwrite, log=print)
pair_dir = sweep.sweep_dir(runs_root, pair.name)
comparison = study.phased_vs_stacked(pair_dir)
display(comparison)
display(report.sweep_curves(pair_dir, y="val_loss"))
display(Markdown(study.phased_markdown(comparison)))
"""),
    md("## 4. Early dynamics vs final scores"),
    code("""
from labkit.store import Store

store = Store(runs_root)
store.sync()
et = grid.early_termination
window = first_samples or (et.budget if et and et.axis == "samples" else 256)
early = store.early_dynamics(first_samples=window)
display(early)
display(viz.early_scatter(early, title=f"first {window} samples"))
corr = store.correlate_early_with_final(task, metric)
display(corr)
"""),
    md("## Summary"),
    code("""
findings = study.findings(grid_dir, pair_dir, check)
display(Markdown(study.findings_markdown(findings)))
report.record("findings", findings)
report.record("grid", grid_df)
report.record("phased_vs_stacked", comparison)
"""),
]

NOTEBOOKS = {
    "00_study.ipynb": ("The miniature study", STUDY),
    "01_run.ipynb": ("One run", RUN),
    "02_sweep.ipynb": ("A sweep", SWEEP),
    "03_early_dynamics.ipynb": ("Early-training dynamics", EARLY),
    "04_phased_vs_stacked.ipynb": ("Phased or stacked", PHASED),
}


def build(out_dir: Path = HERE) -> list[Path]:
    written = []
    for name, (title, cells) in NOTEBOOKS.items():
        nb = new_notebook(cells=cells)
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.metadata["language_info"] = {"name": "python"}
        nb.metadata["title"] = title
        for i, cell in enumerate(nb.cells):
            cell["id"] = f"{Path(name).stem}-{i:02d}"  # stable ids: rebuilding gives no diff
        nbformat.validate(nb)
        path = out_dir / name
        nbformat.write(nb, str(path))
        written.append(path)
    return written


if __name__ == "__main__":
    for p in build(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(p)
