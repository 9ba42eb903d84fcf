"""bench/device_check.sh, the one GPU check, keeps working: its dry run takes every step on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["env", "gpu-tests", "model", "train", "fsdp-resume", "gpu-sft-1b", "gpu-sft-3b"]


def test_dry_run_takes_every_step_and_each_passes(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "SCRATCH": str(tmp_path)}
    done = subprocess.run(["bash", str(ROOT / "bench" / "device_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    results = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    log = (tmp_path / "out" / "device_check.log").read_text()
    assert [r["step"] for r in results] == STEPS, log[-3000:]
    failed = [r for r in results if not r["ok"]]
    assert not failed, json.dumps(failed, indent=1) + log[-3000:]
    assert done.returncode == 0
    by = {r["step"]: r for r in results}
    # The run trained on the strategy it asked for, and its export is what a user loads: bf16 on disk.
    assert by["train"]["strategy_running"] == "ddp" or by["train"]["strategy_running"] == "single"
    assert by["train"]["export_dtypes"] == ["BF16"] and by["train"]["generated_tokens"] > 0  # safetensors dtype names
    assert by["fsdp-resume"]["strategy_running"] == "fsdp"
    steps = by["fsdp-resume"]["steps_logged"]
    assert sorted(steps) == list(range(1, max(steps) + 1)) and len(set(steps)) == len(steps)
    for name in ("gpu_sft_1b.json", "gpu_sft_3b.json"):
        report = json.loads((tmp_path / "out" / name).read_text())
        assert report["systems"]["labkit_packed"]["tokens_per_s"] > 0
