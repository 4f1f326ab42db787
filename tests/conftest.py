"""Shared fixtures: small real projects (git + DVC + SQLite MLflow store) in temporary folders."""
from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# Small and quick: the bundled digits, two batch sizes, two epochs.
SMALL = {
    "data": {"name": "digits"},
    "model": {"name": "mlp", "hidden_sizes": [32]},
    "train": {"batch_sizes": [16, 64], "seeds": [0], "epochs": 2, "lr": 0.003, "lr_search": False, "lr_scaling": "none",
              "stop_at_target": False, "target_metric": "val_acc", "curve_targets": [],
              "target_value": 0.8},
    "tracking": {"experiment": "test"},
}


@pytest.fixture(autouse=True)
def _subnormals_back():
    """Training in this process computes subnormal floats as 0 (train.flush_denormal), a setting of
    the thread; later tests (hypothesis checks for it) get the main thread's default back."""
    yield
    if "torch" in sys.modules:
        sys.modules["torch"].set_flush_denormal(False)


def merge(base: dict, extra: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for k, v in extra.items():
        out[k] = {**out.get(k, {}), **v} if isinstance(v, dict) else v
    return out


def env_for(project: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(project)
    env["DVC_NO_ANALYTICS"] = "1"
    env["GIT_PYTHON_REFRESH"] = "quiet"
    env["PYTHONUNBUFFERED"] = "1"
    # `dvc exp run` commits: a machine without a git identity must still pass.
    for key, value in (("GIT_AUTHOR_NAME", "batchlab-test"), ("GIT_AUTHOR_EMAIL", "test@localhost"),
                       ("GIT_COMMITTER_NAME", "batchlab-test"), ("GIT_COMMITTER_EMAIL", "test@localhost")):
        env.setdefault(key, value)
    return env


def sh(cmd: list[str], cwd: Path, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=kw.pop("env", env_for(cwd)), capture_output=True,
                          text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


PLOTS_TEMPLATE = "../pipeline/assets/plots.html"  # relative to .dvc/


def make_project(dest: Path, params: dict, git: bool = True) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "pipeline", dest / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "MLproject", "python_env.yaml", "requirements.txt", ".gitignore"):
        shutil.copy(REPO / name, dest / name)
    # DVC wants every key a stage lists: start from the project's own params.yaml.
    full = merge(yaml.safe_load((REPO / "params.yaml").read_text()), params)
    (dest / "params.yaml").write_text(yaml.safe_dump(full, sort_keys=False))
    if git:
        sh(["git", "init", "-q"], dest)
        sh(["dvc", "init", "-q"], dest)
        sh(["dvc", "config", "core.analytics", "false"], dest)
        sh(["dvc", "config", "plots.html_template", PLOTS_TEMPLATE], dest)  # as the project's .dvc/config
        sh(["git", "add", "-A"], dest)
        sh(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "init"], dest)
    return dest


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables made once; creating them costs seconds per test."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path: Path, empty_store: Path) -> Path:
    """A folder holding a fresh copy of the empty store as mlflow.db."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    return tmp_path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "proj", SMALL)


@pytest.fixture
def ctx_factory(tmp_path: Path, monkeypatch, empty_store: Path):
    """Build an in-process Context on a folder of its own with the given params."""
    from pipeline.config import parse_params
    from pipeline.context import Context

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)

    def build(extra: dict | None = None, folder: str = "work") -> Context:
        work = tmp_path / folder
        work.mkdir(exist_ok=True)
        if not (work / "mlflow.db").exists():
            shutil.copy(empty_store, work / "mlflow.db")
        params = parse_params(merge(SMALL, extra or {}))
        return Context(params=params, workdir=work, env={})
    return build


def write_idx(folder: Path, n_train: int = 60, n_test: int = 20, seed: int = 0,
              gz: bool = False) -> None:
    """Tiny MNIST-format files (real IDX headers) in torchvision's layout."""
    from pipeline.tools.stagebench import write_idx as write_files

    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        write_files(folder, images, np.arange(n) % 10, prefix)
        if gz:
            for name in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
                (folder / f"{name}.gz").write_bytes(gzip.compress((folder / name).read_bytes()))


# A sweep run by the CLI's stage verbs in one process, where a test needs no DVC around them.
SWEEP = ("import sys; from pipeline.__main__ import main; from pipeline.config import load_params; "
         "extra = sys.argv[1:]; sets = [a for s in extra for a in ('--set', s)]; "
         "sizes = load_params('params.yaml', extra).train.batch_sizes; "
         "steps = [['prepare']] + [[v, '--batch-size', str(b)] for b in sizes for v in ('train', 'evaluate')] "
         "+ [['compare']]; "
         "sys.exit(next((c for c in (main(s + sets) for s in steps) if c), 0))")


def sweep_cmd(*overrides: str) -> list[str]:
    return [sys.executable, "-c", SWEEP, *overrides]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1, artifacts proxied into ``folder``; ``kill`` ends its
    whole process group at once (as a crash would), ``start`` brings it back on the same port."""

    def __init__(self, folder: Path, backend: str):
        import socket
        self.folder, self.backend, self.proc = folder, backend, None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> "MlflowServer":
        import time
        import urllib.request
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", self.backend, "--artifacts-destination", str(self.folder / "server-artifacts"),
             "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.monotonic() + 120
        while True:  # polls the server's health: readiness, not a timing assertion
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"mlflow server did not start: {self.proc.stderr.read()[-2000:]}")
            time.sleep(0.5)

    def kill(self) -> None:
        import signal
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def runs_of(uri: str, experiment: str = "test"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} in {uri}"
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def check_published(uri: str, proj: Path, experiment: str = "test") -> dict[str, int]:
    """The store holds every training run of ``proj``'s outputs once, FINISHED, nothing RUNNING,
    and each metric key exactly one point per logged step: the (key, step) pairs the files give."""
    import json
    from pipeline.tracking.points import by_key, train_points

    client, runs = runs_of(uri, experiment)
    assert not [(r.info.run_name, r.data.tags.get("batchlab.record"), r.data.tags.get("batchlab.owner.pid")) for r in runs if r.info.status == "RUNNING"]
    by_record = {}
    for r in runs:
        if r.data.tags.get("batchlab.role") == "train":
            assert r.data.tags["batchlab.record"] not in by_record, "a record published twice"
            by_record[r.data.tags["batchlab.record"]] = r
    folders = sorted(f.parent for f in (proj / "outputs" / "train").rglob("run.json"))  # bs*/seed*, bs*/lr*/seed*
    points = 0
    for folder in folders:
        record = json.loads((folder / "run.json").read_text())
        run = by_record[record["record"]]
        assert run.info.status == "FINISHED", (run.info.run_name, run.info.status)
        expected = by_key(train_points(folder, record["window"], record["steps_t0"]))
        for key, mine in expected.items():
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert sorted(steps) == sorted(p[3] for p in mine), (run.info.run_name, key)
            points += len(steps)
    return {"runs": len(folders), "points": points, "train_runs": len(by_record)}
