"""bench/gpu_sft.py keeps working: --help, a CPU dry run whose systems agree, and a CUDA run (gpu marker)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from labkit.attention import VARLEN

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_sft.py"
# Same batches in fp32 on CPU: only the order of float sums differs between systems.
REL_TOL = 1e-3


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_help_works_without_cuda():
    out = bench("--help")
    assert out.returncode == 0, out.stderr
    assert "--dry-run" in out.stdout and "--peak-tflops" in out.stdout


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("gpu_sft") / "gpu_sft.json"
    out = bench("--dry-run", "--out", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "labkit_packed" in out.stdout  # the table
    return json.loads(path.read_text())


def test_dry_run_labkit_systems_train_the_same_batches(dry_run):
    assert dry_run["device"].startswith("cpu") and dry_run["versions"]["torch"] == torch.__version__
    packed, padded = dry_run["systems"]["labkit_packed"], dry_run["systems"]["labkit_padded"]
    for r in (packed, padded):
        assert r["tokens_per_s"] > 0 and r["steps_timed"] == dry_run["args"]["steps"]
        assert len(r["losses"]) == dry_run["args"]["warmup_steps"] + dry_run["args"]["steps"]
        assert r["mfu"] is None  # no GPU peak to compare with on a CPU
    assert packed["tokens"] == padded["tokens"]
    assert padded["padding_fraction"] > 0
    if packed["rows"] == "packed":
        assert packed["padding_fraction"] == 0 <= padded["padding_fraction"]
    else:
        # Without a varlen kernel (CPU) labkit runs multipack's micro-batches as padded rows. Those mix
        # long and short samples (multipack balances tokens), so they can pad more than labkit's
        # length-grouped `packing: false` batches: no order between the two fractions holds here.
        assert packed["attention"] == "sdpa" and 0 < packed["padding_fraction"] < 1
    # The same samples in the same optimizer steps, each step's loss the mean over all its loss tokens:
    # how a step splits into micro-batches must not change the loss, at the first step or after.
    assert packed["losses"] == pytest.approx(padded["losses"], rel=REL_TOL)


def test_dry_run_trl_trains_the_same_batches(dry_run):
    pytest.importorskip("trl")
    systems = dry_run["systems"]
    trl, labkit = systems["trl_padded"], systems["labkit_padded"]
    assert trl["tokens"] == labkit["tokens"]
    assert trl["padding_fraction"] > 0
    # No looser tolerance is needed for TRL: Trainer hands SFTTrainer the whole step's loss-token count
    # (`num_items_in_batch`), so each micro-batch's loss is its token sum over the step's total, the same
    # reduction as labkit's. What remains is float summation order and TRL's chunked LM head (~1e-6).
    assert trl["losses"] == pytest.approx(labkit["losses"], rel=REL_TOL)
    # padding_free needs a varlen kernel: on CPU it is reported as skipped, with the reason.
    assert "varlen" in systems["trl_padding_free"]["skipped"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_packed_run_uses_varlen_attention(tmp_path):
    path = tmp_path / "gpu_sft.json"
    out = bench("--dry-run", "--device", "cuda", "--systems", "labkit_packed", "--out", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    packed = json.loads(path.read_text())["systems"]["labkit_packed"]
    assert packed["attention"] in ("flash_attention_2", VARLEN) and packed["rows"] == "packed"
    assert packed["padding_fraction"] == 0
    assert packed["mfu"] > 0 and packed["peak_mem_mb"] > 0


def test_throughput_script_runs_the_labkit_systems_with_the_flags_given(tmp_path):
    path = tmp_path / "throughput.json"
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), "--dry-run", "--steps", "1",
                          "--out", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(path.read_text())
    assert list(report["systems"]) == ["labkit_packed", "labkit_padded"]
    assert report["args"]["steps"] == 1 and report["systems"]["labkit_packed"]["tokens_per_s"] > 0
