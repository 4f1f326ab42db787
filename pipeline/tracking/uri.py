"""Where the tracking store is: ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<project>/mlflow.db``.
Imports nothing heavy: a command can name the store before it imports torch or MLflow."""
from __future__ import annotations

import os
from pathlib import Path


def project_root(cwd: str | Path | None = None) -> Path:
    """The user's project folder, also from inside DVC's queue copy ``.dvc/tmp/exps/<tmp>``."""
    here = Path(cwd or os.getcwd()).resolve()
    parts = here.parts
    for i in range(len(parts) - 2):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return here


def tracking_uri(root: Path, env: dict[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    uri = env.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        return f"sqlite:///{root / 'mlflow.db'}"
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return f"{prefix}{(root / uri[len(prefix):]).resolve()}"
    return uri


def is_local_store(uri: str) -> bool:
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


def workspace(root: Path, env: dict[str, str] | None = None) -> tuple[str, str]:
    """Which workspace publishes: ``(id, name)``. The name is ``host:/path/of/project``; the id, a
    short hash of it, is what a store search filters on. Two clones (two machines, or two folders)
    publishing one sweep to one server are two workspaces: each closes, retires and supersedes only
    its own runs. ``BATCHLAB_WORKSPACE`` carries the driver's name to Ray tasks on other nodes."""
    import hashlib
    import socket
    env = os.environ if env is None else env
    name = env.get("BATCHLAB_WORKSPACE") or f"{socket.gethostname()}:{root}"
    return hashlib.sha256(name.encode()).hexdigest()[:12], name
