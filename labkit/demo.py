"""`make demo`: build the tiny model and data, then train the demo run on the embedded defaults."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from labkit import catalog, tiny
from labkit.config import load_config

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "templates" / "runs" / "demo.yaml"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m labkit.demo", description=__doc__)
    ap.add_argument("--config", default=str(DEMO_CONFIG))
    ap.add_argument("--runs-root", default="runs")
    args = ap.parse_args(argv)
    t0 = time.time()

    for name, report in catalog.validate_catalog().items():
        print(f"catalog  {name:<11} {report.loaded:>5} samples  {report.path}")
    model_dir = tiny.ensure_tiny()
    print(f"model    tiny Llama checkpoint at {model_dir}")

    from labkit.runfiles import read_metrics
    from labkit.train import train

    cfg = load_config(args.config, {"runs_root": args.runs_root}, check=True)
    final = train(cfg)
    rows = read_metrics(cfg.run_dir)
    print(f"run      {cfg.run_dir}: {final['state']} after {final.get('step')} steps")
    if rows:
        first, last = rows[0], rows[-1]
        print(f"loss     {first['loss']:.3f} -> {last['loss']:.3f}   grad norm {first['grad_norm']:.2f} -> "
              f"{last['grad_norm']:.2f}   {last['tokens_per_s']:.0f} tokens/s")
    print(f"done in {time.time() - t0:.0f}s")
    return 0 if final["state"] == "finished" else 1


if __name__ == "__main__":
    raise SystemExit(main())
