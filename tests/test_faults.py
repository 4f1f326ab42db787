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
    # One line per problem: neither MLflow's nor SQLAlchemy's tracebacks reach the terminal.
    assert "Traceback" not in err and "sqlalchemy" not in err.lower(), err[-3000:]
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


def _stage_processes(verb: str) -> list[int]:
    """Python processes running `-m pipeline VERB` (not the shells that start them)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"-m" in argv and b"pipeline" in argv and verb.encode() in argv and b"-c" not in argv:
            found.append(int(entry.name))
    return found


@pytest.mark.parametrize("stage,delay", [("evaluate", 0.0), ("compare", 0.0), ("compare", 1.0)])
def test_dvc_repro_killed_during_a_later_stage_takes_it_along(tmp_path, stage, delay):
    """`dvc repro` SIGKILLed while evaluate or compare runs (as it starts, and once it has
    imported what it runs): the stage ends with it instead of running on as an orphan, and the
    next `dvc repro` leaves complete outputs, up to date, each run recorded once."""
    proj = make_project(tmp_path / "p", merge(SMALL, {"train": {"batch_sizes": [16], "seeds": [0, 1]}}))
    env = env_for(proj)
    repro = subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=proj, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (pids := _stage_processes(stage)):
        assert repro.poll() is None, f"ended before {stage}: {repro.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"{stage} never started"
        time.sleep(0.01)
    time.sleep(delay)
    repro.send_signal(signal.SIGKILL)  # dvc alone, not its process group
    repro.wait()
    deadline = time.monotonic() + 30
    while [pid for pid in pids if (Path("/proc") / str(pid)).exists() and
           (Path("/proc") / str(pid) / "stat").read_text().split(")")[-1].split()[0] != "Z"]:
        assert time.monotonic() < deadline, f"the {stage} stage outlived `dvc repro` by 30 s"
        time.sleep(0.1)
    # It stopped where it was: what it writes last is not there (an orphan would have finished).
    last = "outputs/compare/summary.json" if stage == "compare" else "outputs/evaluate/bs16/seed1/metrics.json"
    assert not (proj / last).exists()
    sh(["dvc", "repro"], proj, timeout=600)
    assert "up to date" in sh(["dvc", "status"], proj).stdout
    assert (proj / "outputs/compare/report.html").is_file()
    for seed in (0, 1):
        assert (proj / f"outputs/evaluate/bs16/seed{seed}/metrics.json").is_file()
    uri = f"sqlite:///{proj / 'mlflow.db'}"
    assert check_published(uri, proj)["train_runs"] == 2
    _, runs = runs_of(uri)
    assert len([r for r in runs if r.data.tags.get("batchlab.role") == "sweep"]) == 1


@pytest.mark.parametrize("nth", [1, 2])
def test_server_killed_while_sync_logs_a_model_then_sync_leaves_every_model_ready(tmp_path, nth):
    """The server dies while `sync` uploads the first (or the second) training's model: that
    LoggedModel stays PENDING with no files. The next `sync` judges models by their state and
    sends it again: one READY model per training, each loadable."""
    import mlflow.pytorch
    import torch
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelStatus
    server = MlflowServer(tmp_path, f"sqlite:///{tmp_path / 'server.db'}")
    proj = make_project(tmp_path / "p", merge(PARAMS, {"train": {"epochs": 1}}), git=False)
    env = env_for(proj) | {"MLFLOW_TRACKING_URI": server.url} | QUICK
    for verb in (["prepare"], ["train", "--batch-size", "4"]):  # nothing listens yet: nothing published
        sh([sys.executable, "-m", "pipeline", *verb], proj, env=env)
    server.start()
    try:
        client = MlflowClient(server.url)
        calm = {k: v for k, v in env.items() if k not in QUICK}  # a healthy server on a loaded machine
        sync = subprocess.Popen([sys.executable, "-m", "pipeline", "sync"], cwd=proj, env=calm,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        seen = set()
        while True:
            exp = client.get_experiment_by_name("test")
            pending = [m for m in client.search_logged_models([exp.experiment_id])
                       if m.status == LoggedModelStatus.PENDING] if exp else []
            seen |= {m.model_id for m in pending}
            if len(seen) >= nth and pending:
                break
            assert sync.poll() is None, f"sync ended before model {nth} was seen PENDING"
            time.sleep(0.01)
        server.kill()
        sync.communicate(timeout=120)
        server.start()
        _sync(proj, env)
        exp = client.get_experiment_by_name("test")
        models = client.search_logged_models([exp.experiment_id])
        assert [m.status for m in models] == [LoggedModelStatus.READY] * 2
        assert check_published(server.url, proj)["train_runs"] == 2
        mlflow.set_tracking_uri(server.url)
        for m in models:
            x = torch.load(proj / "outputs/train/bs4/seed0/input_example.pt", weights_only=True)
            assert mlflow.pytorch.load_model(f"models:/{m.model_id}")(x).shape[0] == x.shape[0]
        assert "holds the sweep's 2 training runs" in _sync(proj, env)  # again: nothing changes
        assert len(client.search_logged_models([exp.experiment_id])) == 2
    finally:
        server.kill()


def test_a_resume_under_a_clock_set_back_a_day_keeps_the_run_s_times_in_order(tmp_path):
    """The trainer killed, then resumed by a process whose wall clock reads a day earlier (set
    back, or another machine's): steps.csv's wall_s never runs backwards, run.json's end is not
    before its creation, and the MLflow run ends after it starts."""
    import csv
    proj, env = _prepared(tmp_path)
    proc = _train(proj, env)
    _wait_for(proj, MOMENTS["first"], proc)
    proc.kill()
    proc.wait()
    behind = tmp_path / "behind"
    behind.mkdir()
    (behind / "sitecustomize.py").write_text(
        "import time\n_time = time.time\ntime.time = lambda: _time() - 86400.0\n"
        "_ns = time.time_ns\ntime.time_ns = lambda: _ns() - 86400 * 10**9\n")
    again = _train(proj, env | {"PYTHONPATH": f"{behind}{os.pathsep}{env['PYTHONPATH']}"})
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-2000:]
    folder = proj / "outputs/train/bs4/seed0"
    assert yaml.safe_load((folder / "summary.json").read_text())["resumed_from_step"] > 0
    with open(folder / "steps.csv") as f:
        wall = [float(row["wall_s"]) for row in csv.DictReader(f)]
    assert all(b >= a for a, b in zip(wall, wall[1:])) and wall[0] >= 0
    record = yaml.safe_load((folder / "run.json").read_text())
    assert record["end_time"] >= record["created"]
    uri = f"sqlite:///{proj / 'mlflow.db'}"
    _, runs = runs_of(uri)
    for r in runs:
        if r.data.tags.get("batchlab.record") == record["record"]:
            assert r.info.status == "FINISHED" and r.info.end_time >= r.info.start_time
            break
    else:
        raise AssertionError("the run is not in the store")


def test_out_of_memory_names_the_batch_size_and_find_batch_size_and_removes_the_checkpoint(tmp_path):
    """A real allocation failure (the process's address space capped with RLIMIT_AS, as a
    container's limit would): one line naming the batch size, the memory asked for and
    `find-batch-size`; the checkpoint the run had goes, since a resume would fail the same way."""
    import resource
    big = merge(PARAMS, {"model": {"hidden_sizes": [131072]}, "train": {
        "batch_sizes": [1024], "seeds": [0], "epochs": 50, "checkpoint_every_steps": 2}})
    proj = make_project(tmp_path / "p", big, git=False)
    env = env_for(proj)
    sh([sys.executable, "-m", "pipeline", "prepare"], proj, env=env)
    train = [sys.executable, "-m", "pipeline", "train", "--batch-size", "1024"]
    first = subprocess.Popen(train, cwd=proj, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(proj, ("checkpoints/bs1024-s0.pt",), first)
    first.kill()
    first.wait()

    def capped():  # the trainer's own address space (torch's libraries) plus well under a step's need
        resource.setrlimit(resource.RLIMIT_AS, (5 * 2**30, 5 * 2**30))
    again = subprocess.run(train, cwd=proj, env=env, capture_output=True, text=True, preexec_fn=capped, timeout=600)
    assert again.returncode == 1, again.stderr[-2000:]
    (line,) = again.stderr.strip().splitlines()
    print(line)
    assert "batch size 1024 does not fit" in line and "MiB more" in line
    assert "python -m pipeline find-batch-size" in line
    assert not (proj / "checkpoints/bs1024-s0.pt").exists()
    _, runs = runs_of(f"sqlite:///{proj / 'mlflow.db'}")
    assert [r.info.status for r in runs if r.data.tags.get("batchlab.role") == "train"] == ["FAILED"]


def test_two_workspaces_publishing_one_sweep_to_one_server_keep_their_own_runs(tmp_path):
    """Two clones of one project with the same params (two machines, one `make server`) run
    `dvc repro` at once, then each syncs twice: each workspace's trainings are recorded once, under
    a parent of its own, nothing goes to the trash, and the syncs change no count."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType
    from pipeline.tracking.uri import workspace
    server = MlflowServer(tmp_path, f"sqlite:///{tmp_path / 'server.db'}").start()
    try:
        params = merge(SMALL, {"train": {"batch_sizes": [64], "seeds": [0, 1]}})
        projs = [make_project(tmp_path / name, params) for name in ("a", "b")]
        envs = [env_for(p) | {"MLFLOW_TRACKING_URI": server.url} for p in projs]
        repros = [subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=p, env=e, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True) for p, e in zip(projs, envs)]
        for repro in repros:
            out, err = repro.communicate(timeout=900)
            assert repro.returncode == 0, err[-3000:]
        client = MlflowClient(server.url)

        def counts():
            exp = client.get_experiment_by_name("test")
            live = client.search_runs([exp.experiment_id], max_results=1000)
            trashed = client.search_runs([exp.experiment_id], run_view_type=ViewType.DELETED_ONLY, max_results=1000)
            models = client.search_logged_models([exp.experiment_id], max_results=1000)
            return live, trashed, models

        def shape(live, trashed, models):
            return (sorted((r.data.tags.get("batchlab.workspace"), r.data.tags.get("batchlab.role"), r.info.status)
                           for r in live), len(trashed), len(models))

        after_repro = shape(*counts())
        for _ in range(2):
            for p, e in zip(projs, envs):
                assert "holds the sweep's 2 training runs" in _sync(p, e)
        live, trashed, models = counts()
        assert shape(live, trashed, models) == after_repro and not trashed
        assert len(models) == 4
        for p in projs:
            ws = workspace(p.resolve())[0]
            mine = [r for r in live if r.data.tags.get("batchlab.workspace") == ws]
            (parent,) = [r for r in mine if r.data.tags["batchlab.role"] == "sweep"]
            train = [r for r in mine if r.data.tags["batchlab.role"] == "train"]
            assert len(train) == 2 and {r.data.tags["mlflow.parentRunId"] for r in train} == {parent.info.run_id}
            assert {r.data.tags["batchlab.workspace_name"] for r in mine} == {workspace(p.resolve())[1]}
        assert check_published(server.url, projs[0])["train_runs"] == 4  # the 2 of each, once each
        check_published(server.url, projs[1])
    finally:
        server.kill()
