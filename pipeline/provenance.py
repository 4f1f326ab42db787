"""What a run's provenance tags say: the code it ran (git) and the packages it ran with.
Imports no torch, so a context can ask before any run is made."""
from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import NamedTuple


def package_versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "torchvision", "mlflow", "dvc", "scikit-learn", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    out["python"] = platform.python_version()
    return out


class CodeState(NamedTuple):
    commit: str   # HEAD, or "none" outside git
    tree: str     # git's hash of the pipeline/ folder at HEAD: the code a run ran
    dirty: bool   # uncommitted changes under pipeline/
    changed: str  # the last commit that changed pipeline/: unlike HEAD, committing dvc.lock or
                  # params.yaml leaves it, so a report rebuilt from the same inputs is the same file


def code_state(cwd: Path) -> CodeState:
    """The code a run ran. Only ``pipeline/`` counts: params are recorded as params, and
    dvc.lock and outputs change with every run."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        tree = git("rev-parse", "HEAD:pipeline")
        dirty = git("status", "--porcelain", "--", "pipeline")
        changed = git("log", "-1", "--format=%H", "--", "pipeline") or commit
        return CodeState(commit, tree, bool(dirty), changed)
    except (OSError, subprocess.SubprocessError):
        return CodeState("none", "none", False, "none")
