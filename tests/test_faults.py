"""Faults tried for real, each at two moments: a tracking server killed or stopped, the SQLite store
deleted, the trainer or `dvc repro` killed, a second front door opened. Each ends with the
training's outputs written, and after `python -m pipeline sync` the store holds every run once,
nothing RUNNING, and every metric key exactly one point per logged step (conftest.check_published)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import BIN, SMALL, MlflowServer, check_published, env_for, make_project, merge, runs_of, sh

pytestmark = pytest.mark.slow

# Two seeds of about 4,700 steps each at batch size 4: long enough to strike in the middle.
PARAMS = merge(SMALL, {"train": {"batch_sizes": [4], "seeds": [0, 1], "epochs": 15, "noise_scale": False,
                                 "checkpoint_every_steps": 500}})
# The stages' bound on a store that does not answer, made shorter here (a user's settings win over
# the pipeline's 3 s and one retry): the same paths, less waiting.
QUICK = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
# Where to strike: while seed 0 trains, or while seed 1 trains after seed 0 was published.
MOMENTS = {"first": ("checkpoints/bs4-s0.pt",),
           "second": ("outputs/train/bs4/seed0/run.json", "checkpoints/bs4-s1.pt")}


def _wait_for(proj: Path, paths, proc=None, timeout=300) -> None:
    """Until each file exists in turn (readiness, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    for rel in paths:
        while not (proj / rel).exists():
            assert proc is None or proc.poll() is None, f"ended before {rel}: {proc.communicate()[1][-2000:]}"
            assert time.monotonic() < deadline, f"{rel} never appeared"
            time.sleep(0.05)


def _train(proj: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "train", "--batch-size", "4"], cwd=proj, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _prepared(tmp_path: Path, env_extra: dict | None = None, in_process: bool = True) -> tuple[Path, dict]:
    """A project with its data prepared, in this process (the fault comes later) unless the test
    deletes the store: this process's MLflow would keep reading the deleted file."""
    from pipeline.config import load_params
    from pipeline.context import Context
    from pipeline.stages import prepare
    proj = make_project(tmp_path / "p", PARAMS, git=False)
    env = env_for(proj) | (env_extra or {})
    if in_process:
        prepare.run(Context(params=load_params(proj / "params.yaml"), workdir=proj, env=env))
    else:
        sh([sys.executable, "-m", "pipeline", "prepare"], proj, env=env)
    return proj, env


def _both_seeds_written(proj: Path) -> None:
    for seed in (0, 1):
        assert (proj / "outputs" / "train" / "bs4" / f"seed{seed}" / "model.pt").is_file()


def _sync(proj: Path, env: dict) -> str:
    """The user's `sync` once the store is back: with MLflow's own bounds, not the fault phase's
    short ones (a server just restarted on a busy machine can take longer than 1 s to answer)."""
    calm = {k: v for k, v in env.items() if k not in QUICK}
    return sh([sys.executable, "-m", "pipeline", "sync"], proj, env=calm).stdout


@pytest.mark.parametrize("moment", MOMENTS)
def test_server_killed_mid_training(tmp_path, moment):
    server = MlflowServer(tmp_path, f"sqlite:///{tmp_path / 'server.db'}").start()
    try:
        proj, env = _prepared(tmp_path, {"MLFLOW_TRACKING_URI": server.url} | QUICK)
        proc = _train(proj, env)
        _wait_for(proj, MOMENTS[moment], proc)
        server.kill()
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        assert "python -m pipeline sync" in err
        _both_seeds_written(proj)
        server.start()
        assert "holds the sweep's 2 training runs" in _sync(proj, env)
        assert check_published(server.url, proj)["train_runs"] == 2
    finally:
        server.kill()


@pytest.mark.parametrize("moment", MOMENTS)
def test_server_stopped_and_left_stopped(tmp_path, moment):
    """SIGSTOP: the server takes connections and never answers. Every wait on it is bounded."""
    server = MlflowServer(tmp_path, f"sqlite:///{tmp_path / 'server.db'}").start()
    try:
        proj, env = _prepared(tmp_path, {"MLFLOW_TRACKING_URI": server.url} | QUICK)
        proc = _train(proj, env)
        _wait_for(proj, MOMENTS[moment], proc)
        os.killpg(server.proc.pid, signal.SIGSTOP)
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        _both_seeds_written(proj)
        os.killpg(server.proc.pid, signal.SIGCONT)
        _sync(proj, env)
        assert check_published(server.url, proj)["train_runs"] == 2
    finally:
        os.killpg(server.proc.pid, signal.SIGCONT)
        server.kill()


@pytest.mark.parametrize("moment", MOMENTS)
def test_sqlite_store_deleted_mid_training(tmp_path, moment):
    proj, env = _prepared(tmp_path, in_process=False)
    proc = _train(proj, env)
    _wait_for(proj, MOMENTS[moment], proc)
    (proj / "mlflow.db").unlink()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    _both_seeds_written(proj)
    assert "python -m pipeline sync" in err
    _sync(proj, env)
    stats = check_published(f"sqlite:///{proj / 'mlflow.db'}", proj)
    assert stats["train_runs"] == 2
    _sync(proj, env)  # again: nothing changes
    assert check_published(f"sqlite:///{proj / 'mlflow.db'}", proj) == stats


@pytest.mark.parametrize("moment", MOMENTS)
def test_trainer_killed_then_rerun_resumes_into_the_same_run(tmp_path, moment):
    proj, env = _prepared(tmp_path)
    proc = _train(proj, env)
    _wait_for(proj, MOMENTS[moment], proc)
    proc.kill()
    proc.wait()
    uri = f"sqlite:///{proj / 'mlflow.db'}"
    _, runs = runs_of(uri)
    assert [r.info.status for r in runs if r.data.tags.get("batchlab.role") == "train"].count("RUNNING") == 1
    again = _train(proj, env)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-2000:]
    summary = yaml.safe_load((proj / "outputs/train/bs4" / f"seed{0 if moment == 'first' else 1}" / "summary.json").read_text())
    assert summary["resumed_from_step"] > 0
    assert check_published(uri, proj)["train_runs"] == 2


