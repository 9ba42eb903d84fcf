"""Small run notebooks written by tests: a papermill `parameters` cell and one cell of code."""

from __future__ import annotations

from pathlib import Path

import nbformat

KERNELSPEC = {"name": "python3", "language": "python", "display_name": "Python 3"}


def parameterized_notebook(path: Path, parameters: str, body: str) -> Path:
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": KERNELSPEC})
    params = nbformat.v4.new_code_cell(parameters)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nbformat.write(nb, path)
    return path
