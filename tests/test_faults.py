"""Faults done for real: a tracking server killed and brought back, a store that never answers,
SIGKILL and SIGTERM at chosen points, a trainer started twice, `dvc repro` killed. Each test
counts what reached the store: one point per logged step and metric key, no run RUNNING."""
import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline.signals import proc_stat
from conftest import SMALL, MlflowServer, env_for, make_project, merge, runs_of, sh

pytestmark = pytest.mark.slow

# Batch size 1 on digits: 1,257 optimizer steps an epoch, one MLflow point per step and key.
LONG = merge(SMALL, {"train": {"batch_sizes": [1], "epochs": 3, "noise_scale": False,
                               "checkpoint_every_steps": 300}})
STEP_KEYS = ("train/loss", "train/lr", "train/optimizer_step", "train/throughput", "train/batch_acc")


def _wait_for(predicate, what: str, proc=None, timeout: float = 300, poll: float = 0.2):
    """Poll until ``predicate()`` holds (readiness, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process ended (exit {proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(poll)


def _train(proj, bs=1, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "pipeline", "train", "--batch-size", str(bs)], cwd=proj,
                            env=env or env_for(proj), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _child(uri, experiment="test"):
    client, runs = runs_of(uri, experiment)
    assert not [r for r in runs if r.info.status == "RUNNING"], "a run was left RUNNING"
    children = [r for r in runs if r.data.tags.get("batchlab.role") == "train"]
    return client, children


def _assert_exactly_once(client, run):
    """Every per-step key holds one point per optimizer step, no gap, no duplicate; final/* once."""
    steps = int(run.data.params["total_steps"])
    for key in STEP_KEYS:
        history = client.get_metric_history(run.info.run_id, key)
        at = sorted(m.step for m in history)
        assert len(at) == steps and len(set(at)) == steps, f"{key}: {len(at)} points for {steps} steps"
    assert len(client.get_metric_history(run.info.run_id, "final/throughput")) == 1
    evals = client.get_metric_history(run.info.run_id, "val/loss")
    assert len({m.step for m in evals}) == len(evals)


def _prepared(tmp_path, params=LONG, env_extra=None):
    proj = make_project(tmp_path / "p", params, git=False)
    env = env_for(proj) | (env_extra or {})
    assert subprocess.run([sys.executable, "-m", "pipeline", "prepare"], cwd=proj, env=env,
                          capture_output=True).returncode == 0
    return proj, env


def test_server_killed_mid_training_then_back_loses_nothing_and_duplicates_nothing(tmp_path):
    server = MlflowServer(tmp_path, f"sqlite:///{tmp_path / 'server.db'}").start()
    try:
        proj, env = _prepared(tmp_path, env_extra={"MLFLOW_TRACKING_URI": server.url})
        proc = _train(proj, env=env)
        # Wait until the run holds some step points, then the server dies (all its processes).
        _wait_for(lambda: any(len(c.data.metrics) for c in _child_any(server.url)), "the first points", proc)
        server.kill()
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        warning = [line for line in err.splitlines() if "does not answer" in line]
        assert len(warning) == 1 and server.url in warning[0] and "pipeline sync" in warning[0]
        assert "Traceback" not in err
        assert (proj / "outputs" / "train" / "bs1" / "seed0" / "summary.json").is_file()  # training finished
        assert list((proj / "spool").glob("*/journal.jsonl"))

        refused = sh([sys.executable, "-m", "pipeline", "sync"], proj, env=env, check=False)
        assert refused.returncode == 4 and refused.stderr.count("\n") == 1

        server.start()
        synced = sh([sys.executable, "-m", "pipeline", "sync"], proj, env=env)
        assert "reached" in synced.stdout
        assert not list((proj / "spool").glob("*/journal.jsonl"))
        client, children = _child(server.url)
        assert len(children) == 1 and children[0].info.status == "FINISHED"
        _assert_exactly_once(client, children[0])
        arts = {a.path for a in client.list_artifacts(children[0].info.run_id, "outputs")}
        assert "outputs/steps.csv" in arts
        # A second sync sends nothing twice.
        sh([sys.executable, "-m", "pipeline", "sync"], proj, env=env)
        _assert_exactly_once(client, client.get_run(children[0].info.run_id))
    finally:
        server.kill()


