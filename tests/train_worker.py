"""Test helper run under `accelerate launch` (or plain python): trains several run configs in one process group.

Every 2-process launch costs 10-20 s of start-up on a 2-core box, so the multi-process tests train all
their configs in one launch (the trainer reuses a process group it did not create). Faults are injected
here, around the real trainer, never inside it:
  --fail-rank R --fail-step S   rank R raises at optimizer step S
  --kill-at-step K              the whole process group gets SIGKILL when step K starts (a node dying)
  --kill-in final|prune|eval    SIGKILL of the group while final/ is written, while a checkpoint is
                                pruned, or right after a background evaluation started
  --fault-run NAME              step faults only in the run of that name (the others train normally)
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import torch.distributed as dist

from labkit import checkpoint, train
from labkit.config import load_config


def die() -> None:
    os.killpg(os.getpgid(0), signal.SIGKILL)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--fail-rank", type=int)
    ap.add_argument("--fail-step", type=int, default=1)
    ap.add_argument("--kill-at-step", type=int)
    ap.add_argument("--kill-in", choices=["final", "prune", "eval"])
    ap.add_argument("--fault-run", help="inject the faults into this run (config name) only")
    args = ap.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")

    step = train.Loop.optimizer_step

    def faulty_step(self, *a, **kw):
        if args.fault_run and self.cfg.name != args.fault_run:
            return step(self, *a, **kw)
        if args.fail_rank == rank and self.step + 1 == args.fail_step:
            raise RuntimeError(f"injected failure on rank {rank} at step {args.fail_step}")
        if args.kill_at_step and self.step + 1 == args.kill_at_step:
            die()
        return step(self, *a, **kw)

    train.Loop.optimizer_step = faulty_step
    if args.kill_in == "final":
        export = checkpoint.export

        def torn_export(model, base, tokenizer, out, dtype, r):
            export(model, base, tokenizer, out, dtype, r)
            if out.name.startswith(".tmp-final"):
                (out / "config.json").unlink(missing_ok=True)  # half written
                die()

        checkpoint.export = torn_export
    elif args.kill_in == "prune":
        rmtree = checkpoint.shutil.rmtree

        def rmtree_then_die(path, *a, **kw):
            if ".trash-" in str(path):
                victim = next(p for p in sorted(os.scandir(path), key=lambda e: e.name) if p.is_file())
                os.unlink(victim.path)  # the first files go, then the power goes
                die()
            return rmtree(path, *a, **kw)

        checkpoint.shutil.rmtree = rmtree_then_die
    elif args.kill_in == "eval":
        start = train.BackgroundEvals.start

        def start_then_die(self, ckpt):
            start(self, ckpt)
            die()

        train.BackgroundEvals.start = start_then_die

    ok = True
    for path in args.configs:
        final = train.train(load_config(path))
        if rank == 0:
            print(f"[worker] {path}: {final.get('state')} {final.get('error') or ''}", flush=True)
        ok = ok and final.get("state") in ("finished", "stopped")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
