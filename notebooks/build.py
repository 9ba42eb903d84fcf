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

from labkit import paths, report

report.setup(interactive)  # charts that need no network, in JupyterLab and in reports
runs_root = paths.runs_root(runs_root)  # relative paths mean the project's, whatever the kernel's cwd
"""

# -- 01: one run -------------------------------------------------------------------------------

RUN = [
    md("""
# One run: configure, launch, monitor, evaluate

Interactively the form below edits the config; Launch (or running the next cell) starts the run in
the background and returns at once: the monitor under the form follows it live, its Stop button
works at any time, and the Evaluate cell uses the newest run once it has finished or been stopped.
Under papermill (`interactive=False`) the same cells run headless, wait for the run, and leave a
report: the resolved config, the loss curves, the final metrics and the evaluation scores.
"""),
    params("""
config_path = "templates/runs/demo.yaml"  # a run config YAML (relative: to the project, see labkit/paths.py)
overrides = {}  # dotted config fields, e.g. {"learning_rate": 1e-3, "distributed.num_processes": 2}
runs_root = None  # None: $LABKIT_RUNS, else PROJECT/runs
existing_run = None  # a run directory to report on instead of launching one (`labkit report RUN_DIR`)
evaluate_tasks = ["labkit_knowledge_mc", "labkit_skills_exact"]  # [] to skip evaluation
eval_limit = 20  # items per task (None: all)
wait = True  # headless: wait for the run to end, then evaluate (interactive mode never blocks the kernel)
interactive = True  # papermill runs set this to False
poll_seconds = 2.0
threads = None  # CPU threads per training process (sweeps set it when runs share the cores)
"""),
    code(SETUP + """
import os

from labkit.config import load_config
from labkit.launch import Run, launch

if threads:
    os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the trainer
""", "hide-input"),
    md("## Configure"),
    code("""
if existing_run:
    run = Run(paths.resolve(existing_run))
    cfg = run.config
else:
    cfg = load_config(paths.resolve(config_path), {**overrides, "runs_root": str(runs_root)}, check=True)
if interactive and not existing_run:
    from labkit.widgets import Configurator

    configurator = Configurator(cfg)
    display(configurator)  # edit, then press Launch (or run the next cell)
else:
    display(Markdown(f"**{cfg.name}**: the fields set by its config or sweep (the full resolved config follows)"))
    display(report.config_diff(cfg))
    display(report.config_table(cfg))
"""),
    md("## Launch and monitor"),
    code("""
if existing_run:
    status = run.status()
elif interactive:
    # Returns at once: the form's monitor follows the run from a background thread (one monitor per run).
    run = configurator.launched[-1] if configurator.launched else configurator.launch()
    if run is None:
        raise RuntimeError("the run did not start: see the messages in the form above")
    status = run.status()
    print(f"{run.name}: {run.dir} (the monitor above follows it; the cells below work while it trains)")
else:
    run = launch(cfg)
    print(f"{run.name}: {run.dir}")
    status = report.follow(run, poll=poll_seconds) if wait else run.status()
    if status.get("state") == "failed":
        raise RuntimeError(f"run {run.name} failed: {status.get('error')}\\n{run.tail(30)}")
""", "progress"),
    md("## Evaluate"),
    code("""
if interactive and not existing_run and configurator.launched:
    run = configurator.launched[-1]  # the newest run launched from the form
status = run.status()
evals = None
if existing_run or not evaluate_tasks:
    pass
elif status.get("state") in ("finished", "stopped"):
    from labkit.evaluate import evaluate

    with report.quiet():  # lm-eval's progress bars
        evals = evaluate(run.dir, tasks=list(evaluate_tasks), limit=eval_limit)
else:
    display(Markdown(f"`{run.name}` is {status.get('state')}: run this cell again once it has finished "
                     "or been stopped (Stop in the monitor)."))
if (run.dir / "evals").is_dir():
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
# A sweep

Every run of the sweep executes `01_run.ipynb` headless (its report is `RUN_DIR/report.ipynb`).
With early termination on, the runs whose early-training score ranks in the worst fraction after
the probe budget (samples seen) are stopped; `sweep.json` keeps the decisions.
"""),
    params("""
