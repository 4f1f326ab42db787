"""Two sweeps at once against one store lose no run and no metric point."""
from contextlib import contextmanager
import subprocess

import pytest

from conftest import SMALL, MlflowServer, env_for, make_project, merge, runs_of, sweep_cmd

pytestmark = pytest.mark.slow

PARAMS = merge(SMALL, {"train": {"batch_sizes": [16, 64], "epochs": 1}})


def _two_sweeps(tmp_path, uri):
    procs = []
    for name, lr in (("a", 0.002), ("b", 0.003)):
        proj = make_project(tmp_path / name, PARAMS, git=False)
        env = env_for(proj) | {"MLFLOW_TRACKING_URI": uri}
        procs.append(subprocess.Popen(sweep_cmd(f"train.lr={lr}"),
                                      cwd=proj, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]


def _count(uri):
    client, runs = runs_of(uri)
    parents = [r for r in runs if r.data.tags.get("batchlab.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("batchlab.role") == "train"]
    assert len(parents) == 2 and len(children) == 4
    assert all(r.info.status == "FINISHED" for r in runs)
    for child in children:
        steps = int(child.data.params["budget_steps"])  # stop_at_target off: every step of the budget
        assert len(client.get_metric_history(child.info.run_id, "train/loss")) == steps
        assert len(client.get_metric_history(child.info.run_id, "train/batch_acc")) == steps
        assert 1 <= len(client.get_metric_history(child.info.run_id, "val/loss")) <= steps
    for parent in parents:
        kids = [c for c in children if c.data.tags["mlflow.parentRunId"] == parent.info.run_id]
        assert sorted(c.data.params["batch_size"] for c in kids) == ["16", "64"]


def test_two_sweeps_at_once_on_one_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    _two_sweeps(tmp_path, uri)
    _count(uri)


@contextmanager
def start_server(tmp_path, backend: str):
    """`mlflow server` on 127.0.0.1 (a free port), artifacts proxied into tmp_path; yields its URL."""
    server = MlflowServer(tmp_path, backend).start()
    try:
        yield server.url
    finally:
        server.kill()


@pytest.fixture
def mlflow_server(tmp_path):
    with start_server(tmp_path, f"sqlite:///{tmp_path / 'server.db'}") as url:
        yield url


def test_two_sweeps_at_once_on_a_local_mlflow_server(tmp_path, mlflow_server):
    _two_sweeps(tmp_path, mlflow_server)
    _count(mlflow_server)
    client, runs = runs_of(mlflow_server)
    child = next(r for r in runs if r.data.tags.get("batchlab.role") == "train")
    assert {a.path for a in client.list_artifacts(child.info.run_id, "outputs")} >= {"outputs/steps.csv"}
    assert (tmp_path / "server-artifacts").is_dir()
