"""The `labkit` command: start, list, stop, compare and follow runs from a shell.

Each subcommand is one function registered with `@command`, whose arguments come from `arg(...)`
specs; adding a subcommand is adding one such function.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

Handler = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[Handler, str, tuple[tuple[tuple, dict], ...]]] = {}


def arg(*flags: str, **kwargs: Any) -> tuple[tuple, dict]:
    """An argparse argument spec for `@command`."""
    return flags, kwargs


ROOT_ARG = arg("--root", default=None, help="runs root directory (default: $LABKIT_RUNS, else PROJECT/runs; "
                                            "see labkit/paths.py)")


def root_of(args: argparse.Namespace) -> Path:
    """--root as given (relative to the shell's cwd), else the project's runs root."""
    from labkit import paths

    return Path(args.root).expanduser().resolve() if getattr(args, "root", None) else paths.runs_root()


def command(name: str, help: str, *args: tuple[tuple, dict]) -> Callable[[Handler], Handler]:
    """Register `fn(args) -> exit code` as `labkit NAME`."""

    def register(fn: Handler) -> Handler:
        _COMMANDS[name] = (fn, help, args)
        return fn

    return register


def _table(df) -> str:
    from labkit.table import to_text

    return to_text(df)


def _parse_sets(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SystemExit(f"error: --set expects KEY=VALUE (dotted keys, YAML values), got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


# -- subcommands -----------------------------------------------------------------------------------


@command("run", "start a run in the background from a config file",
         arg("config", help="run config YAML"),
         arg("--set", action="append", default=[], metavar="KEY=VALUE",
             help="override a config field (dotted keys, YAML values); repeatable"),
         arg("--name", help="run name (default: the config's); the run dir is ROOT/NAME"),
         arg("--root", default=None, help="runs root (default: the config's runs_root, else $LABKIT_RUNS or "
             "PROJECT/runs)"),
         arg("--resume", action="store_true", help="continue the existing run of this name from its newest checkpoint"),
         arg("--overwrite", action="store_true", help="start over: move an existing run of this name to "
             "ROOT/.trash/ (never deleted)"),
         arg("--check", action="store_true", help="validate the config here (fields, model, datasets) and print "
             "it; start nothing"),
         arg("--wait", action="store_true", help="wait for the run to end and print its final status"),
         arg("--on", choices=["local", "slurm"], default=None, help="where to train: this machine (default, or "
             "$LABKIT_BACKEND) or one Slurm job (partition, account, time from the config's slurm: section or "
             "$LABKIT_SLURM_PROFILE)"),
         arg("--multinode", metavar="DIR", help="do not start: write per-node scripts and a Slurm sbatch "
             "job for a run over several machines into DIR"))
def cmd_run(args: argparse.Namespace) -> int:
    from labkit import paths, rundirs
    from labkit.config import ConfigError
    from labkit.launch import as_config, launch, where, write_multinode

    sets = _parse_sets(args.set)
    if args.name:
        sets["name"] = args.name
    if args.root:
        sets["runs_root"] = str(Path(args.root).expanduser().resolve())
    cfg = as_config(paths.resolve(args.config), sets)
    if "runs_root" not in sets and not Path(cfg.runs_root).is_absolute():
        cfg = cfg.with_updates(runs_root=str(paths.runs_root(None if cfg.runs_root == "runs" else cfg.runs_root)))
    if args.multinode:
        for path in write_multinode(cfg, args.multinode):
            print(path)
        return 0
    if args.check:
        problems = cfg.check()
        print(cfg.to_yaml(), end="")
        where = cfg.run_dir
        if rundirs.holds_run(where) and not (args.resume or args.overwrite or cfg.resume):
            problems.append(f"{where}: a run of this name exists (use --resume, --overwrite or --name)")
        if problems:
            raise ConfigError("\n  - ".join([f"run {cfg.name!r} cannot start:", *problems]))
        print(f"# ok: run {cfg.name!r} would start in {where}")
        return 0
    if args.resume:
        cfg = cfg.with_updates(resume=True)
    run = launch(cfg, overwrite=args.overwrite, backend=args.on)
    place = where(run.placement()) or f"pid {run.launcher().get('pid')}"
    print(f"started {run.name}: {run.dir} ({place}, log {run.dir / 'train.log'})")
    if not args.wait:
        return 0
    status = run.wait()
    print(f"{run.name}: {status.get('state')} at step {status.get('step')}"
          + (f" ({status.get('stop_reason')})" if status.get("stop_reason") else "")
          + (f"\n{status.get('error')}" if status.get("error") else ""))
    if status.get("state") == "failed":
        print(run.tail(30), file=sys.stderr)
        return 1
    return 0


@command("ls", "the runs table: state, progress, config, early score in its cohort, losses, evals, times",
         ROOT_ARG,
         arg("--where", help="SQL condition over the columns, e.g. \"learning_rate >= 1e-3 AND state = 'finished'\""),
         arg("--sort", help="column to sort by (scores, times: descending; others ascending)"),
         arg("--asc", action="store_true", help="sort ascending"),
         arg("--desc", action="store_true", help="sort descending"),
         arg("--columns", help="comma-separated config columns (default: learning_rate,effective_batch_size,"
             "schedule,warmup_steps,seed)"),
         arg("--cohort", help="comma-separated runs to rank together by early score (default: each sweep)"),
         arg("--first-samples", type=int, help="early-score window in samples (default: the sweep's probe budget)"))
def cmd_ls(args: argparse.Namespace) -> int:
    from labkit.table import EARLY_SCORE_HELP, runs_table

    cols = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns is not None else None
    cohort = [c.strip() for c in args.cohort.split(",") if c.strip()] if args.cohort else None
    desc = True if args.desc else False if args.asc else None
    df = runs_table(root_of(args), columns=cols, where=args.where, sort=args.sort, descending=desc,
                    cohort=cohort, first_samples=args.first_samples)
    print(_table(df))
    if len(df) and df["early_score"].notna().any():
        print(f"\n{EARLY_SCORE_HELP}")
    return 0


@command("stop", "ask runs to save a checkpoint and stop (kill them after --timeout)",
         arg("ids", nargs="+", metavar="ID", help="run name or directory"), ROOT_ARG,
         arg("--timeout", type=float, default=120.0, help="seconds to wait before killing (default 120)"),
         arg("--reason", default="labkit stop", help="reason written to the STOP file"))
def cmd_stop(args: argparse.Namespace) -> int:
    from labkit.launch import get

    for run in [get(i, root_of(args)) for i in args.ids]:
        status = run.stop(timeout=args.timeout, reason=args.reason)
        print(f"{run.name}: {status.get('state')} at step {status.get('step')} ({status.get('stop_reason')})")
    return 0


@command("compare", "early-training dynamics of runs, ranked as one cohort over the same first samples",
         arg("ids", nargs="*", metavar="ID", help="runs to compare (default: all)"), ROOT_ARG,
         arg("--first-samples", type=int, help="compare over the first S samples seen (default: a tenth of the "
             "shortest run's planned samples)"),
         arg("--first-steps", type=int, help="compare over the first N optimizer steps instead"))
def cmd_compare(args: argparse.Namespace) -> int:
    from labkit.launch import get
    from labkit.store import Store
    from labkit.table import EARLY_SCORE_HELP, default_window

    root = root_of(args)
    store = Store(root)
    names = [get(i, root).name for i in args.ids] or list(store.run_dirs())
    if args.first_steps is not None and args.first_samples is not None:
        raise ValueError("give --first-samples or --first-steps, not both")
    kw = ({"first_steps": args.first_steps} if args.first_steps is not None
          else {"first_samples": args.first_samples or default_window(store, names)})
    table = store.cohort_early_scores(names, **kw).sort_values(["early_rank", "run_id"], na_position="last")
    window = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in kw.items())
    print(f"window: {window}")
    print(table.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4g}"))
    print(f"\n{EARLY_SCORE_HELP}")
    return 0


@command("tail", "print the end of a run's train.log",
         arg("id", metavar="ID", help="run name or directory"), ROOT_ARG,
         arg("-n", type=int, default=20, help="lines (default 20)"),
         arg("-f", "--follow", action="store_true", help="keep printing new lines until the run ends"))
def cmd_tail(args: argparse.Namespace) -> int:
    from labkit import runfiles
    from labkit.launch import LOG, get

    run = get(args.id, root_of(args))
    print(run.tail(args.n))
    if args.follow:
        path = run.dir / LOG
        pos = path.stat().st_size if path.exists() else 0
        while True:
            if path.exists() and path.stat().st_size > pos:
                with path.open("rb") as fh:
                    fh.seek(pos)
                    chunk = fh.read()
                pos += len(chunk)
                sys.stdout.write(chunk.decode("utf-8", "replace"))
                sys.stdout.flush()
            elif run.status().get("state") in runfiles.FINAL_STATES:
                break
            time.sleep(1.0)
    return 0


@command("sync", "index finished runs into the lab's DuckDB catalog", ROOT_ARG)
def cmd_sync(args: argparse.Namespace) -> int:
    from labkit.store import Store

    result = Store(root_of(args)).sync()
    print(", ".join(f"{k}: {v}" for k, v in result.items()))
    return 0


@command("sweep", "run a sweep spec: each run executes notebooks/01_run.ipynb with papermill",
         arg("spec", help="sweep spec YAML (templates/sweeps/*.yaml)"), ROOT_ARG,
         arg("--name", help="sweep name (default: the spec's)"),
         arg("--set", action="append", default=[], metavar="KEY=VALUE",
             help="override a field of the sweep's base run config (dotted keys, YAML values); repeatable"),
         arg("--no-early-termination", action="store_true", help="run every config to the end"),
         arg("--overwrite", action="store_true", help="move the sweep's earlier runs to ROOT/.trash/ first"),
         arg("--dry-run", action="store_true", help="list the run names and exit"))
def cmd_sweep(args: argparse.Namespace) -> int:
    from labkit import paths, sweep

    root = root_of(args)
    spec = sweep.load_spec(paths.resolve(args.spec))
    name = args.name or spec.name
    spec_path = Path(spec.source)
    if args.set:
        base = sweep._base(spec)
        for key, value in _parse_sets(args.set).items():
            from labkit.config import set_dotted

            set_dotted(base, key, value)
        derived = spec.model_copy(update={"base": base})
        sweep.expand(derived, root)  # a bad --set fails here, naming the field
        spec_path = sweep.sweep_dir(root, name) / "spec.yaml"
        spec_path.parent.mkdir(parents=True, exist_ok=True)
        spec_path.write_text(yaml.safe_dump(derived.model_dump(mode="json"), sort_keys=False))
    configs = sweep.expand(sweep.load_spec(spec_path), root)
    if args.dry_run:
        for cfg in configs:
            print(f"{cfg.name}  {cfg.run_dir}")
        return 0
    print(f"sweep {name}: {len(configs)} runs under {root}, concurrency {spec.concurrency}", flush=True)
    progress = SweepProgress(root, name, [c.name for c in configs])
    progress.start()
    try:
        out = sweep.run_sweep_notebook(spec_path, root, name=args.name,
                                       early_termination=not args.no_early_termination, overwrite=args.overwrite)
    finally:
        progress.close()
    df = sweep.summary(out.parent)
    print(df.to_string(index=False))
    print(f"sweep {name}: {out.parent / 'sweep.json'}, notebook {out}")
    return 0 if (df["state"] != "failed").all() else 1


class SweepProgress:
    """One line per run start, early stop and end, read from the run and sweep files while a sweep runs.

    The sweep executes in a notebook kernel; its files are the events (status.json per run, the
    decisions in sweep.json), so nothing in the sweep has to call back into this process.
    """

    def __init__(self, root: Path, name: str, runs: list[str], poll: float = 1.0,
                 out: Callable[[str], None] | None = None):
        from labkit.sweep import sweep_dir

        self.root, self.runs, self.poll = Path(root), runs, poll
        self.record = sweep_dir(root, name) / "sweep.json"
        self.out = out or (lambda line: print(line, flush=True))
        self.seen: dict[str, str] = {}
        self.stopped: set[str] = set()
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="labkit-sweep-progress", daemon=True)
        self._since = time.time()

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._halt.set()
        self._thread.join(timeout=10)
        self.tick()

    def _loop(self) -> None:
        while not self._halt.wait(self.poll):
            try:
                self.tick()
            except Exception as e:  # noqa: BLE001 - progress lines must never fail the sweep
                self.out(f"(progress: {e})")

    def _line(self, text: str) -> None:
        self.out(f"{time.strftime('%H:%M:%S')} {text}")

    def tick(self) -> None:
        from labkit import runfiles

        rec = runfiles.read_json(self.record)
        fresh = (rec.get("started_at") or 0) >= self._since - 5
        et = (rec.get("early_termination") or {}) if fresh else {}
        for decision in et.get("decisions", []):
            for r in decision.get("ranking", []):
                if r["run"] in decision.get("stopped", []) and r["run"] not in self.stopped:
                    self.stopped.add(r["run"])
                    self._line(f"stop  {r['run']}: early score {r['early_score']:.3g}, rank {r['rank']} of "
                               f"{len(decision['ranking'])} at {decision['budget']} {decision['axis']}")
        for name in self.runs:
            st = runfiles.read_status(self.root / name)
            state = st.get("state")
            if not state or (st.get("updated_at") or 0) < self._since - 5:
                continue  # an earlier sweep's leftovers
            before = self.seen.get(name)
            if state == before:
                continue
            self.seen[name] = state
            if state in ("pending", "running") and before is None:
                self._line(f"start {name}")
            elif state in runfiles.FINAL_STATES:
                loss = st.get("loss")
                self._line(f"end   {name}: {state} at step {st.get('step')}/{st.get('total_steps') or '?'}"
                           + (f", loss {loss:.4g}" if isinstance(loss, int | float) else "")
                           + (f" ({st.get('stop_reason') or st.get('error')})"
                              if st.get("stop_reason") or st.get("error") else ""))


@command("report", "offline HTML reports: a runs root (every executed notebook + index.html) or one run dir",
         arg("dir", nargs="?", default=None, help="runs root or run directory (default: $LABKIT_RUNS or "
             "PROJECT/runs)"),
         arg("--force", action="store_true", help="re-render reports that look up to date"))
def cmd_report(args: argparse.Namespace) -> int:
    from labkit import paths
    from labkit.report import build_reports, is_run_dir, report_run

    target = Path(args.dir).expanduser() if args.dir else paths.runs_root()
    if is_run_dir(target):
        print(report_run(target, force=args.force).resolve())
    else:
        print(build_reports(target, force=args.force).resolve())
    return 0


# -- entry point -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from labkit import __version__

    ap = argparse.ArgumentParser(prog="labkit", description="A Jupyter-first lab for SFT of small LLMs.")
    ap.add_argument("--version", action="version", version=f"labkit {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (fn, help, specs) in _COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        for flags, kwargs in specs:
            p.add_argument(*flags, **kwargs)
        p.set_defaults(handler=fn)
    from labkit.data.commands import add_parser as add_data_parser  # `labkit data check|add`

    add_data_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    from labkit.config import ConfigError
    from labkit.slurm import SlurmError
    from labkit.store import StoreError

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, FileNotFoundError, TimeoutError, ValueError, KeyError, SlurmError, StoreError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
