"""The `labkit` command: start, list, stop, compare and follow runs from a shell.

Each subcommand is one function registered with `@command`, whose arguments come from `arg(...)`
specs; adding a subcommand is adding one such function.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import yaml

Handler = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[Handler, str, tuple[tuple[tuple, dict], ...]]] = {}
DEFAULT_ROOT = os.environ.get("LABKIT_RUNS", "runs")


def arg(*flags: str, **kwargs: Any) -> tuple[tuple, dict]:
    """An argparse argument spec for `@command`."""
    return flags, kwargs


ROOT_ARG = arg("--root", default=DEFAULT_ROOT, help="runs root directory (default: $LABKIT_RUNS or ./runs)")


def command(name: str, help: str, *args: tuple[tuple, dict]) -> Callable[[Handler], Handler]:
    """Register `fn(args) -> exit code` as `labkit NAME`."""

    def register(fn: Handler) -> Handler:
        _COMMANDS[name] = (fn, help, args)
        return fn

    return register


def _table(df) -> str:
    import pandas as pd

    if df is None or len(df) == 0:
        return "(no runs)"
    with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 200):
        return df.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4g}")


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
         arg("--overwrite", action="store_true", help="delete an existing run directory of the same name"),
         arg("--wait", action="store_true", help="wait for the run to end and print its final status"),
         arg("--multinode", metavar="DIR", help="do not start: write per-node scripts and a Slurm sbatch "
             "job for a run over several machines into DIR"))
def cmd_run(args: argparse.Namespace) -> int:
    from labkit.launch import as_config, launch, write_multinode

    if args.multinode:
        cfg = as_config(args.config, _parse_sets(args.set))
        for path in write_multinode(cfg, args.multinode):
            print(path)
        return 0
    run = launch(args.config, overwrite=args.overwrite, **_parse_sets(args.set))
    print(f"started {run.name}: {run.dir} (pid {run.launcher().get('pid')}, log {run.dir / 'train.log'})")
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


@command("ls", "list runs, newest first", ROOT_ARG)
def cmd_ls(args: argparse.Namespace) -> int:
    from labkit.launch import overview

    print(_table(overview(args.root)))
    return 0


@command("stop", "ask runs to save a checkpoint and stop (kill them after --timeout)",
         arg("ids", nargs="+", metavar="ID", help="run name or directory"), ROOT_ARG,
         arg("--timeout", type=float, default=120.0, help="seconds to wait before killing (default 120)"),
         arg("--reason", default="labkit stop", help="reason written to the STOP file"))
def cmd_stop(args: argparse.Namespace) -> int:
    from labkit.launch import get

    for run in [get(i, args.root) for i in args.ids]:
        status = run.stop(timeout=args.timeout, reason=args.reason)
        print(f"{run.name}: {status.get('state')} at step {status.get('step')} ({status.get('stop_reason')})")
    return 0


@command("compare", "early-training dynamics of runs over the same first samples or steps",
         arg("ids", nargs="*", metavar="ID", help="runs to compare (default: all)"), ROOT_ARG,
         arg("--first-samples", type=int, help="compare over the first S samples seen"),
         arg("--first-steps", type=int, help="compare over the first N optimizer steps"))
def cmd_compare(args: argparse.Namespace) -> int:
    from labkit.launch import get
    from labkit.store import Store

    names = [get(i, args.root).name for i in args.ids]
    table = Store(args.root).early_dynamics(first_steps=args.first_steps, first_samples=args.first_samples,
                                            runs=names or None)
    cols = ["rank", "run_id", "n_steps", "last_samples", "grad_norm_mean", "loss_mean", "early_score", "complete"]
    print(_table(table[[c for c in cols if c in table.columns]]))
    return 0


@command("tail", "print the end of a run's train.log",
         arg("id", metavar="ID", help="run name or directory"), ROOT_ARG,
         arg("-n", type=int, default=20, help="lines (default 20)"),
         arg("-f", "--follow", action="store_true", help="keep printing new lines until the run ends"))
def cmd_tail(args: argparse.Namespace) -> int:
    from labkit import runfiles
    from labkit.launch import LOG, get

    run = get(args.id, args.root)
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

    result = Store(args.root).sync()
    print(", ".join(f"{k}: {v}" for k, v in result.items()))
    return 0


@command("sweep", "run a sweep spec: each run executes notebooks/01_run.ipynb with papermill",
         arg("spec", help="sweep spec YAML (templates/sweeps/*.yaml)"), ROOT_ARG,
         arg("--name", help="sweep name (default: the spec's)"),
         arg("--no-early-termination", action="store_true", help="run every config to the end"),
         arg("--overwrite", action="store_true", help="delete the sweep's earlier runs first"),
         arg("--dry-run", action="store_true", help="list the run names and exit"))
def cmd_sweep(args: argparse.Namespace) -> int:
    from labkit.sweep import cli

    return cli(args)


@command("report", "render executed notebooks to offline HTML and write DIR/index.html",
         arg("dir", nargs="?", default=DEFAULT_ROOT, help="runs root (default: $LABKIT_RUNS or ./runs)"),
         arg("--force", action="store_true", help="re-render reports that look up to date"))
def cmd_report(args: argparse.Namespace) -> int:
    from labkit.report import build_reports

    print(build_reports(args.dir, force=args.force).resolve())
    return 0


# -- entry point -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="labkit", description="A Jupyter-first lab for SFT of small LLMs.")
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

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, FileNotFoundError, TimeoutError, ValueError, KeyError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