sweep_spec = "templates/sweeps/bs_lr.yaml"  # relative: to the project
runs_root = None  # None: $LABKIT_RUNS, else PROJECT/runs
sweep_name = None  # default: the spec's name
early_termination = True
parameters = {}  # extra parameters for every run's notebook, e.g. {"eval_limit": 10}
overwrite = False  # delete this sweep's earlier runs first
interactive = True
"""),
    code(SETUP + """
from labkit import sweep, table
""", "hide-input"),
    code("""
spec = sweep.load_spec(paths.resolve(sweep_spec))
configs = sweep.expand(spec, runs_root)
display(Markdown(f"## {report.sweep_title(spec, sweep_name)}"))
display(Markdown(f"**{sweep_name or spec.name}**: {len(configs)} runs, concurrency {spec.concurrency}, "
                 f"early termination {'on' if early_termination and spec.early_termination else 'off'}"))
"""),
    code("""
df = sweep.run_sweep(spec, runs_root, early_termination=early_termination, parameters=parameters,
                     name=sweep_name, overwrite=overwrite, log=print)
sweep_dir = sweep.sweep_dir(runs_root, sweep_name or spec.name)
display(df.dropna(axis=1, how="all"))
""", "progress"),
    md("## Results"),
    code("""
display(report.sweep_heatmap(df, spec))
display(Markdown(f"*{table.EARLY_SCORE_HELP}*"))
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
early in training. This notebook compares runs over the same first samples, as one cohort (a
sweep, or the runs you list), and checks how well the early signals predict the final scores.
Runs that have not reached the window yet are not ranked.
"""),
    params("""
runs_root = None  # None: $LABKIT_RUNS, else PROJECT/runs
runs = None  # run names to compare as one cohort (None: every run with metrics)
first_samples = 256  # early window, in samples seen
task = "labkit_knowledge_mc"  # final score: an lm-eval task ...
metric = "acc"  # ... and its metric
interactive = True
"""),
    code(SETUP + """
from labkit import table, viz
from labkit.store import Store
""", "hide-input"),
    md("## Runs"),
    code("""
store = Store(runs_root)
store.sync()
cohort = list(runs) if runs else list(store.run_dirs())
if interactive:
    from labkit.widgets import RunsTable

    runs_table = RunsTable(runs_root, store=store)
    runs_table.refresh(cohort=cohort)
    display(runs_table)  # filter (SQL), sort, choose config columns
else:
    df = table.runs_table(runs_root, cohort=cohort, first_samples=first_samples, store=store)
    display(table.readable(df))
display(Markdown(f"*{table.EARLY_SCORE_HELP}*"))
"""),
    md("## Curves, by samples seen"),
    code("""
display(report.store_curves(store, runs, y="loss"))
display(report.store_curves(store, runs, y="grad_norm"))
"""),
    md("## Early dynamics and final scores"),
    code("""
early = store.cohort_early_scores(cohort, first_samples=first_samples).sort_values("early_rank", na_position="last")
display(Markdown(f"Over the first {first_samples} samples; higher early score is better (lower grad norm, "
                 "higher loss, the paper's rule); incomplete runs are not ranked."))
display(early)
display(viz.early_scatter(early.dropna(subset=["early_score"]), title=f"first {first_samples} samples"))
try:
    corr = store.correlate_early_with_final(task, metric, first_samples=first_samples, runs=cohort)
except KeyError as e:  # no evals of that task yet
    corr = None
    display(Markdown(f"No final scores to correlate with: {e.args[0]}"))
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
sweep_spec = "templates/sweeps/phased_vs_stacked.yaml"  # relative: to the project
runs_root = None  # None: $LABKIT_RUNS, else PROJECT/runs
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
spec = sweep.load_spec(paths.resolve(sweep_spec))
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
runs_root = None  # None: $LABKIT_RUNS, else PROJECT/runs
grid_spec = "templates/sweeps/bs_lr.yaml"  # relative: to the project
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
from labkit import study, sweep, table, viz
""", "hide-input"),
    md("## 1. Batch size x learning rate, early termination on"),
    code("""
