"""Trainer tokens/s, packed (multipack + padding-free) vs padded, through labkit's own training loop.

The labkit half of bench/gpu_sft.py, with defaults for a quick look on any machine: the tiny shape on the
CPU here (where there is no varlen kernel, so both systems run padded rows and should match), the
Llama-3.2-1B shape with MFU on a CUDA machine. Any gpu_sft.py flag may follow and wins over these.

    python bench/throughput.py                      # CPU: writes bench/results/throughput.json
    python bench/throughput.py --preset 3b --grad-ckpt --max-tokens-per-device 4096   # on an H100
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_sft  # noqa: E402

if __name__ == "__main__":
    defaults = ["--systems", "labkit_packed,labkit_padded", "--out", "bench/results/throughput.json"]
    defaults += ["--preset", "1b"] if torch.cuda.is_available() else ["--preset", "tiny", "--device", "cpu"]
    sys.exit(gpu_sft.main(defaults + sys.argv[1:]))  # argparse keeps the last value: the user's flags win
