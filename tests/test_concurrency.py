"""Two sweeps at once against one store lose no run and no metric point."""
import socket
from contextlib import contextmanager
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import BIN, SMALL, env_for, make_project, merge, runs_of, sweep_cmd

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
        steps = int(child.data.params["total_steps"])
        assert len(client.get_metric_history(child.info.run_id, "train/loss")) == steps
        assert len(client.get_metric_history(child.info.run_id, "train/batch_acc")) == steps
        evals = int(child.data.params["total_steps"]) // int(child.data.params["eval_every_steps_effective"])
        assert len(client.get_metric_history(child.info.run_id, "val/loss")) >= evals
    for parent in parents:
        kids = [c for c in children if c.data.tags["mlflow.parentRunId"] == parent.info.run_id]
        assert sorted(c.data.params["batch_size"] for c in kids) == ["16", "64"]


def test_two_sweeps_at_once_on_one_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    _two_sweeps(tmp_path, uri)
    _count(uri)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def start_server(tmp_path, backend: str):
    """`mlflow server` on 127.0.0.1 (a free port), artifacts proxied into tmp_path; yields its URL."""
    port = _free_port()
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", backend,
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"mlflow server did not start: {proc.stderr.read()[-2000:]}")
        time.sleep(0.5)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


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
