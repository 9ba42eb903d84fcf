"""Where a benchmark's numbers go: one JSON file (its folder made), the machine they were taken on.

The closing notes quote these files, so every script writes them the same way.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    return {"machine": platform.platform(), "cpus": len(os.sched_getaffinity(0)), "python": platform.python_version()}


def write(path: str | Path, results: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    return path