def test_second_front_doors_are_refused_while_a_sweep_runs(tmp_path):
    """`mlflow run` with other params, a stage by hand and `dvc repro` while `mlflow run` trains:
    each stops at once with one line; params.yaml and the first sweep are untouched."""
    proj = make_project(tmp_path / "p", merge(PARAMS, {"train": {"seeds": [0]}}))
    env = env_for(proj)
    mlflow = [str(BIN / "mlflow"), "run", ".", "--env-manager", "local", "--experiment-name", "test"]
    first = subprocess.Popen(mlflow + ["-P", "epochs=20"], cwd=proj, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    _wait_for(proj, ("checkpoints/bs4-s0.pt",), first, timeout=600)
    params_before = (proj / "params.yaml").read_text()
    second = sh(mlflow + ["-P", "lr=0.002"], proj, check=False)
    assert second.returncode != 0 and "another batchlab command runs in this workspace" in second.stderr
    by_hand = sh([sys.executable, "-m", "pipeline", "train", "--batch-size", "4"], proj, check=False)
    assert by_hand.returncode == 3 and by_hand.stderr.strip().count("\n") == 0
    dvc = sh(["dvc", "repro"], proj, check=False)
    assert dvc.returncode != 0
    assert (proj / "params.yaml").read_text() == params_before
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert "up to date" in sh(["dvc", "status"], proj).stdout
    stats = check_published(f"sqlite:///{proj / 'mlflow.db'}", proj)
    assert stats["train_runs"] == 1
    _, runs = runs_of(f"sqlite:///{proj / 'mlflow.db'}")
    assert len([r for r in runs if r.data.tags.get("batchlab.role") == "sweep"]) == 1


def test_dvc_repro_killed_mid_sweep_then_rerun_finishes_it(tmp_path):
    proj = make_project(tmp_path / "p", PARAMS)
    env = env_for(proj)
    repro = subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=proj, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for(proj, ("checkpoints/bs4-s0.pt",), repro)
    repro.send_signal(signal.SIGKILL)  # dvc alone: its trainer stops with it, at a step boundary
    repro.wait()
    uri = f"sqlite:///{proj / 'mlflow.db'}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the trainer ends its run as KILLED, then exits
        _, runs = runs_of(uri)
        if not [r for r in runs if r.info.status == "RUNNING"]:
            break
        time.sleep(0.2)
    assert [r.info.status for r in runs if r.data.tags.get("batchlab.role") == "train"] == ["KILLED"]
    sh(["dvc", "repro"], proj, timeout=600)
    assert "up to date" in sh(["dvc", "status"], proj).stdout
    assert check_published(uri, proj)["train_runs"] == 2