def test_store_unreachable_from_the_start_trains_spools_and_syncs_later(tmp_path):
    server = MlflowServer(tmp_path, f"sqlite:///{tmp_path / 'server.db'}")  # not started yet
    params = merge(SMALL, {"train": {"batch_sizes": [16], "epochs": 1}})
    proj, env = _prepared(tmp_path, params, {"MLFLOW_TRACKING_URI": server.url})
    for verb in (["train", "--batch-size", "16"], ["evaluate", "--batch-size", "16"], ["compare"]):
        done = sh([sys.executable, "-m", "pipeline", *verb], proj, env=env)
        assert done.stderr.count("does not answer") == 1 and "Traceback" not in done.stderr
    assert (proj / "outputs" / "compare" / "report.html").is_file()
    server.start()
    try:
        sh([sys.executable, "-m", "pipeline", "sync"], proj, env=env)
        client, runs = runs_of(server.url)
        assert not [r for r in runs if r.info.status == "RUNNING"]
        parents = [r for r in runs if r.data.tags.get("batchlab.role") == "sweep"]
        children = [r for r in runs if r.data.tags.get("batchlab.role") == "train"]
        assert len(parents) == 1 and len(children) == 1  # four stage runs, one sweep: ids mapped
        child = children[0]
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert child.info.status == "FINISHED"
        steps = int(child.data.params["total_steps"])
        assert len(client.get_metric_history(child.info.run_id, "train/loss")) == steps
        assert "test/acc" in child.data.metrics and "sweep/best_bs" in parents[0].data.metrics
    finally:
        server.kill()


def test_sigkill_before_any_checkpoint_leaves_no_run_running(tmp_path):
    proj, env = _prepared(tmp_path, merge(LONG, {"train": {"checkpoint_every_steps": 0, "epochs": 2}}))
    uri = f"sqlite:///{proj / 'mlflow.db'}"
    proc = _train(proj)
    _wait_for(lambda: (proj / "mlflow.db").exists() and any(
        r.data.tags.get("batchlab.role") == "train" for r in runs_of(uri)[1]), "the training run", proc)
    proc.kill()
    proc.wait()
    client, runs = runs_of(uri)
    assert [r.info.status for r in runs if r.data.tags.get("batchlab.role") == "train"] == ["RUNNING"]
    sh([sys.executable, "-m", "pipeline", "train", "--batch-size", "1"], proj)
    client, children = _child(uri)
    by_status = {r.info.status: r for r in client.search_runs([children[0].info.experiment_id], run_view_type=3)
                 if r.data.tags.get("batchlab.role") == "train"}
    dead = by_status.get("KILLED")
    assert dead is not None and "died" in dead.data.tags["batchlab.end_reason"]
    assert dead.data.tags["batchlab.owner.pid"] == str(proc.pid)
    live = [c for c in children if c.info.status == "FINISHED"]
    assert len(live) == 1
    _assert_exactly_once(client, live[0])


