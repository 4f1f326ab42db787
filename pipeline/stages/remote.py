"""train with ``executor.name: ray``: every (learning rate, seed) of the stage's batch size is a Ray
task, and they run at once wherever the cluster has room (``executor.cpus`` and ``executor.gpus``
each; a fraction of a GPU lets several small trainings share a card).

Ray does the scheduling, the placement and the retries: a task on a node that dies runs again on
another (Ray retries tasks lost with their node). This module only hands each task what a local
training gets and puts what it made into the DVC workspace.

What every node needs, as under torchrun: this checkout at the same path (Ray adds the driver's
folder to the workers' import path), the prepared data (``dvc pull`` or ``prepare``), and the
tracking store (a shared folder or ``MLFLOW_TRACKING_URI`` pointing at one server). A task writes
its run's folder on its own node and returns the files through Ray; the driver swaps them into
``outputs/`` as a local training would, so the nodes need not share ``outputs/``. Checkpoints stay
in ``checkpoints/``: where that folder is shared, a task moved to another node resumes from it;
elsewhere it starts that training again.
"""
from __future__ import annotations

import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..config import ParamsError, Unreachable
from ..context import Context, read_manifest, replaced_dir, write_atomic
from ..procs import Interrupted
from . import train

INSTALL = "pip install -r requirements-ray.txt"


def check(ctx: Context, batch_size: int) -> None:
    """Before any work (a learning-rate search included): the params, Ray and its cluster."""
    _check(ctx, batch_size)
    _ray()
    check_reachable(ctx.env.get("RAY_ADDRESS") or None)


def run(ctx: Context, batch_size: int, seeds: tuple[int, ...] | None = None,
        log_to_mlflow: bool = True, lr: float | None = None) -> list[dict[str, Any]]:
    """What ``train.run`` does, each training a Ray task; the summaries, in the same order."""
    _check(ctx, batch_size)
    ray = _ray()
    address = ctx.env.get("RAY_ADDRESS") or None
    check_reachable(address)
    ctx.run_tags()  # git is asked once, here: the tasks carry the answer
    from ..tracking.uri import project_root, workspace
    # The tasks publish as this workspace, whichever node runs them (a node's name is not ours).
    ctx.env.setdefault("BATCHLAB_WORKSPACE", workspace(project_root(ctx.workdir), ctx.env)[1])
    import logging
    # A Ray instance this stage starts reports nothing to Ray's usage statistics unless the user says so.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address is None:
        # Ray gives a new local instance token authentication by default and writes the token to
        # ~/.ray/auth_token; from then on it turns token authentication on for every cluster
        # `ray start` makes on the machine, which can then refuse their own workers and drivers
        # (docs/scaling.md). An instance that lives as long as this stage and serves only its
        # tasks does without (the user's RAY_AUTH_MODE wins).
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=True,
             **({"include_dashboard": False} if address is None else {}))
    try:
        e = ctx.params.executor
        task = ray.remote(_train_task).options(num_cpus=e.cpus, num_gpus=e.gpus, name=f"train-bs{batch_size}")
        trials = ([(lr, s) for s in seeds or ctx.params.train.seeds] if lr is not None
                  else ctx.params.train.trials(seeds))
        search = ctx.train_dir(batch_size) / "lr_search.json"
        found = search.read_bytes() if lr is not None and search.is_file() else None
        refs = [task.remote(ctx, batch_size, seed, rate, log_to_mlflow, found) for rate, seed in trials]
        try:
            _wait(ray, refs, address)
            results = ray.get(refs)
        except ray.exceptions.RayTaskError as err:  # the training's own error, as a local run raises it
            _head_lost(address)  # or a task that stopped because the head is gone: that is the news
            raise (err.cause if isinstance(err.cause, BaseException) else err) from None
        except KeyboardInterrupt:
            for ref in refs:
                ray.cancel(ref)
            raise
        except Exception:  # Ray's own failure (a system error) may be the head's loss too
            _head_lost(address)
            raise
        grid = bool(ctx.params.train.lr_grid)
        for (rate, seed), (summary, files) in zip(trials, results):
            _unpack(ctx.train_dir(batch_size, seed, rate if grid else None), files)
        return [summary for summary, _ in results]
    finally:
        ray.shutdown()


# How often the driver and each task look at the head node: a lost head is said within seconds,
# where Ray itself waits a minute for it and then prints its own failure.
HEAD_POLL_SECONDS = 2.0


def _wait(ray, refs: list, address: str | None) -> None:
    """Until every task is done, looking at the head between waits. A head that is gone ends the
    stage with one line, at once: Ray's shutdown and its exit handlers would wait on it for a
    minute, so the process ends without them (nothing of the stage was written yet; the tasks on
    other nodes stop by themselves, ``_watch_head``, keeping their checkpoints)."""
    pending = list(refs)
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=HEAD_POLL_SECONDS)
        if pending:
            _head_lost(address)


