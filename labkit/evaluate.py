"""Evaluate a run's checkpoint with lm-evaluation-harness and record the scores in the run dir.

Local tasks ship in `templates/eval_tasks/` (`labkit`, `labkit_knowledge_mc`, `labkit_skills_exact`)
and need no network; any standard lm-eval task name (`mmlu`, `leaderboard`, `ifeval`...) passes
straight to lm-eval. Scores land in `RUN_DIR/evals/STEP.json` (see docs/run-dir.md):

    {"run": NAME, "step": 123, "samples": 4567, "checkpoint": PATH, "time": UNIX,
     "results": [{"task": "labkit_knowledge_mc", "metric": "acc", "value": 0.41, "stderr": 0.04}, ...]}

Chat models are prompted through their own chat template (lm-eval's `apply_chat_template`): the
multiple-choice answer prefix opens the assistant's turn, so every model sees its training format.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labkit import runfiles

ROOT = Path(__file__).resolve().parent.parent
TASKS_DIR = ROOT / "templates" / "eval_tasks"
TASK = "labkit_"  # prefix of the local task names (the group is `labkit`)
_TASK_MANAGERS: dict[tuple[str, ...], Any] = {}  # indexing lm-eval's ~15k task files takes seconds


class EvalError(RuntimeError):
    """An evaluation that cannot run: bad target, unknown task, data that cannot be loaded."""


@dataclass
class EvalResult:
    run: str
    step: int
    samples: int | None
    checkpoint: str
    rows: list[dict[str, Any]]
    path: Path | None = None  # the evals/STEP.json written, if any
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # lm-eval's result, minus samples
    examples: dict[str, list] = field(default_factory=dict, repr=False)  # per task: prompts, responses

    def to_frame(self):
        import pandas as pd

        df = pd.DataFrame(self.rows, columns=["task", "metric", "value", "stderr"])
        return df.assign(run=self.run, step=self.step, samples=self.samples)

    def value(self, task: str, metric: str) -> float:
        for r in self.rows:
            if r["task"] == task and r["metric"] == metric:
                return r["value"]
        raise KeyError(f"no {task}/{metric} in {[(r['task'], r['metric']) for r in self.rows]}")


# -- what to evaluate --------------------------------------------------------------------------


@dataclass
class Target:
    checkpoint: Path
    run_dir: Path | None
    step: int
    samples: int | None


def _step_of(path: Path) -> int:
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def resolve_target(target: str | Path, run_dir: str | Path | None = None, step: int | None = None) -> Target:
    """The checkpoint to evaluate, the run it belongs to, and its step and samples.

    For a run dir that is its newest checkpoint (final/ first), or the one of `step` if given;
    for a checkpoint dir, `step` replaces the step recorded in its checkpoint.json.
    """
    target = Path(target).expanduser().resolve()
    if not target.is_dir():
        raise EvalError(f"{target}: no such directory (give a run directory or a checkpoint directory)")
    if (target / "config.json").is_file():
        ckpt = target
        if run_dir is None:
            if target.parent.name == "checkpoints":
                run_dir = target.parent.parent
            elif target.name == "final" and (target.parent / "config.yaml").is_file():
                run_dir = target.parent
    else:
        final = target / "final"
        # Only complete exports: a final/ without its marker (checkpoint.json, written last) is torn.
        final_ok = (final / "config.json").is_file() and (final / "checkpoint.json").is_file()
        steps = [p for p in runfiles.checkpoints(target) if (p / "config.json").is_file()]
        if step is not None:
            by_step = {_step_of(p): p for p in steps}
            if final_ok:
                by_step.setdefault(runfiles.read_json(final / "checkpoint.json").get("step", -1), final)
            if step not in by_step:
                raise EvalError(f"{target}: no checkpoint of step {step}; it has steps "
                                f"{sorted(k for k in by_step if k >= 0) or 'none'}")
            ckpt = by_step[step]
        elif final_ok:
            ckpt = final
        elif steps:
            ckpt = steps[-1]
        else:
            raise EvalError(f"{target}: not a checkpoint (no config.json) and not a run directory with "
                            "final/ or checkpoints/step-*/ holding a config.json")
        run_dir = run_dir or target
    run_dir = Path(run_dir).expanduser().resolve() if run_dir else None
    meta = runfiles.read_json(ckpt / "checkpoint.json")
    if not meta and ckpt.name == "final" and run_dir:
        meta = runfiles.read_json(run_dir / "status.json")
    if step is None:
        step = meta.get("step")
    if step is None:
        step = max(_step_of(ckpt), 0)
    return Target(ckpt, run_dir, int(step), meta.get("samples"))


# -- tasks -------------------------------------------------------------------------------------


def _render_local_tasks() -> Path:
    """templates/eval_tasks/ with relative `data_files` made absolute, so lm-eval works from any cwd.

    lm-eval hands `data_files` to `datasets`, which resolves them against the cwd; the shipped YAMLs
    name them relative to the repo root. The rendered copy is cached under .labkit/ by content.
    """
    import yaml

    from labkit.tiny import home

    files = sorted(p for p in TASKS_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    h = hashlib.sha256(str(ROOT).encode())
    for f in files:
        h.update(str(f.relative_to(TASKS_DIR)).encode() + f.read_bytes())
    out = home() / f"eval-tasks-{h.hexdigest()[:12]}"
    if out.is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-eval-tasks-", dir=out.parent))
    try:
        for f in files:
            dest = tmp / f.relative_to(TASKS_DIR)
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                cfg = yaml.safe_load(f.read_text()) if f.suffix in (".yaml", ".yml") else None
            except yaml.YAMLError:  # e.g. `!function` tags: lm-eval resolves those itself
                cfg = None
            data_files = (cfg.get("dataset_kwargs") or {}).get("data_files") if isinstance(cfg, dict) else None
            if data_files is None:
                shutil.copy2(f, dest)
                continue
            cfg["dataset_kwargs"]["data_files"] = _absolute(data_files)
            dest.write_text(yaml.safe_dump(cfg, sort_keys=False))
        try:
            tmp.rename(out)
        except OSError:
            if not out.is_dir():  # lost a race to an identical render: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _absolute(data_files: Any) -> Any:
    if isinstance(data_files, str):
        return data_files if "://" in data_files else str(ROOT / data_files)
    if isinstance(data_files, list):
        return [_absolute(x) for x in data_files]
    if isinstance(data_files, dict):
        return {k: _absolute(v) for k, v in data_files.items()}
    return data_files


def task_manager(include_path: str | Path | list[str | Path] | None = None):
    """lm-eval's TaskManager over its own tasks plus labkit's local ones (and `include_path`)."""
    extra = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
    paths = (str(_render_local_tasks()), *(str(Path(p).expanduser().resolve()) for p in extra))
    if paths not in _TASK_MANAGERS:
        from lm_eval.tasks import TaskManager

        _TASK_MANAGERS[paths] = TaskManager(include_path=list(paths))
    return _TASK_MANAGERS[paths]


def local_tasks() -> list[str]:
    """Names of the tasks shipped with labkit (they need no download)."""
    import yaml

    names = []
    for f in sorted(TASKS_DIR.glob("*.yaml")):
        cfg = yaml.safe_load(f.read_text()) or {}
        names.append(cfg.get("group") or cfg.get("task"))
    return [n for n in names if isinstance(n, str)]


def check_tasks(tasks: list[str], tm) -> None:
    known = set(tm.all_tasks)
    for name in tasks:
        if name in known:
            continue
        close = difflib.get_close_matches(name, tm.all_tasks, n=6, cutoff=0.6)
        hint = f"did you mean: {', '.join(close)}?" if close else f"labkit's local tasks: {', '.join(local_tasks())}"
        raise EvalError(f"unknown task {name!r}: lm-eval knows no task, group or tag by that name; {hint}")


def load_tasks(tasks: list[str], tm) -> list:
    """Build every task (this loads its data) one name at a time, so a failure names its task."""
    objs: list = []
    for name in tasks:
        try:
            loaded = tm.load([name])
        except ImportError as e:
            raise EvalError(f"task {name!r} needs a package that is not installed ({e}); lm-eval lists the "
                            f"extras per task, e.g. `pip install 'lm-eval[{name}]'`") from e
        except Exception as e:  # noqa: BLE001 - datasets/hub raise many kinds; all mean "no data"
            raise EvalError(
                f"the dataset for task {name!r} could not be loaded (offline? it must be downloadable or "
                f"already in the Hugging Face cache): {type(e).__name__}: {e}. "
                f"Tasks that need no download: {', '.join(local_tasks())}"
            ) from e
        if name in loaded["groups"]:
            objs.append(loaded["groups"][name])
        elif name in loaded["tasks"]:
            objs.append(loaded["tasks"][name])
        else:  # a tag: its tasks
            objs.extend(loaded["tasks"].values())
    return objs


# -- results -----------------------------------------------------------------------------------


def result_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """lm-eval's per-task `results` as rows; `acc,none` becomes `acc`, other filters stay `acc,FILTER`."""
    rows = []
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, sep, filt = key.partition(",")
            if not sep or "_stderr" in metric or runfiles.finite_number(value) is None:
                continue
            stderr = runfiles.finite_number(metrics.get(f"{metric}_stderr,{filt}"))
            rows.append({"task": task, "metric": metric if filt == "none" else key,
                         "value": float(value), "stderr": stderr})
    return rows


