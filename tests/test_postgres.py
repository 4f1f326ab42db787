"""A sweep logged to an `mlflow server` backed by a real PostgreSQL, read back over REST."""
import json
import os
import subprocess
import urllib.request

import pytest

from conftest import SMALL, env_for, make_project, merge, sweep_cmd
from postgres import Postgres
from test_concurrency import start_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def postgres():
    pg = Postgres()
    if not pg.start():
        if os.environ.get("CI"):  # CI installs PostgreSQL (.ci/run): there it must run, not skip
            pytest.fail(f"no PostgreSQL could be started in CI: {pg.why_not}")
        print(f"SKIPPED PostgreSQL tests: {pg.why_not}")
        pytest.skip(f"no PostgreSQL could be started: {pg.why_not}")
    yield pg.uri
    pg.stop()


def _api(url, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_sweep_on_a_postgres_backed_server(tmp_path, postgres):
    with start_server(tmp_path, postgres) as url:
        proj = make_project(tmp_path / "p", merge(SMALL, {"train": {"epochs": 1}}), git=False)
        env = env_for(proj) | {"MLFLOW_TRACKING_URI": url}
        proc = subprocess.run(sweep_cmd(), cwd=proj, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        exp = _api(url, "experiments/get-by-name?experiment_name=test")["experiment"]
        runs = _api(url, "runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100})["runs"]
        tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
        parents = [r for r, t in zip(runs, tags) if t.get("batchlab.role") == "sweep"]
        children = [(r, t) for r, t in zip(runs, tags) if t.get("batchlab.role") == "train"]
        assert len(parents) == 1 and len(children) == 2
        for run, t in children:
            assert t["mlflow.parentRunId"] == parents[0]["info"]["run_id"]
            assert run["info"]["status"] == "FINISHED"
            params = {p["key"]: p["value"] for p in run["data"]["params"]}
            hist = _api(url, f"metrics/get-history?run_id={run['info']['run_id']}&metric_key=train/loss&max_results=25000")
            assert len(hist["metrics"]) == int(params["budget_steps"])  # stop_at_target off: the whole budget
            arts = _api(url, f"artifacts/list?run_id={run['info']['run_id']}&path=outputs")
            assert "outputs/steps.csv" in {f["path"] for f in arts["files"]}


def test_a_sweep_published_straight_into_postgres_is_complete_and_republishing_adds_nothing(tmp_path, postgres):
    """A postgresql:// tracking URI (no server between): the stages publish into it, and
    `python -m pipeline sync` afterwards finds nothing missing. (An experiment of its own: the
    server's keeps its artifacts behind the server, which a direct client cannot reach.)"""
    from conftest import check_published, sh
    proj = make_project(tmp_path / "p", merge(SMALL, {"train": {"epochs": 1}, "tracking": {"experiment": "direct"}}),
                        git=False)
    env = env_for(proj) | {"MLFLOW_TRACKING_URI": postgres}
    proc = subprocess.run(sweep_cmd(), cwd=proj, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning" not in proc.stderr
    stats = check_published(postgres, proj, "direct")
    assert stats["train_runs"] == 2
    sh(["python", "-m", "pipeline", "sync"], proj, env=env)
    assert check_published(postgres, proj, "direct") == stats
