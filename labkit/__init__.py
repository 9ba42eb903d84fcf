"""labkit: a Jupyter-first lab for supervised fine-tuning of small LLMs."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Heavy modules (torch, transformers, duckdb) load on first use, so `import labkit` stays fast.
_LAZY = {
    "RunConfig": "labkit.config",
    "load_config": "labkit.config",
    "launch": "labkit.launch",
    "runs": "labkit.launch",
    "Run": "labkit.launch",
    "Store": "labkit.store",
}
# `evaluate` is not re-exported: the submodule of the same name would shadow it once imported.


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'labkit' has no attribute {name!r}")