def _head_lost(address: str | None) -> None:
    """Where the head does not answer: the one line, and the end of this process."""
    if address in (None, "auto", "local") or _answers(address):
        return
    print(f"error: the Ray cluster's head node at RAY_ADDRESS={address} is gone; its trainings stop "
          f"with their checkpoints. Start the cluster again and rerun: they resume", file=sys.stderr, flush=True)
    os._exit(1)


def _answers(address: str, timeout: float = 5.0) -> bool:
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextmanager
def _watch_head(address: str | None):
    """In a task: SIGTERM this training (it stops at its next step with a checkpoint, its run
    KILLED) once the head node stops answering, rather than train on and publish a run whose
    driver, and so whose record in outputs/, is gone. Two misses in a row, so that one slow
    answer on a loaded machine stops nothing."""
    import signal
    import threading
    if address in (None, "auto", "local"):  # a local instance dies with its driver, tasks and all
        yield None
        return
    done = threading.Event()

    def may_finish() -> None:
        """The training is done: its driver must still be there to take its files."""
        if not _answers(address):
            raise Interrupted(signal.SIGTERM)

    def watch() -> None:
        misses = 0
        while not done.wait(HEAD_POLL_SECONDS):
            misses = 0 if _answers(address) else misses + 1
            if misses == 2:
                os.kill(os.getpid(), signal.SIGTERM)
                return

    thread = threading.Thread(target=watch, name="watch-ray-head", daemon=True)
    thread.start()
    try:
        yield may_finish
    finally:
        done.set()  # Ray reuses the worker process for later tasks: the watch ends with this one


def _check(ctx: Context, batch_size: int) -> None:
    """What ``train.prepare_jobs`` checks, on the driver, before any task starts."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ParamsError("executor.name=ray under torchrun (allowed: local; Ray runs whole trainings, "
                          "torchrun spreads one)")
    train.check_batch_size(ctx, batch_size, read_manifest(ctx.data_dir)["splits"]["train"]["n"])


def _ray():
    try:
        import ray
    except ImportError:
        raise ParamsError(f"executor.name=ray needs Ray, which is not installed here (allowed: local; "
                          f"or install it: {INSTALL})") from None
    return ray


def check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """Ray waits minutes on an address nobody answers: look first. ``None``, ``auto`` and
    ``local`` are Ray's to resolve."""
    if address is None or address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ParamsError(f"RAY_ADDRESS={address!r} is not an address (allowed: host:port, ray://host:port, auto)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise Unreachable(f"the Ray cluster at RAY_ADDRESS={address} does not answer ({err.strerror or err}); "
                          f"nothing was trained. Start it (ray start --head ...) or unset RAY_ADDRESS") from None


def _train_task(ctx: Context, batch_size: int, seed: int, lr: float | None, log_to_mlflow: bool,
                search: bytes | None = None):
    """One training on a Ray worker: the local code path, its run folder written on this node
    and returned as files."""
    import dataclasses
    import shutil
    import tempfile

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    before = os.getcwd()  # Ray reuses the worker process: it goes back where it was, below
    os.chdir(ctx.workdir)  # relative paths in params (data.root, model.code) are the project's
    if str(ctx.workdir) not in sys.path:
        sys.path.insert(0, str(ctx.workdir))
    import ray

    scratch = Path(tempfile.mkdtemp(prefix="batchlab-"))
    try:
        here = dataclasses.replace(ctx, outputs=scratch)
        if search is not None:  # the driver's learning-rate search, recorded with the run as locally
            write_atomic(here.train_dir(batch_size) / "lr_search.json", search)
        jobs = train.prepare_jobs(here, batch_size, (seed,), lr if search is not None else None)
        (job,) = [j for j in jobs if j.lr == lr]
        view = None
        if log_to_mlflow:
            from ..tracking.sweep import open_view
            view = open_view(here)
        node = ray.get_runtime_context().get_node_id()
        with _watch_head(ctx.env.get("RAY_ADDRESS") or None) as may_finish:
            job = dataclasses.replace(job, may_finish=may_finish)
            summary = train.run_one(job, view, {"batchlab.executor": "ray", "batchlab.ray_node": node})
        files = {str(p.relative_to(job.out)): p.read_bytes() for p in sorted(job.out.rglob("*")) if p.is_file()}
        return summary, files
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        os.chdir(before)


def _unpack(dest: Path, files: dict[str, bytes]) -> None:
    """A run's files into its folder, swapped in whole, as a local training writes them."""
    with replaced_dir(dest) as tmp:
        for rel, content in files.items():
            write_atomic(tmp / rel, content)
