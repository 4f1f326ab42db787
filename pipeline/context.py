"""What a stage needs besides its params: where files go, the tracking store, the sweep's parent."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Params
from .system import git_state, package_versions

DATA_DIR = Path("data/prepared")
OUT_DIR = Path("outputs")
CHECKPOINT_DIR = Path("checkpoints")


@dataclass
class Context:
    params: Params
    workdir: Path = field(default_factory=Path.cwd)
    # The run ``mlflow run`` created (MLFLOW_RUN_ID): it becomes the sweep's parent.
    parent_run_id: str | None = None
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))

    @classmethod
    def from_environment(cls, params: Params) -> "Context":
        env = dict(os.environ)
        # Taken here, at the edge, so that no fluent mlflow.start_run() resumes it by accident.
        given = os.environ.pop("MLFLOW_RUN_ID", None) or None
        return cls(params=params, parent_run_id=given, env=env)

    @property
    def data_dir(self) -> Path:
        return self.workdir / DATA_DIR

    def train_dir(self, batch_size: int) -> Path:
        return self.workdir / OUT_DIR / "train" / f"bs{batch_size}"

    def eval_dir(self, batch_size: int) -> Path:
        return self.workdir / OUT_DIR / "evaluate" / f"bs{batch_size}"

    @property
    def compare_dir(self) -> Path:
        return self.workdir / OUT_DIR / "compare"

    def checkpoint(self, batch_size: int) -> Path:
        return self.workdir / CHECKPOINT_DIR / f"bs{batch_size}.pt"

    def tracker(self):
        from .tracking import Tracker, project_root
        return Tracker(project_root(self.workdir), self.params.tracking.experiment, self.env,
                       self.parent_run_id)

    def run_tags(self) -> dict[str, str]:
        """What a run needs to be reproduced, besides its params."""
        commit, dirty = git_state(self.workdir)
        tags = {"batchlab.git_commit": commit, "batchlab.git_dirty": str(dirty).lower(),
                "mlflow.source.git.commit": commit}
        tags |= {f"batchlab.version.{k}": v for k, v in package_versions().items()}
        if self.env.get("DVC_EXP_NAME"):
            tags["dvc.exp_name"] = self.env["DVC_EXP_NAME"]
        return tags


def write_atomic(path: Path, content: str | bytes) -> None:
    """Write to a temporary file beside ``path`` and rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(content.encode() if isinstance(content, str) else content)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