def test_sigkill_after_a_checkpoint_resumes_into_the_same_run_exactly_once(tmp_path):
    # 8 epochs (10,056 steps, about 3 s at bs 1): the logger, which lags the trainer, shows 400
    # points in the store long before the trainer ends and removes its checkpoint.
    proj, env = _prepared(tmp_path, merge(LONG, {"train": {"epochs": 8}}))
    uri = f"sqlite:///{proj / 'mlflow.db'}"
    proc = _train(proj)
    ckpt = proj / "checkpoints" / "bs1-s0.pt"
    _wait_for(lambda: ckpt.exists(), "a checkpoint", proc)
    # Past the checkpoint, so points after it already reached the store.
    _wait_for(lambda: any(len(runs_of(uri)[0].get_metric_history(c.info.run_id, "train/loss")) > 400
                          for c in _child_any(uri)), "points past the checkpoint", proc)
    proc.kill()
    proc.wait()
    assert ckpt.exists(), "the trainer ended before it was killed: nothing to resume"
    # A param that does not shape training changed meanwhile: it must not block the resume.
    params = (proj / "params.yaml").read_text().replace("max_points: 20000", "max_points: 30000")
    (proj / "params.yaml").write_text(params)
    again = sh([sys.executable, "-m", "pipeline", "train", "--batch-size", "1"], proj)
    client, children = _child(uri)
    assert len(children) == 1
    run = children[0]
    assert run.info.status == "FINISHED" and run.data.tags.get("batchlab.resumed") == "true"
    assert "batchlab.end_reason" not in run.data.tags
    _assert_exactly_once(client, run)
    assert "Traceback" not in again.stderr


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie (an orphan's exit is reaped by init, not by us)."""
    return proc_stat(pid)[:1] in ([], ["Z"])


def _child_any(uri):
    return [r for r in runs_of(uri)[1] if r.data.tags.get("batchlab.role") == "train"]


def test_a_second_trainer_of_the_same_identity_stops_at_once_naming_the_first(tmp_path):
    proj, env = _prepared(tmp_path, merge(LONG, {"train": {"epochs": 100}}))  # stopped below, long before
    first = _train(proj)
    _wait_for(lambda: (proj / "checkpoints" / "bs1-s0.lock").exists() and
              "pid" in (proj / "checkpoints" / "bs1-s0.lock").read_text(), "the first trainer's lock", first)
    second = sh([sys.executable, "-m", "pipeline", "train", "--batch-size", "1"], proj, check=False)
    assert second.returncode == 3
    assert second.stderr.count("\n") == 1 and f"pid {first.pid}" in second.stderr
    assert first.poll() is None
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, err[-2000:]
    client, runs = runs_of(f"sqlite:///{proj / 'mlflow.db'}")
    trains = [r for r in runs if r.data.tags.get("batchlab.role") == "train"]
    assert [r.info.status for r in trains] == ["KILLED"]


def test_a_trainer_started_by_hand_is_not_tied_to_the_process_that_started_it(tmp_path):
    # Only DVC's stage commands stop with their parent: `nohup python -m pipeline train &` from a
    # shell that then exits must train on. Here a parent starts `sh -c "python -m pipeline train"`
    # and is killed; the trainer must still be stepping afterwards.
    proj, env = _prepared(tmp_path, merge(LONG, {"train": {"epochs": 100}}))
    ckpt, lock = proj / "checkpoints" / "bs1-s0.pt", proj / "checkpoints" / "bs1-s0.lock"
    starter = ("import subprocess, sys, time\n"
               "subprocess.Popen(['/bin/sh', '-c', sys.argv[1]])\n"
               "time.sleep(600)")
    parent = subprocess.Popen([sys.executable, "-c", starter,
                               f"{sys.executable} -m pipeline train --batch-size 1 >train.log 2>&1"],
                              cwd=proj, env=env, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: ckpt.exists() and "pid" in lock.read_text(), "a checkpoint", parent)
    trainer = int(lock.read_text().split()[1])
    import torch

    def step() -> int:
        try:
            return torch.load(ckpt, weights_only=True)["loop"]["step"]
        except Exception:  # read while being replaced
            return -1
    def progressed(since: int) -> bool:
        if _gone(trainer):
            pytest.fail(f"the trainer stopped with its parent: {(proj / 'train.log').read_text()[-500:]}")
        return step() > since + 600
    parent.kill()
    parent.wait()
    at_kill = step()
    _wait_for(lambda: progressed(at_kill), "checkpoints after the parent died")
    os.kill(trainer, signal.SIGTERM)
    _wait_for(lambda: _gone(trainer), "the trainer to stop")
    run = _child_any(f"sqlite:///{proj / 'mlflow.db'}")[0]
    assert run.info.status == "KILLED" and "SIGTERM" in run.data.tags["batchlab.end_reason"]


# DVC runs a stage's command with `$SHELL -c`: bash exec's the command (the trainer's parent is
# DVC), dash (/bin/sh, used where SHELL is unset, as under cron or CI) forks it (the parent is a
# shell that outlives DVC). Both must take the trainer down with DVC.
@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash"])
def test_killing_dvc_repro_stops_its_trainer_with_a_checkpoint_and_repro_resumes(tmp_path, shell):
    proj = make_project(tmp_path / "d", LONG)
    uri = f"sqlite:///{proj / 'mlflow.db'}"
    sh(["dvc", "repro", "prepare"], proj)
    dvc = subprocess.Popen(["dvc", "repro"], cwd=proj, env={**env_for(proj), "SHELL": shell},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = proj / "checkpoints" / "bs1-s0.pt"
    lock = proj / "checkpoints" / "bs1-s0.lock"
    _wait_for(lambda: ckpt.exists() and "pid" in lock.read_text(), "a checkpoint", dvc, poll=0.01)
    trainer = int(lock.read_text().split()[1])
    # Freeze the trainer so that DVC dies while it is provably inside its loop: a checkpoint
    # short of the last one (step 3600 of 3771) means the loop had not ended when it stopped.
    os.kill(trainer, signal.SIGSTOP)
    import torch
    assert torch.load(ckpt, weights_only=True)["loop"]["step"] < 3600
    dvc.kill()  # SIGKILL: DVC cannot pass anything on; the trainer learns from the kernel
    dvc.wait()
    os.kill(trainer, signal.SIGCONT)  # the kernel's SIGTERM is pending: acted on at the next step
    _wait_for(lambda: _child_any(uri), "the run")
    owner = int(_child_any(uri)[0].data.tags["batchlab.owner.pid"])
    _wait_for(lambda: _gone(owner), "the orphan trainer to stop")
    run = _child_any(uri)[0]
    assert run.info.status == "KILLED" and "SIGTERM" in run.data.tags["batchlab.end_reason"]
    assert ckpt.exists()
    sh(["dvc", "repro"], proj, timeout=900)
    client, children = _child(uri)
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    _assert_exactly_once(client, children[0])


def _workers_of(proj, module: str = "pipeline.tracker_worker") -> list[int]:
    """Helper processes (``python -m MODULE``) started for this project: tracker workers name it in
    their config; a scorer names nothing (``proj`` None: every one; the tests run one at a time)."""
    pids = []
    for entry in os.scandir("/proc"):
        try:
            cmd = open(f"/proc/{entry.name}/cmdline", "rb").read().decode(errors="replace")
        except OSError:
            continue
        if entry.name.isdigit() and module in cmd.split("\0") and (proj is None or str(proj) in cmd) \
                and not _gone(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def test_an_evaluate_that_fails_after_its_worker_started_writes_nothing_then_a_rerun_writes_once(tmp_path):
    """evaluate hands its MLflow writes to a tracker worker started with the stage: a stage that
    fails (seed 1's model is missing, found after seed 0 was evaluated) writes nothing to the store
    and leaves no worker or scorer behind; the rerun logs each test metric and artifact once."""
    proj, env = _prepared(tmp_path, merge(SMALL, {"train": {"batch_sizes": [16], "seeds": [0, 1], "epochs": 1}}))
    sh([sys.executable, "-m", "pipeline", "train", "--batch-size", "16"], proj, env=env)
    model = proj / "outputs" / "train" / "bs16" / "seed1" / "model.pt"
    kept = model.read_bytes()
    model.unlink()
    failed = sh([sys.executable, "-m", "pipeline", "evaluate", "--batch-size", "16"], proj, env=env, check=False)
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1 and "model.pt not found" in failed.stderr
    _wait_for(lambda: not _workers_of(proj), "the tracker worker to exit")
    assert not _workers_of(None, "pipeline.scorer")  # the stage waited for its scorer's exit
    client, children = _child(f"sqlite:///{proj / 'mlflow.db'}")
    assert len(children) == 2 and not [k for c in children for k in c.data.metrics if k.startswith("test/")]
    assert not [a for c in children for a in client.list_artifacts(c.info.run_id, "evaluate")]

    model.write_bytes(kept)
    sh([sys.executable, "-m", "pipeline", "evaluate", "--batch-size", "16"], proj, env=env)
    assert not _workers_of(proj)  # the stage waited for its worker's answer and exit
    assert not _workers_of(None, "pipeline.scorer")  # and for its scorer's
    client, children = _child(f"sqlite:///{proj / 'mlflow.db'}")
    for child in children:
        assert len(client.get_metric_history(child.info.run_id, "test/acc")) == 1
        arts = {a.path for a in client.list_artifacts(child.info.run_id, "evaluate")}
        assert arts == {f"evaluate/{n}" for n in ("metrics.json", "report.json", "predictions.csv", "evaluation.png")}
