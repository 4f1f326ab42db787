"""Everything that talks to MLflow lives here.

* The store: ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<project>/mlflow.db``. The
  project is the user's folder even when DVC runs a queued experiment in a temporary copy
  under ``.dvc/tmp/exps``; relative SQLite paths are resolved against it as well.
* The sweep: one parent run per sweep key (every param that shapes the sweep's runs + data
  hash), found or created under a file lock, so stages run as separate processes, partial
  reruns and parallel queue workers all file their runs under the same parent. The run
  ``mlflow run`` made becomes that parent when the sweep is new.
* Batch-wise metrics: ``MlflowSink`` buffers steps, reduces them to at most
  ``tracking.max_points`` points per metric (window means; window size recorded) and hands
  them to a logger process (``metric_logger``) that sends them with ``log_batch``.
"""
from __future__ import annotations

import json
import math
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from .metric_logger import MAX_BATCH
from .records import StepChunk
from .signals import Interrupted

TAG_ROLE = "batchlab.role"
TAG_SWEEP = "batchlab.sweep_key"
TAG_END = "batchlab.end_reason"
TAG_BATCH = "batchlab.batch_size"
TAG_LAUNCH = "batchlab.sweep_parent"
SEND_SECONDS = 10.0


def project_root(cwd: str | Path | None = None) -> Path:
    """The user's project folder, also from inside DVC's queue copy ``.dvc/tmp/exps/<tmp>``."""
    here = Path(cwd or os.getcwd()).resolve()
    parts = here.parts
    for i in range(len(parts) - 2):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return here


