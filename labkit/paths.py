"""Where the project and the runs are, whatever directory a kernel or shell starts in.

JupyterLab starts a notebook's kernel in the notebook's folder (`notebooks/`), papermill and the CLI
wherever they are called from; relative paths in notebooks and configs (`templates/runs/demo.yaml`,
`runs`) mean the same files in all of them because they resolve against the project:

* the project is `$LABKIT_HOME` if set, else the nearest folder at or above the current directory
  holding labkit's `templates/runs/` (a checkout, or a project laid out like one), else the
  current directory;
* the runs root is `$LABKIT_RUNS` if set (relative: to the project), else `PROJECT/runs`.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # a checkout: the shipped templates live here


def _is_project(d: Path) -> bool:
    return (d / "templates" / "runs").is_dir()


def project_root() -> Path:
    """The project folder ($LABKIT_HOME, else the nearest ancestor of the cwd with templates/runs/)."""
    home = os.environ.get("LABKIT_HOME")
    if home:
        return Path(home).expanduser().resolve()
    cwd = Path.cwd().resolve()
    for d in (cwd, *cwd.parents):
        if _is_project(d):
            return d
    return cwd


def runs_root(root: str | Path | None = None) -> Path:
    """The runs root as an absolute path: `root` if given, else $LABKIT_RUNS, else PROJECT/runs.

    A relative `root` is taken against the project, not the cwd, so `runs` from a kernel started in
    notebooks/ is the same folder as `runs` from the project root.
    """
    if root is None or str(root) == "":
        root = os.environ.get("LABKIT_RUNS") or "runs"
    p = Path(root).expanduser()
    return p if p.is_absolute() else (project_root() / p).resolve()


def resolve(path: str | Path) -> Path:
    """An input file named relative to the cwd, the project or labkit's checkout, in that order.

    Returns the first that exists; otherwise the project-relative path (so an error message names
    the place where the file was expected).
    """
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    for base in (Path.cwd(), project_root(), PACKAGE_ROOT):
        if (base / p).exists():
            return (base / p).resolve()
    return project_root() / p
