"""Sweeps: a grid of run configs, each executed as a papermill notebook, with early termination.

A sweep spec (`templates/sweeps/*.yaml`) names a base run config and the axes to vary. Every run
executes `notebooks/01_run.ipynb` headless; the executed notebook is kept as `RUN_DIR/report.ipynb`,
failed or not. While runs train, a watcher thread applies successive halving on the shared resource
axis (samples seen, or steps): at each rung (`probe_samples: 384`, or a list `[256, 1024]` for one
rung each), runs whose early-training score ranks in the worst `stop_fraction` get a STOP file.
Decisions and the compute they saved go to `SWEEP_DIR/sweep.json`.

Comparing runs on one axis when fewer run at once than the sweep holds: at a rung, every run that
reached it is ranked against *all* runs of this sweep that reached it and survived the rungs before
(live, finished or stopped there), by their score over the same first budget, and stopped when its
rank falls in the worst floor(stop_fraction * n) of those n runs. Each run is judged once per rung.
A decision waits while a live run is still short of the rung, so runs started together are ranked
together (with every run at once this is plain successive halving), but a run waits at most `wait`
budgets more; later runs then face the bar set by the earlier ones, as in asynchronous successive
halving (ASHA). Ties in the score go to the run with the lower early gradient norm.
"""

from __future__ import annotations

import argparse
import itertools
import json
import keyword
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from labkit import rundirs, runfiles
from labkit.config import ConfigError, RunConfig, error_lines, from_dict, read_mapping, set_dotted

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_NOTEBOOK = "notebooks/01_run.ipynb"
SWEEPS_DIR = "sweeps"  # sweep dirs live in RUNS_ROOT/sweeps/NAME/, beside the run dirs

# Short names for the axes people sweep most, so run names stay readable.
ALIASES = {
    "effective_batch_size": "ebs",
    "learning_rate": "lr",
    "schedule": "sched",
    "warmup_steps": "warm",
    "warmup_ratio": "warm",
    "max_tokens_per_device": "mtpd",
    "weight_decay": "wd",
    "epochs": "ep",
    "seed": "seed",
    "max_steps": "steps",
}


class SweepError(ValueError):
    """A sweep spec that cannot be expanded; the message names the file and the bad entry."""