def write_results(run_dir: Path, step: int, samples: int | None, checkpoint: Path | str | None,
                  rows: list[dict[str, Any]]) -> Path:
    """Write (atomically) RUN_DIR/evals/STEP.json; rows of other tasks already there for STEP are kept."""
    path = Path(run_dir) / "evals" / f"{step}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    new_tasks = {r["task"] for r in rows}
    kept = [r for r in runfiles.read_json(path).get("results") or [] if isinstance(r, dict) and r.get("task") not in new_tasks]
    data = {"run": Path(run_dir).name, "step": step, "samples": samples, "checkpoint": str(checkpoint) if checkpoint else None,
            "time": time.time(), "results": kept + rows}
    runfiles.write_json_atomic(path, data)  # its temp name does not end in .json: readers glob those
    return path


# -- the evaluation ----------------------------------------------------------------------------


def evaluate(
    target: str | Path,
    tasks: list[str] | str,
    limit: int | float | None = None,
    device: str | None = None,
    batch_size: int | str = 8,
    step: int | None = None,
    write: bool = True,
    num_fewshot: int | None = None,
    *,
    run_dir: str | Path | None = None,
    chat: bool | None = None,
    include_path: str | Path | list[str | Path] | None = None,
) -> EvalResult:
    """Evaluate `target` (a run dir: its newest checkpoint; or any local HF checkpoint dir) on `tasks`.

    `limit` caps the examples per task (a float < 1 is a fraction); `run_dir` names the run whose
    evals/ receives the scores when `target` is a checkpoint outside it; `chat` applies the model's
    chat template (default: whenever the tokenizer has one); `include_path` adds your own lm-eval
    task YAMLs. Nothing is written unless the whole evaluation succeeds.
    """
    tasks = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not tasks:
        raise EvalError("no tasks given")
    tgt = resolve_target(target, run_dir, step)
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tm = task_manager(include_path)
    check_tasks(tasks, tm)
    objs = load_tasks(tasks, tm)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    lm = HFLM(pretrained=str(tgt.checkpoint), device=device, batch_size=batch_size, dtype="auto")
    if chat is None:
        chat = bool(getattr(lm.tokenizer, "chat_template", None))
    raw = simple_evaluate(model=lm, tasks=objs, task_manager=tm, limit=limit, num_fewshot=num_fewshot,
                          apply_chat_template=chat)
    raw = dict(raw or {})
    examples = raw.pop("samples", {})
    rows = result_rows(raw.get("results", {}))
    run = tgt.run_dir.name if tgt.run_dir else tgt.checkpoint.name
    result = EvalResult(run=run, step=tgt.step, samples=tgt.samples, checkpoint=str(tgt.checkpoint),
                        rows=rows, raw=raw, examples=examples)
    if write and tgt.run_dir is not None:
        result.path = write_results(tgt.run_dir, tgt.step, tgt.samples, tgt.checkpoint, rows)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m labkit.evaluate",
                                 description="Evaluate a run's newest checkpoint (or any HF checkpoint) with lm-eval.")
    ap.add_argument("target", nargs="?", help="run directory or checkpoint directory")
    ap.add_argument("--tasks", default="labkit", help="comma-separated lm-eval task/group names (default: labkit)")
    ap.add_argument("--limit", type=float, default=None, help="examples per task (< 1: a fraction)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ap.add_argument("--batch-size", default="8", help="an integer or 'auto'")
    ap.add_argument("--num-fewshot", type=int, default=None)
    ap.add_argument("--step", type=int, default=None, help="step to record (default: from checkpoint.json)")
    ap.add_argument("--run-dir", default=None, help="write into this run's evals/ (for a checkpoint outside it)")
    ap.add_argument("--no-write", action="store_true", help="print the scores only")
    ap.add_argument("--no-chat", action="store_true", help="do not apply the model's chat template")
    ap.add_argument("--include-path", action="append", default=[], help="a folder of your own lm-eval task YAMLs")
    ap.add_argument("--list", action="store_true", help="list labkit's local tasks and exit")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(local_tasks()))
        return 0
    if not args.target:
        ap.error("TARGET is required")
    if all(t == "labkit" or t.startswith(TASK) for t in args.tasks.split(",")):
        # Local tasks read only local files: keep `datasets` and the hub off the network. Only here, in
        # a process of its own: both libraries read these once, at import, for the whole process.
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    batch_size = int(args.batch_size) if args.batch_size.isdigit() else args.batch_size
    try:
        res = evaluate(args.target, args.tasks, limit=limit, device=args.device, batch_size=batch_size,
                       step=args.step, write=not args.no_write, num_fewshot=args.num_fewshot,
                       run_dir=args.run_dir, chat=False if args.no_chat else None,
                       include_path=args.include_path or None)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{res.run} step {res.step} ({res.checkpoint})")
    for r in res.rows:
        err = f" ± {r['stderr']:.4f}" if r["stderr"] is not None else ""
        print(f"  {r['task']:32s} {r['metric']:24s} {r['value']:.4f}{err}")
    if res.path:
        print(f"wrote {res.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