def tracking_uri(root: Path, env: dict[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    uri = env.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        return f"sqlite:///{root / 'mlflow.db'}"
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return f"{prefix}{(root / uri[len(prefix):]).resolve()}"
    return uri


def is_local_store(uri: str) -> bool:
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


class Tracker:
    """A connection to the tracking store for one stage: its experiment, its sweep."""

    def __init__(self, root: Path, experiment: str, env: dict[str, str] | None = None,
                 parent_run_id: str | None = None, params=None, run_tags=dict):
        self.root = root
        self.uri = tracking_uri(root, env)
        self.params = params            # the stage's Params: they name the sweep
        self.run_tags = run_tags        # () -> tags that make a run reproducible
        self.given_parent = parent_run_id
        # The first use of a new SQLite store creates its tables; two processes doing that at
        # once break the migration (seen with two sweeps started together), hence the lock.
        with self._lock():
            mlflow.set_tracking_uri(self.uri)
            self.client = MlflowClient(self.uri)
            self.client.search_experiments(max_results=1)
            if parent_run_id:
                # `mlflow run` chose the experiment (--experiment-name); children go where the parent is.
                self.experiment_id = self.client.get_run(parent_run_id).info.experiment_id
            else:
                self.experiment_id = self._experiment(experiment)
        mlflow.set_experiment(experiment_id=self.experiment_id)

    def _experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = (self.root / "mlartifacts").as_uri() if is_local_store(self.uri) else None
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except Exception:  # created by a concurrent process in the meantime
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialises find-or-create against one store: a lock file beside a SQLite database,
        in the project folder for other local stores, none for a server (see README)."""
        if self.uri.startswith("sqlite:///"):
            path = Path(self.uri[len("sqlite:///"):] + ".lock")
        elif is_local_store(self.uri):
            path = self.root / ".batchlab.lock"
        else:
            yield
            return
        from filelock import FileLock
        with FileLock(str(path), timeout=300):
            yield

    def find_sweep(self, key: str) -> str | None:
        found = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{TAG_SWEEP}` = '{key}' and tags.`{TAG_ROLE}` = 'sweep'",
            order_by=["attributes.start_time ASC"], max_results=1)
        return found[0].info.run_id if found else None

    def sweep_parent(self, manifest: dict[str, Any]) -> str:
        """The parent run of this stage's sweep: the existing one with its key, else the run
        ``mlflow run`` made (renamed as any parent is), else a new one. Never left RUNNING by us;
        a run ``mlflow run`` made that is not the parent points to it (tag batchlab.sweep_parent)."""
        key = self.params.sweep_key(manifest["data_hash"])
        name, tags = f"sweep-{key[:8]}", {TAG_ROLE: "sweep", TAG_SWEEP: key, **self.run_tags()}
        with self._lock():
            run_id = self.find_sweep(key)
            if run_id is not None:
                if self.given_parent and self.given_parent != run_id:
                    self.set_tags(self.given_parent, {TAG_LAUNCH: run_id, TAG_ROLE: "launch"})
                return run_id
            if self.given_parent:
                run_id = self.given_parent
                self.set_tags(run_id, tags | {"mlflow.runName": name})
            else:
                run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
            self.log_params(run_id, self.params.flat() | data_params(manifest))
            self.log_dict(run_id, manifest, "data/manifest.json")
            if not self.given_parent:
                self.client.set_terminated(run_id, "FINISHED")
            return run_id

    def retire_others(self, parent_id: str, batch_size: int, keep: str) -> list[str]:
        """A deliberate retrain replaces the run of the same (sweep, batch size): the older
        finished ones are deleted (restorable from MLflow's trash), never counted side by side."""
        runs = self.client.search_runs(
            [self.experiment_id], max_results=100,
            filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`{TAG_BATCH}` = '{batch_size}' "
                          f"and tags.`{TAG_ROLE}` = 'train'")
        retired = [r.info.run_id for r in runs if r.info.run_id != keep]
        for run_id in retired:
            self.set_tags(run_id, {"batchlab.superseded_by": keep})
            self.client.delete_run(run_id)
        return retired

    def get_run(self, run_id: str):
        return self.client.get_run(run_id)

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Log params, skipping those the run already holds with the same value."""
        existing = self.client.get_run(run_id).data.params
        items = [Param(k, _text(v)) for k, v in params.items() if existing.get(k) != _text(v)]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), MAX_BATCH):
            self.client.log_batch(run_id, metrics=items[i:i + MAX_BATCH])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, _text(v)) for k, v in tags.items()])

    def log_artifacts(self, run_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
        for path in paths:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_dict(self, run_id: str, obj: Any, path: str) -> None:
        self.client.log_dict(run_id, obj, path)

    def log_text(self, run_id: str, text: str, path: str) -> None:
        self.client.log_text(run_id, text, path)

    def read_artifact(self, run_id: str, path: str) -> str:
        with tempfile.TemporaryDirectory() as tmp:
            return Path(self.client.download_artifacts(run_id, path, tmp)).read_text()

    def log_model(self, model, example) -> None:
        """Into the active run, as a LoggedModel in the pt2 (torch.export) format: loading it
        runs no pickled code."""
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        model = model.cpu().eval()
        example = example.cpu()
        with torch.no_grad():
            output = model(example)
        mlflow.pytorch.log_model(
            model, name="model", signature=infer_signature(example.numpy(), output.numpy()),
            input_example=example.numpy(), serialization_format="pt2",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])

    def create_run(self, name: str, tags: dict[str, str], parent_id: str | None = None) -> str:
        """A run made and ended by the caller (``finish``), for runs beside the active one."""
        tags = tags | ({"mlflow.parentRunId": parent_id} if parent_id else {})
        return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

    def finish(self, run_id: str) -> None:
        self.client.set_terminated(run_id, "FINISHED")

    @contextmanager
    def run(self, *, name: str, parent_id: str | None, tags: dict[str, str],
            run_id: str | None = None) -> Iterator[str]:
        """An active (fluent) run that ends FINISHED, KILLED (signal) or FAILED (exception),
        with the reason as a tag. ``run_id`` reopens an interrupted run to resume it."""
        if run_id:
            run = mlflow.start_run(run_id=run_id)
            self.set_tags(run_id, {"batchlab.resumed": "true"})
        else:
            run = mlflow.start_run(experiment_id=self.experiment_id, run_name=name,
                                   parent_run_id=parent_id, tags=tags)
        rid = run.info.run_id
        try:
            yield rid
        except Interrupted as exc:
            _end(rid, "KILLED", str(exc))
            raise
        except KeyboardInterrupt:
            _end(rid, "KILLED", "stopped by SIGINT")
            raise
        except BaseException as exc:
            _end(rid, "FAILED", f"{type(exc).__name__}: {exc}"[:4000])
            raise
        else:
            mlflow.end_run("FINISHED")


def data_params(manifest: dict[str, Any]) -> dict[str, Any]:
    """The data set's figures: they describe the sweep, they are not results (params, not metrics)."""
    stats = {f"data.n_{name}": split["n"] for name, split in manifest["splits"].items()}
    return stats | {"data.hash": manifest["data_hash"], "data.n_features": manifest["n_features"],
                    "data.n_classes": manifest["n_classes"], "data.mean": manifest["normalisation"]["mean"],
                    "data.std": manifest["normalisation"]["std"]}


def _end(run_id: str, status: str, reason: str) -> None:
    try:
        mlflow.set_tag(TAG_END, reason)
    finally:
        mlflow.end_run(status)


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


class MlflowSink:
    """Receives step chunks from the loop; logs window means from a separate process.

    The window is ``ceil(total_steps / max_points)`` (1 with ``full_history``), so the MLflow
    history of every metric holds at most ``max_points`` points, each at step = samples seen.
    A point costs hundreds of microseconds in the SQLite store (more than a training step at
    small batch sizes), so the training process only queues them; ``metric_logger`` sends them
    from its own process (start_new_session: a terminal's Ctrl-C reaches the trainer alone, which
    flushes and then closes the logger).
    """

    def __init__(self, uri: str, run_id: str, total_steps: int, max_points: int,
                 full_history: bool, start_time: float):
        self.run_id = run_id
        self.window = 1 if full_history else max(1, math.ceil(total_steps / max_points))
        self._prev_time = start_time
        self._acc: dict[str, Any] = self._empty()
        self._pending: list[tuple] = []
        self._sent_at = time.monotonic()
        self.points = 0
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.metric_logger", uri, run_id],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            cwd=str(Path(__file__).resolve().parent.parent), start_new_session=True)
        self._ready = False
        # A pipe write blocks when the logger lags; a feeder thread takes that wait off the loop.
        self._queue: queue.Queue = queue.Queue()
        self._feeder = threading.Thread(target=self._feed, name="metric-feeder", daemon=True)
        self._feeder.start()

    def ready(self) -> None:
        """Wait for the logger's imports and connection (started in __init__, they overlap the
        trainer's own start-up); they would otherwise compete with the first steps for the CPU."""
        if self._ready:
            return
        answer = self._proc.stdout.readline().strip()
        if answer != "ready":
            self._proc.wait()
            raise RuntimeError(f"the metric logger process failed to start: {answer or 'no answer'}")
        self._ready = True

    def _feed(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self._proc.stdin.write(item)
                self._proc.stdin.flush()
            except OSError:
                return  # the logger died; close() reports it
        self._proc.stdin.close()

    @staticmethod
    def _empty() -> dict[str, Any]:
        return {"n": 0, "loss": 0.0, "correct": 0, "batch": 0}

    def resume_from(self, hist, resumed_step: int) -> None:
        """After a resume, refill the window the interruption left partial (it was not logged)."""
        boundary = resumed_step - resumed_step % self.window
        chunk = hist.after(boundary)
        if chunk.step and len(chunk.step) < len(hist.step):
            self._prev_time = hist.time[len(hist.step) - len(chunk.step) - 1]
        if chunk.step:
            self.steps(chunk)

    def steps(self, chunk: StepChunk) -> None:
        acc, out = self._acc, []
        has_correct = bool(chunk.correct)
        for i, step in enumerate(chunk.step):
            acc["n"] += 1
            acc["loss"] += chunk.loss[i]
            acc["batch"] += chunk.batch[i]
            if has_correct:
                acc["correct"] += chunk.correct[i]
            if step % self.window == 0:
                out += self._window_metrics(acc, step, chunk.samples[i], chunk.lr[i], chunk.time[i], has_correct)
                acc = self._empty()
        self._acc = acc
        if chunk.step:
            self._acc["last"] = (chunk.step[-1], chunk.samples[-1], chunk.lr[-1], chunk.time[-1], has_correct)
        self._add(out)

    def _window_metrics(self, acc, step, samples, lr, t, has_correct) -> list[tuple]:
        ms = int(t * 1000)
        elapsed = max(t - self._prev_time, 1e-9)
        self._prev_time = t
        metrics = [
            ("train/loss", acc["loss"] / acc["n"], ms, samples),
            ("train/lr", lr, ms, samples),
            ("train/optimizer_step", float(step), ms, samples),
            ("train/throughput", acc["batch"] / elapsed, ms, samples),
        ]
        if has_correct:
            metrics.append(("train/batch_acc", acc["correct"] / acc["batch"], ms, samples))
        return metrics

    def point(self, key: str, value: float, samples: int) -> None:
        self._add([(key, float(value), int(time.time() * 1000), samples)])

    def _add(self, metrics: list[tuple], force: bool = False) -> None:
        # Handed over in chunks of MAX_BATCH, or every SEND_SECONDS so the UI stays live.
        self._pending += metrics
        now = time.monotonic()
        if self._pending and (force or len(self._pending) >= MAX_BATCH or now - self._sent_at > SEND_SECONDS):
            self.points += len(self._pending)
            self._queue.put(json.dumps(self._pending) + "\n")
            self._pending, self._sent_at = [], now

    def close(self, complete: bool) -> None:
        """Send what is buffered and wait for the logger. ``complete``: training ended, so the
        last partial window is logged too; after an interruption it is kept for the resumed run."""
        last = self._acc.get("last")
        if complete and self._acc["n"] and last:
            step, samples, lr, t, has_correct = last
            self._add(self._window_metrics(self._acc, step, samples, lr, t, has_correct))
            self._acc = self._empty()
        self._add([], force=True)
        self._queue.put(None)
        self._feeder.join()
        if not self._ready:
            self.ready()
        answer = self._proc.stdout.readline().strip()
        self._proc.wait()
        try:
            result = json.loads(answer)
        except json.JSONDecodeError:
            result = {"sent": 0, "error": f"no answer from the metric logger (exit {self._proc.returncode})"}
        error = result.get("error")
        if error is None and result.get("sent") != self.points:
            error = f"sent {result.get('sent')} of {self.points} metric points"
        if error is not None:
            raise RuntimeError(f"logging metrics to MLflow failed: {error}")