class EarlyTermination(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # One probe budget, or a list: one rung of successive halving each (e.g. [256, 1024]).
    probe_samples: int | list[int] | None = None
    probe_steps: int | list[int] | None = None
    stop_fraction: float = Field(default=0.5, gt=0.0, lt=1.0)
    min_runs: int = Field(default=2, ge=2)
    score: str = "paper"
    # How far past a rung (in that rung's budgets) a run may train while its decision waits for
    # slower live runs to reach it; after that it is ranked against the runs that reached it so far.
    wait: float = Field(default=1.0, ge=0.0)
    enabled: bool = True

    @model_validator(mode="after")
    def _probes(self) -> EarlyTermination:
        if (self.probe_samples is None) == (self.probe_steps is None):
            raise ValueError("give exactly one of 'probe_samples' or 'probe_steps'")
        budgets = self.budgets
        if not budgets or min(budgets) < 1 or budgets != sorted(set(budgets)):
            raise ValueError(f"probe budgets must be positive and increasing, got {budgets}")
        return self

    @property
    def axis(self) -> str:
        return "samples" if self.probe_samples is not None else "step"

    @property
    def budgets(self) -> list[int]:
        """One budget per rung, in the order the runs reach them."""
        probe = self.probe_samples if self.probe_samples is not None else self.probe_steps
        return list(probe) if isinstance(probe, list) else [probe]  # type: ignore[list-item]

    @property
    def budget(self) -> int:
        """The first rung's budget: the early window that `early_score` describes."""
        return self.budgets[0]


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    base: str | dict[str, Any]
    axes: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(default_factory=dict)
    runs: list[dict[str, Any]] = Field(default_factory=list)
    # Runs at once; null: all of them (on GPUs, labkit.gpus then starts each when its GPUs are free).
    concurrency: int | None = Field(default=2, ge=1)
    # Where the runs train: this machine, or one Slurm job per run (labkit.slurm).
    backend: Literal["local", "slurm"] = "local"
    early_termination: EarlyTermination | None = None
    notebook: str = DEFAULT_NOTEBOOK
    runs_root: str | None = None
    # Extra papermill parameters for every run's notebook (evaluate_tasks, eval_limit, ...).
    parameters: dict[str, Any] = Field(default_factory=dict)
    source: str | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _check(self) -> SweepSpec:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ValueError(f"name {self.name!r}: use letters, digits, '.', '_' and '-'")
        if not self.axes and not self.runs:
            raise ValueError("nothing to run: give 'axes' and/or 'runs'")
        check_parameters(self.parameters)
        return self


# Set by the sweep for every run's notebook; a spec must not change them.
SWEEP_PARAMETERS = ("config_path", "overrides", "runs_root", "interactive", "wait")


def check_parameters(params: dict[str, Any], where: str = "parameters") -> dict[str, Any]:
    """Notebook parameters as plain data, or a ValueError naming the bad entry.

    papermill writes each parameter into the notebook as `name = literal`: the name is pasted as
    code, so it must be an identifier, and a value must be JSON data (str, number, bool, null,
    lists, mappings with string keys) that papermill can only write as a literal.
    """
    for name, value in params.items():
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise ValueError(f"{where}: {name!r} is not a valid parameter name (a Python identifier: "
                             "letters, digits and '_')")
        if name in SWEEP_PARAMETERS:
            raise ValueError(f"{where}.{name}: set by the sweep for every run; change the run config instead")
        _check_data(value, f"{where}.{name}")
    return params


def _check_data(value: Any, where: str) -> None:
    if value is None or isinstance(value, bool | int | float | str):
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check_data(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: mapping keys must be strings, got {k!r}")
            _check_data(v, f"{where}.{k}")
        return
    raise ValueError(f"{where}: must be plain data (string, number, bool, null, list, mapping), "
                     f"got {type(value).__name__}")


def load_spec(path: str | Path) -> SweepSpec:
    return _validate(_read_mapping(path, "sweep spec"), str(path))


def _read_mapping(path: str | Path, what: str) -> dict[str, Any]:
    try:
        return read_mapping(path, what)
    except ConfigError as e:
        raise SweepError(str(e)) from None


def _validate(data: dict[str, Any], source: str | None) -> SweepSpec:
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as e:
        lines = [f"{source or 'sweep spec'}: invalid sweep spec:", *error_lines(e, "(spec)")]
        raise SweepError("\n".join(lines)) from None
    spec.source = source
    return spec


def as_spec(spec: SweepSpec | dict[str, Any] | str | Path) -> SweepSpec:
    if isinstance(spec, SweepSpec):
        return spec
    if isinstance(spec, dict):
        return _validate(spec, None)
    return load_spec(spec)


# -- expansion ---------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if value != 0 and (abs(value) < 0.1 or abs(value) >= 1e4):
            mantissa, exp = f"{value:.3e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "+".join(_fmt(v) for v in value)
    if isinstance(value, dict):
        return "+".join(f"{k}-{_fmt(v)}" for k, v in value.items())
    return str(value)


def run_key(overrides: dict[str, Any]) -> str:
    """The part of a run name that identifies its overrides, e.g. `ebs32_lr3e-3`."""
    if "name" in overrides:
        return str(overrides["name"])
    parts = []
    for key, value in overrides.items():
        alias = ALIASES.get(key, key.split(".")[-1].replace("_", "-"))
        sep = "" if isinstance(value, int | float) and not isinstance(value, bool) else "-"
        parts.append(f"{alias}{sep}{_fmt(value)}")
    key = "_".join(parts) or "base"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", key).strip("-.")[:100]


def _base(spec: SweepSpec) -> dict[str, Any]:
    if isinstance(spec.base, dict):
        return dict(spec.base)
    candidates = [Path(spec.base)]
    if spec.source:
        candidates.insert(0, Path(spec.source).parent / spec.base)
    candidates.append(ROOT / spec.base)
    for path in candidates:
        if path.is_file():
            return _read_mapping(path, "base run config")
    raise SweepError(f"{spec.source or 'sweep spec'}: base: no such run config {spec.base!r}")


def overrides_of(spec: SweepSpec) -> list[dict[str, Any]]:
    """One overrides dict per run: the grid product of `axes`, then the explicit `runs`."""
    out = []
    if spec.axes:
        keys = list(spec.axes)
        out += [dict(zip(keys, combo)) for combo in itertools.product(*spec.axes.values())]
    out += [dict(r) for r in spec.runs]
    return out


def expand(spec: SweepSpec | dict[str, Any] | str | Path, runs_root: str | Path | None = None) -> list[RunConfig]:
    """The sweep's run configs, named `SWEEP__KEY`; an invalid combination names its axis values."""
    spec = as_spec(spec)
    base = _base(spec)
    root = runs_root or spec.runs_root
    where = spec.source or "sweep spec"
    configs, seen = [], {}
    for i, over in enumerate(overrides_of(spec)):
        name = f"{spec.name}__{run_key(over)}"
        if name in seen:
            raise SweepError(f"{where}: runs {seen[name]} and {i} both get the name {name!r}; "
                             "give one of them a distinct 'name'")
        seen[name] = i
        updates = {k: v for k, v in over.items() if k != "name"}
        updates["name"] = name
        if root is not None:
            updates["runs_root"] = str(root)
        data = json.loads(json.dumps(base))
        for key, value in updates.items():
            set_dotted(data, key, value)
        try:
            configs.append(from_dict(data, source=f"{where}: run {name} ({_describe(over)})"))
        except ConfigError as e:
            raise SweepError(str(e)) from None
    return configs


def _describe(over: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in over.items()) or "base config"


# -- early termination -------------------------------------------------------------------------


def early_scores(runs_root: Path, names: list[str], et: EarlyTermination, budget: int) -> dict[str, dict[str, float]]:
    """Early score (higher is better) and signals per run over the first `budget` samples or steps
    (et.axis), relative to `names`."""
    from labkit.store import Store

    kw = {"first_samples": budget} if et.axis == "samples" else {"first_steps": budget}
    df = Store(runs_root).early_dynamics(runs=names, score=et.score, **kw)
    return {r["run_id"]: {"early_score": float(r["early_score"]), "grad_norm_mean": float(r["grad_norm_mean"]),
                          "loss_mean": float(r["loss_mean"])}
            for _, r in df.iterrows() if r["complete"] and is_number(r["early_score"])}


def is_number(x: Any) -> bool:
    """A finite number, or something float() reads as one (None, NaN, '' and text are not)."""
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


class Watcher:
    """Applies the early-termination rule to a sweep's live runs (see the module docstring)."""

    def __init__(self, sweep: Sweep, et: EarlyTermination, poll: float = 1.0):
        self.sweep, self.et, self.poll = sweep, et, poll
        self.decided: list[set[str]] = [set() for _ in et.budgets]  # per rung: runs judged there
        self.stopped: dict[str, dict[str, Any]] = {}
        self.scores: dict[str, float] = {}  # early scores over the first rung's budget
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sweep-watcher", daemon=True)
        self.error: str | None = None

    def start(self) -> None:
        import labkit.store  # noqa: F401 - import duckdb now, not at the first decision

        self._thread.start()

    def close(self) -> None:
        self._done.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._done.wait(self.poll):
            try:
                self.tick()
            except Exception as e:  # noqa: BLE001 - a store hiccup must not kill the sweep
                self.error = f"{type(e).__name__}: {e}"
                self.sweep.log(f"early termination: {self.error}")

    def position(self, status: dict[str, Any]) -> int:
        return int(status.get("samples" if self.et.axis == "samples" else "step") or 0)

    def tick(self) -> None:
        states = {name: runfiles.read_status(self.sweep.run_dirs[name]) for name in self.sweep.names}
        for rung, budget in enumerate(self.et.budgets):
            self._decide(rung, budget, states)

    def _decide(self, rung: int, budget: int, states: dict[str, dict[str, Any]]) -> None:
        """One rung: rank the runs that reached `budget` (and survived the rungs before) and stop the worst."""
        sweep, et = self.sweep, self.et
        probed, live_short, position = [], False, {}
        for name, st in states.items():
            if self.stopped.get(name, {}).get("rung", rung + 1) <= rung:
                continue  # out at an earlier rung: it takes no place in later pools
            live = name in sweep.in_flight and st.get("state") not in runfiles.FINAL_STATES
            position[name] = self.position(st)
            if position[name] >= budget:
                probed.append((name, live))
            elif live:
                live_short = True
        candidates = [n for n, live in probed if live and n not in self.decided[rung]]
        overdue = any(position[n] >= budget * (1 + et.wait) for n in candidates)
        # Runs started together are ranked together: wait for live runs still short of the rung,
        # unless a candidate has already trained `wait` budgets past it.
        if (live_short and not overdue) or not candidates or len(probed) < et.min_runs:
            return
        signals = early_scores(sweep.runs_root, [n for n, _ in probed], et, budget)
        scores = {n: v["early_score"] for n, v in signals.items()}
        if rung == 0:
            self.scores.update(scores)
        # Best first; ties (the paper score is a sum of ranks) go to the lower early grad norm.
        pool = sorted(scores, key=lambda n: (-scores[n], signals[n]["grad_norm_mean"], n))
        if len(pool) < et.min_runs:
            return
        n_stop = math.floor(et.stop_fraction * len(pool))
        worst = set(pool[len(pool) - n_stop:]) if n_stop else set()
        now = time.time()
        live = {n for n, is_live in probed if is_live}
        decision = {"time": now, "rung": rung + 1, "axis": et.axis, "budget": budget, "pool": len(pool),
                    "ranking": [{"run": n, **signals[n], "rank": i + 1,
                                 "verdict": "decided earlier" if n in self.decided[rung]
                                 else "ended before the decision" if n not in live else None}
                                for i, n in enumerate(pool)],
                    "stopped": [], "kept": []}
        verdicts = {}
        rung_text = f"rung {rung + 1}/{len(et.budgets)}, " if len(et.budgets) > 1 else ""
        for name in candidates:
            if name not in scores:
                continue  # the store has no score yet (too few rows); try on the next tick
            self.decided[rung].add(name)
            rank = pool.index(name) + 1
            if name in worst:
                reason = (f"early termination by sweep {sweep.name}: early score {scores[name]:.4g} ranks "
                          f"{rank}/{len(pool)} after {budget} {et.axis} ({rung_text}worst "
                          f"{et.stop_fraction:.0%} stop)")
                runfiles.request_stop(sweep.run_dirs[name], reason)
                self.stopped[name] = {**signals[name], "rank": rank, "pool": len(pool), "time": now,
                                      "rung": rung + 1, "budget": budget, "reason": reason}
                decision["stopped"].append(name)
                verdicts[name] = "stopped"
                sweep.log(f"stop {name}: {reason}")
            else:
                decision["kept"].append(name)
                verdicts[name] = "kept"
        for r in decision["ranking"]:
            r["verdict"] = verdicts.get(r["run"], r["verdict"])
        sweep.record_decision(decision)


# -- execution ---------------------------------------------------------------------------------


class Sweep:
    """One sweep execution: run configs, their notebooks, the watcher and `sweep.json`."""

    def __init__(self, spec: SweepSpec, runs_root: Path, name: str | None = None, log=print):
        if name and name != spec.name:
            spec = spec.model_copy(update={"name": name})
        self.spec, self.name, self.log = spec, spec.name, log
        self.runs_root = Path(runs_root)
        self.dir = self.runs_root / SWEEPS_DIR / self.name
        self.configs = expand(spec, runs_root)
        self.overrides = overrides_of(spec)
        self.names = [c.name for c in self.configs]
        self.run_dirs = {c.name: c.run_dir for c in self.configs}
        self.in_flight: set[str] = set()
        self._lock = threading.Lock()
        self.record: dict[str, Any] = {}

    @property
    def concurrency(self) -> int:
        """Runs at once: the spec's concurrency, or all runs when it is null."""
        return min(self.spec.concurrency or len(self.configs), len(self.configs))

    def save(self) -> None:
        with self._lock:
            self.dir.mkdir(parents=True, exist_ok=True)
            runfiles.write_json_atomic(self.dir / "sweep.json", self.record)

    def record_decision(self, decision: dict[str, Any]) -> None:
        with self._lock:
            self.record["early_termination"]["decisions"].append(decision)
            self.record["early_termination"]["stopped"].update(
                {n: self.watcher.stopped[n] for n in decision["stopped"]})
        self.save()

    def execute(self, early_termination: bool = True, parameters: dict[str, Any] | None = None,
                poll: float = 1.0) -> list[dict[str, Any]]:
        spec = self.spec
        et = spec.early_termination if early_termination and spec.early_termination else None
        if et is not None and not et.enabled:
            et = None
        try:
            params = {**spec.parameters, **check_parameters(dict(parameters or {}))}
        except ValueError as e:
            raise SweepError(f"sweep {self.name}: {e}") from None
        self.dir.mkdir(parents=True, exist_ok=True)
        cfg_dir = self.dir / "configs"
        cfg_dir.mkdir(exist_ok=True)
        self.record = {
            "name": self.name, "spec": spec.model_dump(mode="json"), "source": spec.source,
            "runs_root": str(self.runs_root), "started_at": time.time(), "ended_at": None,
            "concurrency": spec.concurrency, "parameters": params,
            "runs": [{"name": c.name, "key": run_key(o), "overrides": o, "config": str(cfg_dir / f"{c.name}.yaml"),
                      "notebook": str(c.run_dir / "report.ipynb")} for c, o in zip(self.configs, self.overrides)],
            "early_termination": ({**et.model_dump(), "decisions": [], "stopped": {}} if et else None),
        }
        for c in self.configs:
            c.save(cfg_dir / f"{c.name}.yaml")
        self.save()
        self.watcher = Watcher(self, et, poll) if et else None
        if self.watcher:
            self.watcher.start()
        try:
            with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="sweep") as pool, \
                    _backend(spec.backend):
                futures = [pool.submit(self._run_one, c, cfg_dir / f"{c.name}.yaml", params) for c in self.configs]
                results = [f.result() for f in futures]
        finally:
            if self.watcher:
                self.watcher.close()
        self.record["results"] = results
        self.record["ended_at"] = time.time()
        if et:
            self.record["early_termination"]["scores"] = self.watcher.scores
            self.record["early_termination"]["watcher_error"] = self.watcher.error
            self.record["compute"] = compute_saved(self.run_dirs, self.watcher.stopped)
        self.save()
        return results

    def _run_one(self, cfg: RunConfig, config_path: Path, params: dict[str, Any]) -> dict[str, Any]:
        from labkit.report import execute

        run_dir = cfg.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        out = run_dir / "report.ipynb"
        notebook = Path(self.spec.notebook)
        if not notebook.is_absolute():
            notebook = ROOT / notebook
        # Runs at once share the cores: oversubscribed torch threads slow every run down a lot.
        threads = max(1, (os.cpu_count() or 1) // self.concurrency)
        if self.spec.backend == "slurm":
            threads = None  # the jobs train elsewhere: this machine's cores are not theirs to share
        parameters = {"config_path": str(config_path.resolve()), "overrides": {}, "threads": threads,
                      "runs_root": str(self.runs_root.resolve()), "interactive": False, "wait": True, **params}
        t0 = time.time()
        with self._lock:
            self.in_flight.add(cfg.name)
        self.log(f"start {cfg.name}")
        error = None
        try:
            execute(notebook, out, parameters)
        except Exception as e:  # noqa: BLE001 - a failed run keeps its notebook; the sweep goes on
            error = _short_error(e)
        finally:
            with self._lock:
                self.in_flight.discard(cfg.name)
        st = runfiles.read_status(run_dir)
        result = {"name": cfg.name, "state": st.get("state") if not error or st.get("state") == "failed"
                  else "failed", "notebook_error": error, "seconds": round(time.time() - t0, 1)}
        self.log(f"end   {cfg.name}: {result['state']} in {result['seconds']}s" + (f" ({error})" if error else ""))
        return result


@contextmanager
def _backend(backend: str) -> Iterator[None]:
    """The backend every run notebook's `launch()` uses (it reads $LABKIT_BACKEND), for this sweep."""
    from labkit.launch import BACKEND_ENV

    old = os.environ.get(BACKEND_ENV)
    os.environ[BACKEND_ENV] = backend
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(BACKEND_ENV, None)
        else:
            os.environ[BACKEND_ENV] = old


def _short_error(e: Exception) -> str:
    ename, evalue = getattr(e, "ename", None), getattr(e, "evalue", None)
    text = f"{ename}: {evalue}" if ename else f"{type(e).__name__}: {e}"
    return " ".join(line.strip() for line in text.splitlines())[:1000]


def planned_samples(run_dir: Path) -> int:
    """Samples the run would see to the end (the trainer's status.json: its data, capped by max_steps)."""
    return int(runfiles.read_status(run_dir).get("total_samples") or 0)


def compute_saved(run_dirs: dict[str, Path], stopped: dict[str, Any]) -> dict[str, Any]:
    """Samples not spent: planned total samples minus samples seen, summed over the stopped runs."""
    planned = seen = saved = 0
    for name, run_dir in run_dirs.items():
        total = planned_samples(run_dir)
        done = int(runfiles.read_status(run_dir).get("samples") or 0)
        planned += total
        seen += done
        if name in stopped:
            saved += max(total - done, 0)
    return {"planned_samples": planned, "seen_samples": seen, "saved_samples": saved,
            "saved_fraction": saved / planned if planned else 0.0}


def sweep_dir(runs_root: str | Path, name: str) -> Path:
    return Path(runs_root) / SWEEPS_DIR / name


def run_sweep(spec: SweepSpec | dict[str, Any] | str | Path, runs_root: str | Path | None = None,
              early_termination: bool = True, parameters: dict[str, Any] | None = None,
              name: str | None = None, overwrite: bool = False, poll: float = 1.0, log=print):
    """Run every config of the sweep through the run notebook; returns the summary table.

    Runs that already exist under `runs_root` are an error unless `overwrite` (which moves them
    to RUNS/.trash/ and clears the sweep's record first).
    """
    spec = as_spec(spec)
    root = Path(runs_root or spec.runs_root or "runs")
    sweep = Sweep(spec, root, name=name, log=log)
    existing = [d for d in sweep.run_dirs.values() if d.exists()]
    if existing and not overwrite:
        raise SweepError(f"sweep {sweep.name}: {len(existing)} of its runs already exist under {root} "
                         f"({existing[0].name}, ...); pass overwrite=True (the old runs move to .trash/) or another name")
    if overwrite:
        from labkit.launch import Run

        for d in existing:
            if Run(d).is_alive():
                raise SweepError(f"{d}: run is still live; stop it before overwriting the sweep")
            rundirs.trash(d)  # moved aside, never deleted: labkit/rundirs.py
        # Not the whole sweep dir: a sweep notebook may be writing its report.ipynb there.
        shutil.rmtree(sweep.dir / "configs", ignore_errors=True)
        (sweep.dir / "sweep.json").unlink(missing_ok=True)
    sweep.execute(early_termination=early_termination, parameters=parameters, poll=poll)
    return summary(sweep.dir)


# -- reading a sweep back ----------------------------------------------------------------------


def read_sweep(sweep_dir: str | Path) -> dict[str, Any]:
    path = Path(sweep_dir) / "sweep.json"
    if not path.is_file():
        raise SweepError(f"{path}: no sweep record here")
    return json.loads(path.read_text())


def summary(sweep_dir: str | Path):
    """One row per run: axis values, state, samples, early score, stop decision, final loss, evals."""
    import pandas as pd

    from labkit.report import run_summary

    rec = read_sweep(sweep_dir)
    et = rec.get("early_termination") or {}
    stopped, scores = et.get("stopped", {}), et.get("scores", {})
    results = {r["name"]: r for r in rec.get("results", [])}
    rows = []
    for run in rec["runs"]:
        s = run_summary(Path(run["notebook"]).parent)
        result = results.get(run["name"], {})
        rows.append({"run": run["name"], "key": run["key"], **{k: _cell(v) for k, v in run["overrides"].items()},
                     "state": result.get("state") or s["state"], "samples": s["samples"],
                     "planned_samples": s["planned_samples"], "final_loss": s["final_loss"],
                     "final_val_loss": s["final_val_loss"], "best_val_loss": s["best_val_loss"],
                     "early_score": scores.get(run["name"]),
                     # Stopped by this sweep, and not finished before the STOP file was read.
                     "stopped_early": run["name"] in stopped and s["state"] == "stopped",
                     "error": result.get("notebook_error") or s["error"], **s["evals"]})
    return pd.DataFrame(rows)


def _cell(v: Any) -> Any:
    return v if isinstance(v, int | float | str | bool) or v is None else _fmt(v)


def eval_files(run_dir: str | Path) -> list[Path]:
    """RUN_DIR/evals/STEP.json files, oldest step first."""
    return sorted((Path(run_dir) / "evals").glob("*.json"), key=_step_of)


def eval_scores(run_dir: str | Path, path: Path | None = None) -> dict[str, float]:
    """Scores of one `evals/STEP.json` (default: the newest) as {'task/metric': value}."""
    from labkit.store import read_eval_file

    files = [path] if path else eval_files(run_dir)[-1:]
    if not files:
        return {}
    try:
        rows = read_eval_file(files[0])
    except ValueError:
        return {}  # a file being written; the next read sees it whole
    return {f"{r['task']}/{r['metric']}": float(r["value"]) for r in rows if is_number(r["value"])}


def _step_of(p: Path) -> float:
    digits = re.sub(r"\D", "", p.stem)
    return int(digits) if digits else math.inf  # `final.json` after every step


def compare_with_full(et_sweep_dir: str | Path, full_sweep_dir: str | Path, score: str) -> dict[str, Any]:
    """Were the runs the early-terminated sweep stopped in fact worse by final score in the full sweep?

    `score` is a column of `summary()` (e.g. `labkit_knowledge_mc/acc` or `final_loss`; for a
    loss, lower is better). Runs are matched by their key (the axis values).
    """
    et, full = summary(et_sweep_dir), summary(full_sweep_dir)
    if score not in full.columns:
        raise SweepError(f"{full_sweep_dir}: no {score!r} column; have {sorted(full.columns)}")
    lower_better = "loss" in score
    final = dict(zip(full["key"], full[score]))
    stopped = list(et.loc[et["stopped_early"], "key"])
    kept = [k for k in et["key"] if k not in stopped]
    order = sorted((k for k in final if is_number(final[k])), key=lambda k: final[k], reverse=not lower_better)
    rank = {k: i + 1 for i, k in enumerate(order)}
    n_stop = len(stopped)
    worst = set(order[len(order) - n_stop:]) if n_stop else set()
    rows = [{"key": k, "final": final.get(k), "final_rank": rank.get(k), "stopped": k in stopped,
             "in_worst": k in worst} for k in et["key"]]
    hits = sum(1 for k in stopped if k in worst)
    best_kept = [rank[k] for k in kept if k in rank]
    return {"score": score, "lower_is_better": lower_better, "runs": rows, "stopped": stopped,
            "stopped_in_worst": hits, "precision": hits / n_stop if n_stop else None,
            "best_run_kept": bool(order) and order[0] in kept, "best_kept_rank": min(best_kept, default=None)}


SWEEP_NOTEBOOK = "notebooks/02_sweep.ipynb"


def run_sweep_notebook(spec_path: str | Path, runs_root: str | Path = "runs", name: str | None = None,
                       early_termination: bool = True, overwrite: bool = False,
                       parameters: dict[str, Any] | None = None) -> Path:
    """Execute `02_sweep.ipynb` for a spec file, leaving its report in SWEEP_DIR/report.ipynb."""
    import papermill as pm

    from labkit.report import execute

    spec = load_spec(spec_path)
    expand(spec, runs_root)  # a bad spec fails here, before any kernel starts
    out_dir = sweep_dir(runs_root, name or spec.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "report.ipynb"
    try:
        execute(ROOT / SWEEP_NOTEBOOK, out, {
            "sweep_spec": str(Path(spec_path).resolve()), "runs_root": str(Path(runs_root).resolve()),
            "sweep_name": name, "early_termination": early_termination, "overwrite": overwrite,
            "parameters": parameters or {}, "interactive": False})
    except pm.PapermillExecutionError as e:
        raise SweepError(f"the sweep notebook failed: {_short_error(e)} (executed notebook: {out})") from None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m labkit.sweep", description="Run a sweep spec.")
    ap.add_argument("spec", help="sweep spec YAML (templates/sweeps/*.yaml)")
    ap.add_argument("--root", default="runs", help="runs root (default: runs)")
    ap.add_argument("--name", default=None, help="sweep name (default: the spec's)")
    ap.add_argument("--no-early-termination", action="store_true", help="run every config to the end")
    ap.add_argument("--overwrite", action="store_true", help="delete the sweep's earlier runs first")
    ap.add_argument("--dry-run", action="store_true", help="list the run names and exit")
    return cli(ap.parse_args(argv))


def cli(args: argparse.Namespace) -> int:
    """`labkit sweep`: the sweep runs inside `02_sweep.ipynb`, so it leaves a report beside sweep.json."""
    try:
        if args.dry_run:
            for cfg in expand(args.spec, args.root):
                print(f"{cfg.name}  {cfg.run_dir}")
            return 0
        spec = load_spec(args.spec)
        out = run_sweep_notebook(args.spec, args.root, name=args.name,
                                 early_termination=not args.no_early_termination, overwrite=args.overwrite)
    except (SweepError, ConfigError) as e:
        print(f"error: {e}")
        return 2
    df = summary(out.parent)
    print(df.to_string(index=False))
    print(f"sweep {args.name or spec.name}: {out.parent / 'sweep.json'}, notebook {out}")
    return 0 if (df["state"] != "failed").all() else 1


if __name__ == "__main__":
    raise SystemExit(main())
