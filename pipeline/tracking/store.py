"""Where the tracking store is: ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<project>/mlflow.db``.
Imports nothing heavy, so a stage can start its metric logger before it imports torch or MLflow."""
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


def experiment_name(experiment_id: str) -> str | None:
    """The name of an experiment of the store ``mlflow run`` names (MLFLOW_TRACKING_URI)."""
    from mlflow.tracking import MlflowClient
    try:
        return MlflowClient(tracking_uri(project_root())).get_experiment(experiment_id).name
    except Exception:
        return None



def mark_refused(run_id: str, note: str) -> None:
    """The run `mlflow run` made for a launch refused before any work says so: its name, role and
    note give the reason (MLflow ends it FAILED). It cannot go to the trash from here: MLflow's CLI
    sets the run's status after the entry point returns, and fails on a deleted run."""
    from mlflow.tracking import MlflowClient
    try:
        from mlflow.entities import RunTag
        MlflowClient(tracking_uri(project_root())).log_batch(run_id, tags=[RunTag(k, v) for k, v in {
            "mlflow.runName": "refused-launch", "batchlab.role": "refused", "mlflow.note.content": note}.items()])
    except Exception:  # best effort: the refusal itself is the answer
        pass