grid = sweep.load_spec(paths.resolve(grid_spec))
grid_df = sweep.run_sweep(grid, runs_root, parameters=parameters, overwrite=overwrite, log=print)
grid_dir = sweep.sweep_dir(runs_root, grid.name)
display(grid_df.dropna(axis=1, how="all"))
display(report.sweep_heatmap(grid_df, grid))
display(Markdown(f"*{table.EARLY_SCORE_HELP}*"))
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
pair = sweep.load_spec(paths.resolve(pair_spec))
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
cohort = [c.name for c in sweep.expand(grid, runs_root)]  # the grid's runs: one cohort, the same first samples
early = store.cohort_early_scores(cohort, first_samples=window).sort_values("early_rank", na_position="last")
display(Markdown(f"*{table.EARLY_SCORE_HELP}*"))
display(early)
display(viz.early_scatter(early.dropna(subset=["early_score"]), title=f"first {window} samples"))
try:
    corr = store.correlate_early_with_final(task, metric, first_samples=window, runs=cohort)
except KeyError as e:  # no evals of that task
    corr = None
    display(Markdown(f"No final scores to correlate with: {e.args[0]}"))
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

# -- 05: the lab board ----------------------------------------------------------------------

LAB = [
    md("""
# The lab

Every run under the runs root in one table (filter with SQL, sort, choose config columns) and an
overlay chart of the runs you select: pick the metric and the x-axis (step, samples, tokens or
time), smooth with an EMA, switch to a log scale. The board refreshes itself every few seconds
without blocking the kernel; *Stop selected* asks the selected runs to checkpoint and stop.
"""),
    params("""
runs_root = None  # None: $LABKIT_RUNS, else PROJECT/runs
metric = "loss"
x_axis = "samples"  # step | samples | tokens | time
refresh_seconds = 5.0
interactive = True
"""),
    code(SETUP + """
from labkit import table
""", "hide-input"),
    code("""
if interactive:
    from labkit.widgets import Board

    board = Board(runs_root, y=metric, x=x_axis, interval=refresh_seconds)
    board.select.value = tuple(board.select.options[:4])  # overlay the newest runs; pick others below
    display(board)
else:
    from labkit.store import Store

    df = table.runs_table(runs_root)
    display(table.readable(df))
    names = df["run"].head(8).tolist()
    if names:
        display(report.store_curves(Store(runs_root), names, y=metric, x=x_axis))
    report.record("runs", df[["run", "state"]])
"""),
]

# -- 06: your data -----------------------------------------------------------------------------

DATA = [
    md("""
# Your data, as the trainer will see it

Each dataset read through labkit's converter (its card says the format), tokenized with the model's
chat template (or `chat_template` for a base model), and audited: samples, tokens, the labelled share,
samples with nothing to learn, whether every assistant turn ends in a labelled end-of-turn token, what
was dropped or truncated, the length histogram. Below each audit, a few samples token by token:
**green tokens are trained on**, grey ones are context. The same audit runs from a shell:
`labkit data check DATASET --model MODEL`.
"""),
    params("""
datasets = ["knowledge", "skills"]  # catalog names or paths
model = "tiny"  # a local Hugging Face checkpoint directory, or tiny
chat_template = None  # chatml | llama3 | granite | a .jinja file: for base models without one
max_seq_len = 2048
reasoning = "keep"  # keep | drop | template
train_on = "assistant"  # assistant | last_assistant | all
samples_shown = 3
interactive = True
runs_root = None
"""),
    code(SETUP + """
from labkit.data import audit
""", "hide-input"),
    code("""
tokenizer = audit.load_tokenizer(model, chat_template)
audits = {}
for name in datasets:
    result, samples = audit.audit(name, model, tokenizer=tokenizer, max_seq_len=max_seq_len,
                                  chat_template=chat_template, reasoning=reasoning, train_on=train_on)
    display(Markdown(f"### {name}"), audit.view(result, samples, tokenizer, samples_shown))
    audits[name] = result.as_dict()
report.record("audit", audits)
"""),
]

NOTEBOOKS = {
    "00_study.ipynb": ("The miniature study", STUDY),
    "01_run.ipynb": ("One run", RUN),
    "02_sweep.ipynb": ("A sweep", SWEEP),
    "03_early_dynamics.ipynb": ("Early-training dynamics", EARLY),
    "04_phased_vs_stacked.ipynb": ("Phased or stacked", PHASED),
    "05_lab.ipynb": ("The lab", LAB),
    "06_data.ipynb": ("Your data", DATA),
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
