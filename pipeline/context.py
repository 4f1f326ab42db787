"""What a stage needs besides its params: where its files go, and what makes a run reproducible."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:  # imported where used: a helper process that only writes files loads no pydantic
    from .config import Params

DATA_DIR = Path("data/prepared")
OUT_DIR = Path("outputs")
CHECKPOINT_DIR = Path("checkpoints")
MANIFEST = "manifest.json"  # the prepared data's description, beside its tensors (pipeline.core.data)


@dataclass
class Context:
    params: Params
    workdir: Path = field(default_factory=Path.cwd)
    # The run ``mlflow run`` created (MLFLOW_RUN_ID): it becomes the sweep's parent.
    parent_run_id: str | None = None
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    # The params file and its sha256 as read: a stage checks it is unchanged before it writes.
    params_file: Path | None = None
    params_digest: str | None = None
    _tags: dict[str, str] | None = field(default=None, repr=False)  # run_tags, computed once
    # Where run folders go instead of ``outputs/`` (a Ray task writes on its own node, then returns them).
    outputs: Path | None = None

    @classmethod
    def from_environment(cls, params: Params, params_file: Path | None = None) -> "Context":
        env = dict(os.environ)
        # Taken here, at the edge, so that no fluent mlflow.start_run() resumes it by accident.
        given = os.environ.pop("MLFLOW_RUN_ID", None) or None
        digest = file_digest(params_file) if params_file is not None else None
        return cls(params=params, parent_run_id=given, env=env, params_file=params_file, params_digest=digest)

    def check_params_unchanged(self, stage: str) -> None:
        """DVC records the params file as it is when the stage ends: refuse to end a stage whose
        params changed while it ran, so dvc.lock never records params a result was not made with."""
        if self.params_file is None or file_digest(self.params_file) == self.params_digest:
            return
        from .config import ParamsError
        raise ParamsError(f"{self.params_file} changed while {stage} ran: its results were made with the "
                          f"params as they were at the start; nothing was written, rerun {stage}")

    @property
    def data_dir(self) -> Path:
        return self.workdir / DATA_DIR

    def train_dir(self, batch_size: int, seed: int | None = None, lr: float | None = None) -> Path:
        """A train stage's folder, or with ``seed`` the folder of one of its runs:
        ``bs<B>/seed<S>``, or ``bs<B>/lr<lr>/seed<S>`` in a sweep with a learning-rate grid."""
        return self._run_dir("train", batch_size, seed, lr)

    def eval_dir(self, batch_size: int, seed: int | None = None, lr: float | None = None) -> Path:
        return self._run_dir("evaluate", batch_size, seed, lr)

    def _run_dir(self, stage: str, batch_size: int, seed: int | None, lr: float | None) -> Path:
        folder = (self.outputs or self.workdir / OUT_DIR) / stage / f"bs{batch_size}"
        if seed is None:
            return folder
        if lr is not None and self.params.train.lr_grid:
            folder = folder / f"lr{lr:g}"
        return folder / f"seed{seed}"

    @property
    def compare_dir(self) -> Path:
        return self.workdir / OUT_DIR / "compare"

    def checkpoint(self, batch_size: int, seed: int, lr: float | None = None) -> Path:
        return self.workdir / CHECKPOINT_DIR / f"{run_name(batch_size, seed, lr)}.pt"

    def run_tags(self) -> dict[str, str]:
        """What a run needs to be reproduced, besides its params. ``git_dirty`` and the code hash
        describe the source code (pipeline/), not params.yaml, dvc.lock or outputs."""
        if self._tags is None:
            self._tags = self._reproduction_tags()
        return dict(self._tags)

    def _reproduction_tags(self) -> dict[str, str]:
        from .provenance import code_state, package_versions
        code = code_state(self.workdir)
        tags = {"batchlab.git_commit": code.commit, "batchlab.git_dirty": str(code.dirty).lower(),
                "batchlab.code_hash": code.tree, "batchlab.code_commit": code.changed,
                "mlflow.source.git.commit": code.commit}
        # MLflow's own fields, which its UI shows on the run page ("Created by", "Source"):
        # fluent runs get them from MLflow, runs made with the client (as here) do not.
        tags |= {"mlflow.source.type": "LOCAL", "mlflow.source.name": _command()} | _user()
        tags |= {f"batchlab.version.{k}": v for k, v in package_versions().items()}
        if self.env.get("DVC_EXP_NAME"):
            tags["dvc.exp_name"] = self.env["DVC_EXP_NAME"]
        return tags


def run_name(batch_size: int, seed: int, lr: float | None = None) -> str:
    """A run's name: ``bs64-s0``, or ``bs64-lr0.002-s0`` in a sweep with a learning-rate grid."""
    return f"bs{batch_size}-s{seed}" if lr is None else f"bs{batch_size}-lr{lr:g}-s{seed}"


def _command() -> str:
    """How this process was started: ``python -m pipeline train --batch-size 64`` for a stage."""
    import sys
    main = Path(sys.argv[0])
    if main.name == "__main__.py" and main.parent.name == "pipeline":
        return " ".join(["python -m pipeline", *sys.argv[1:]])
    return " ".join(sys.argv)


def _user() -> dict[str, str]:
    import getpass
    try:
        return {"mlflow.user": getpass.getuser()}
    except (KeyError, OSError):  # no name for this uid (a container's random user)
        return {}


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


def swap_dir(tmp: Path, dest: Path) -> None:
    """Put the folder ``tmp`` in the place of ``dest`` whole: readers see the old set or the new."""
    import shutil
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


@contextmanager
def replaced_dir(dest: Path) -> Iterator[Path]:
    """A new folder beside ``dest`` to fill; swapped in whole when the block ends, removed if it
    raises: ``dest`` holds one complete set of files or the previous one, never a mix."""
    import shutil
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        yield tmp
        swap_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def csv_text(columns: dict[str, list]) -> str:
    """A CSV of equal-length columns; floats as repr, so that they read back exactly."""
    lines = [",".join(columns)]
    for row in zip(*columns.values()):
        lines.append(",".join(repr(v) if isinstance(v, float) else str(v) for v in row))
    return "\n".join(lines) + "\n"


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def file_digest(path: Path) -> str | None:
    import hashlib
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def param_text(value: Any) -> str:
    """A value as MLflow stores a param: a list as its comma-separated items."""
    return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def read_manifest(data_dir: Path) -> dict[str, Any]:
    """The prepared data's manifest (pipeline.core.data writes it); here, so that reading it imports no torch."""
    from .config import DataError
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path} not found: run the prepare stage first (dvc repro prepare)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise DataError(f"{path}: not valid JSON (corrupt manifest); rerun prepare") from None
