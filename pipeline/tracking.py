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
  them to a logger process (``metric_logger``) that writes them to the store.
* Faults: a store that does not answer is declared down within seconds (bounded HTTP timeouts
  and retries below). From then on every write of the stage goes to a journal under ``spool/``
  (``pipeline/spool.py``), and the stage goes on; ``sync`` (``python -m pipeline sync``, and the
  start of every later stage run) replays journals in order, exactly once.
"""
from __future__ import annotations

import json
import math
import os
import queue
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.entities import Param, RunTag
from mlflow.tracking import MlflowClient

from . import metric_logger, spool
from .metric_logger import MAX_BATCH, Points, last_steps
from .records import StepChunk
from .signals import Interrupted, proc_stat
from .store import is_local_store, tracking_uri
from .spool import Spool, is_local, new_local_id

TAG_ROLE = "batchlab.role"
TAG_SWEEP = "batchlab.sweep_key"
TAG_END = "batchlab.end_reason"
TAG_BATCH = "batchlab.batch_size"
TAG_SEED = "batchlab.seed"
TAG_LAUNCH = "batchlab.sweep_parent"
TAG_OWNER = "batchlab.owner"
SEND_SECONDS = 10.0
SPOOL_DIR = "spool"
VIEW_KEY = "batch-sizes"  # every run of the experiment; each sweep also has its own: sweep_view()
# MLflow UI state (keys as its experiment page shares them): runs grouped by batch size, the
# groups' mean drawn in charts, every run shown, line charts against step (= samples seen).
# The "train" chart section is one column wide and 480 px high, so the loss chart the view opens
# on spans the chart pane (the UI's default is 3 columns of 360 px: a thumbnail whose legend
# showed two of the four groups). With the section and an empty chart list given, the UI still
# adds a chart for every metric, each to the section named by its prefix (3.17's reconciliation).
SHARED_VIEW = {
    "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "param", "groupByData": "batch_size"}]},
    "useGroupedValuesInCharts": True, "runsHiddenMode": "SHOW_ALL", "hideEmptyCharts": True,
    "chartsSearchFilter": "train/loss",
    "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
    "compareRunCharts": [],
    "compareRunSections": [{"uuid": "batchlab-train", "name": "train", "display": True, "isReordered": False,
                            "deleted": False, "isGenerated": True, "columns": 1, "cardHeight": 480}],
}

# A store that does not answer is declared down within about 10 s, not after MLflow's default
# of minutes of retries (a user's own settings win).
for _key, _value in (("MLFLOW_HTTP_REQUEST_TIMEOUT", "3"), ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"),
                     ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")):
    os.environ.setdefault(_key, _value)


class StoreDown(RuntimeError):
    """The tracking store does not answer; the message is one line with the URI."""


def store_down(err: BaseException) -> bool:
    """Is ``err`` the store not answering (as opposed to a request the store refused)?"""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(err, (StoreDown, requests.exceptions.ConnectionError, requests.exceptions.Timeout, OSError)):
        return True
    try:
        import sqlalchemy.exc
        if isinstance(err, sqlalchemy.exc.OperationalError):
            return True
    except ImportError:
        pass
    text = str(err).lower()
    return isinstance(err, MlflowException) and any(s in text for s in (
        "api request to", "max retries", "connection", "readonly", "read-only", "unable to open database",
        "database is locked", "disk i/o error"))


def first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}"


class Tracker:
    """A connection to the tracking store for one stage: its experiment, its sweep.

    Every write goes to the store while it answers, and to the stage's journal (``spool/``)
    from the first time it does not; runs made while it is down get local ids.
    """

    def __init__(self, root: Path, experiment: str, env: dict[str, str] | None = None,
                 parent_run_id: str | None = None, params=None, run_tags=dict, stage: str = "stage",
                 warn: bool = True):
        self.root = root
        self.uri = tracking_uri(root, env)
        self.params = params            # the stage's Params: they name the sweep
        self.run_tags = run_tags        # () -> tags that make a run reproducible
        self.given_parent = parent_run_id
        self.experiment_name = experiment
        self.spool = Spool(root / SPOOL_DIR, stage)
        self.ids = spool.load_ids(root / SPOOL_DIR)
        self._exp_tags: dict[str, dict[str, str]] = {}  # experiment id -> its tags as read or written here
        self.down: str | None = None
        self.warn = warn
        self.experiment_id: str | None = None
        self.client: MlflowClient | None = None
        self._writer: Points | None = None
        try:
            # The first use of a new SQLite store creates its tables (making the client does, for
            # SQLite); two processes doing that at once break the migration (seen with two sweeps
            # started together), hence the lock around both.
            with self._lock():
                self.client = MlflowClient(self.uri)
                mlflow.set_tracking_uri(self.uri)
                self.client.search_experiments(max_results=1)
                if parent_run_id:
                    # `mlflow run` chose the experiment (--experiment-name); children go where the parent is.
                    self.experiment_id = self.client.get_run(parent_run_id).info.experiment_id
                    self._ui_tags(self.client.get_experiment(self.experiment_id))
                else:
                    self.experiment_id = self._experiment(experiment)
            self.sync()
        except Exception as err:
            self._fail(err)

    # ------------------------------------------------------------ store or journal

    def _fail(self, err: BaseException) -> None:
        """The store stopped answering: say so once, and journal from now on."""
        if not store_down(err):
            raise err
        if self.down is None:
            self.down = first_line(err)
            if self.warn:
                print(f"warning: tracking store {self.uri} does not answer ({self.down}); training goes on and "
                      f"this stage's records go to {self.spool.dir} — run `python -m pipeline sync` once the "
                      f"store is back (the next stage run sends them too)", file=sys.stderr, flush=True)

    def _do(self, op: str, run: str | None, **args) -> None:
        """One write: to the store, or to the journal when the store is down or the run exists
        only in the journal (its order is then kept)."""
        run = self.resolve(run)
        if self.down is None and not is_local(run):
            try:
                return self._apply(op, run, args)
            except Exception as err:
                self._fail(err)
        if op == "log_artifact":
            args = {**args, "path": self.spool.keep_file(Path(args["path"]))}
        self.spool.append(op, run, args)

    def _apply(self, op: str, run: str, args: dict[str, Any]) -> None:
        if op == "log_params":
            existing = self.client.get_run(run).data.params
            items = [Param(k, v) for k, v in args["params"].items() if existing.get(k) != v]
            for i in range(0, len(items), 100):
                self.client.log_batch(run, params=items[i:i + 100])
        elif op == "log_metrics":
            self._points().send(run, self._new_points(run, args["points"]))
        elif op == "set_tags":
            self.client.log_batch(run, tags=[RunTag(k, v) for k, v in args["tags"].items()])
        elif op == "delete_tag":
            if args["key"] in self.client.get_run(run).data.tags:
                self.client.delete_tag(run, args["key"])
        elif op == "log_artifact":
            self.client.log_artifact(run, args["path"], args["artifact_path"])
        elif op == "log_dict":
            self.client.log_dict(run, args["obj"], args["path"])
        elif op == "log_text":
            self.client.log_text(run, args["text"], args["path"])
        elif op == "status":
            if args["status"] == "RUNNING":
                self.client.update_run(run, status="RUNNING")
            else:
                self.client.set_terminated(run, args["status"])
        elif op == "metrics_file":
            points = [p for line in Path(args["file"]).read_text().splitlines() if line for p in json.loads(line)]
            last = last_steps(self.client, run)
            self._points().send(run, [p for p in points if p[3] > last.get(p[0], -1)])
        elif op == "log_model":
            self._log_model_files(run, args)
        else:
            raise ValueError(f"unknown journal operation {op!r}")

    def _new_points(self, run: str, points: list) -> list:
        """The points the run does not hold yet: a stage run again on the same inputs (``dvc repro
        --force``, a journal replayed after a crash) adds no second point with the same key, step
        and value; a different value at the same step is a new point (the newest is shown)."""
        held = self.client.get_run(run).data.metrics
        keys = {p[0] for p in points if p[0] in held}
        if not keys:
            return points

        def same(key, value, step):
            return key, step, "nan" if math.isnan(value) else value
        seen = {same(m.key, m.value, m.step) for k in keys for m in self.client.get_metric_history(run, k)}
        return [p for p in points if same(p[0], p[1], p[3]) not in seen]

    def _points(self) -> Points:
        if self._writer is None:
            self._writer = Points(self.client, self.uri)
        return self._writer

    def resolve(self, run_id: str | None) -> str | None:
        """A run id as the store knows it (local ids of journals already sent are mapped)."""
        return self.ids.get(run_id, run_id) if run_id else run_id

    def sync(self) -> int:
        """Send every earlier journal under spool/ to the store, oldest first, each operation
        once (progress is kept after each); returns how many operations were sent."""
        root, sent = self.root / SPOOL_DIR, 0
        if not spool.pending(root):
            return 0
        from filelock import FileLock
        with FileLock(str(root / ".sync.lock"), timeout=600):
            for folder in spool.pending(root):
                if folder == self.spool.dir:
                    continue
                for index, entry in spool.entries(folder):
                    self._replay(folder, entry)
                    spool.mark_done(folder, index)
                    sent += 1
                spool.finish(folder)
        return sent

    def _replay(self, folder: Path, entry: dict[str, Any]) -> None:
        op, run, args = entry["op"], self.resolve(entry["run"]), entry["args"]
        if op == "create_run":
            if args["local"] not in self.ids:
                exp = self._experiment(args["experiment"])
                tags = args["tags"] | ({"mlflow.parentRunId": self.resolve(args["parent"])} if args["parent"] else {})
                self._map(args["local"], self.client.create_run(exp, run_name=args["name"], tags=tags).info.run_id)
            return
        if op == "sweep_parent":
            if args["local"] not in self.ids:
                self.experiment_id = self._experiment(args["experiment"])
                self._map(args["local"], self._sweep_parent_online(args["key"], args["manifest"], args["params"],
                                                                  args["tags"], args["given"]))
            return
        if op in ("log_artifact", "metrics_file") or op == "log_model":
            args = {k: str(folder / v) if k in ("path", "file", "state", "example") else v for k, v in args.items()}
        self._apply(op, run, args)

    def _map(self, local: str, real: str) -> None:
        self.ids[local] = real
        spool.save_ids(self.root / SPOOL_DIR, self.ids)

    # ------------------------------------------------------------ experiments and sweeps

    def _experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            location = (self.root / "mlartifacts").as_uri() if is_local_store(self.uri) else None
            try:
                self.client.create_experiment(name, artifact_location=location)
            except Exception:  # created by a concurrent process in the meantime
                pass
            exp = self.client.get_experiment_by_name(name)
        self._ui_tags(exp)
        return exp.experiment_id

    def _ui_tags(self, exp) -> None:
        """What MLflow's UI reads to open this experiment on the comparison: a model-training
        experiment (not its GenAI layout), and a shared view (``?viewStateShareKey=batch-sizes``)
        that groups runs by batch size, shows them all, and charts loss against step = samples seen."""
        self._exp_tags[exp.experiment_id] = dict(exp.tags)
        self._set_experiment_tags(exp.experiment_id, {
            "mlflow.experimentKind": "custom_model_development",
            f"mlflow.sharedViewState.{VIEW_KEY}": json.dumps(SHARED_VIEW, sort_keys=True)})

    def _set_experiment_tags(self, experiment_id: str, wanted: dict[str, str]) -> None:
        """Writes the tags of ``wanted`` that the experiment (its tags as read when this tracker
        opened it) lacks or holds with another value."""
        held = self._exp_tags.setdefault(experiment_id, {})
        for key, value in wanted.items():
            if held.get(key) != value:
                _once_more_on_conflict(lambda: self.client.set_experiment_tag(experiment_id, key, value))
                held[key] = value

    def ui_url(self, base: str = "http://127.0.0.1:5000", sweep_key: str | None = None) -> str:
        """The experiment in MLflow's UI: its model-training layout (3.17 opens the GenAI one
        unless told), the chart view, and the shared batch-size view of the sweep ``sweep_key``
        (its runs alone), or of every run in the experiment."""
        view = sweep_view(sweep_key)[0] if sweep_key else VIEW_KEY
        return (f"{base}/#/experiments/{self.experiment_id}/runs?workflowType=machine_learning"
                f"&compareRunsMode=CHART&viewStateShareKey={view}")

    def _sweep_view_tag(self, key: str) -> None:
        """The sweep's own shared view: the batch-size view filtered to the sweep's runs, so that
        runs of another sweep (another learning rate, another list) never join its groups."""
        view, state = sweep_view(key)
        self._set_experiment_tags(self.experiment_id,
                                  {f"mlflow.sharedViewState.{view}": json.dumps(state, sort_keys=True)})

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
        params = {k: _text(v) for k, v in (self.params.flat() | data_params(manifest)).items()}
        tags = {TAG_ROLE: "sweep", TAG_SWEEP: key, **self.run_tags()}
        if self.down is None:
            try:
                return self._sweep_parent_online(key, manifest, params, tags, self.given_parent)
            except Exception as err:
                self._fail(err)
        local = new_local_id()
        self.spool.append("sweep_parent", None, {"local": local, "key": key, "manifest": manifest, "params": params,
                                                 "tags": tags, "given": self.given_parent,
                                                 "experiment": self.experiment_name})
        return local

    def _sweep_parent_online(self, key, manifest, params, tags, given) -> str:
        with self._lock():
            self._sweep_view_tag(key)
            run_id = self.find_sweep(key)
            if run_id is not None:
                if given and given != run_id:
                    self.set_tags(given, {TAG_LAUNCH: run_id, TAG_ROLE: "launch"})
                return run_id
            name = f"sweep-{key[:8]}"
            if given:
                run_id = given
                self.set_tags(run_id, tags | {"mlflow.runName": name})
            else:
                run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
            self._apply("log_params", run_id, {"params": params})
            self.client.log_dict(run_id, manifest, "data/manifest.json")
            _once_more_on_conflict(lambda: self.client.log_inputs(run_id, datasets=[_dataset_input(manifest)]))
            if not given:
                self.client.set_terminated(run_id, "FINISHED")
            return run_id

    def retire_others(self, parent_id: str, batch_size: int, seed: int, keep: str) -> list[str]:
        """A deliberate retrain replaces the run of the same (sweep, batch size, seed): the older
        ones are deleted (restorable from MLflow's trash), never counted side by side."""
        parent_id, keep = self.resolve(parent_id), self.resolve(keep)
        if self.down is not None or is_local(parent_id) or is_local(keep):
            return []
        runs = self.client.search_runs(
            [self.experiment_id], max_results=100,
            filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`{TAG_BATCH}` = '{batch_size}' "
                          f"and tags.`{TAG_SEED}` = '{seed}' and tags.`{TAG_ROLE}` = 'train'")
        retired = [r.info.run_id for r in runs if r.info.run_id != keep]
        for run_id in retired:
            self.set_tags(run_id, {"batchlab.superseded_by": keep})
            self.client.delete_run(run_id)
        return retired

    def running_runs(self, sweep_key: str, batch_size: int, seed: int) -> list:
        """Training runs of this identity still marked RUNNING (their owners' tags say who)."""
        if self.down is not None:
            return []
        return self.client.search_runs(
            [self.experiment_id], max_results=100,
            filter_string=f"tags.`{TAG_SWEEP}` = '{sweep_key}' and tags.`{TAG_BATCH}` = '{batch_size}' "
                          f"and tags.`{TAG_SEED}` = '{seed}' and tags.`{TAG_ROLE}` = 'train' "
                          f"and attributes.status = 'RUNNING'")

    # ------------------------------------------------------------ writes

    def get_run(self, run_id: str):
        return self.client.get_run(self.resolve(run_id))

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Log params, skipping those the run already holds with the same value."""
        self._do("log_params", run_id, params={k: _text(v) for k, v in params.items()})

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        self._do("log_metrics", run_id, points=[[k, float(v), now, step] for k, v in metrics.items() if v is not None])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        self._do("set_tags", run_id, tags={k: _text(v) for k, v in tags.items()})

    def delete_tag(self, run_id: str, key: str) -> None:
        self._do("delete_tag", run_id, key=key)

    def log_artifacts(self, run_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
        for path in paths:
            self._do("log_artifact", run_id, path=str(path), artifact_path=artifact_path)

    def log_dict(self, run_id: str, obj: Any, path: str) -> None:
        self._do("log_dict", run_id, obj=obj, path=path)

    def log_text(self, run_id: str, text: str, path: str) -> None:
        self._do("log_text", run_id, text=text, path=path)

    def log_metrics_file(self, run_id: str, path: Path) -> None:
        """Metric points a sink could not send (lines of [key, value, ms, step] lists)."""
        kept = self.spool.keep_file(path) if path.parent != self.spool.dir else str(path.relative_to(self.spool.dir))
        self.spool.append("metrics_file", self.resolve(run_id), {"file": kept})

    def read_artifact(self, run_id: str, path: str) -> str:
        with tempfile.TemporaryDirectory() as tmp:
            return Path(self.client.download_artifacts(self.resolve(run_id), path, tmp)).read_text()

    def log_model(self, run_id: str, model, example, spec: dict[str, Any]) -> None:
        """As a LoggedModel in the pt2 (torch.export) format: loading it runs no pickled code.
        ``spec`` rebuilds the model when it is sent later from the journal."""
        run_id = self.resolve(run_id)
        if self.down is None and not is_local(run_id):
            try:
                return _log_model(run_id, model, example)
            except Exception as err:
                self._fail(err)
        import torch
        self.spool.dir.mkdir(parents=True, exist_ok=True)
        state, ex = self.spool.dir / f"model-{run_id}.pt", self.spool.dir / f"example-{run_id}.pt"
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, state)
        torch.save(example.detach().cpu(), ex)
        self.spool.append("log_model", run_id, {"state": state.name, "example": ex.name, "spec": spec})

    def _log_model_files(self, run_id: str, args: dict[str, Any]) -> None:
        import torch
        from .config import ModelParams
        from .models import build_model
        spec = args["spec"]
        model = build_model(ModelParams(**spec["model"]), spec["n_in"], spec["n_out"])
        model.load_state_dict(torch.load(args["state"], weights_only=True))
        _log_model(run_id, model, torch.load(args["example"], weights_only=True))

    # ------------------------------------------------------------ runs

    def create_run(self, name: str, tags: dict[str, str], parent_id: str | None = None) -> str:
        """A run made and ended by the caller (``finish``)."""
        parent_id = self.resolve(parent_id)
        if self.down is None and not is_local(parent_id):
            try:
                tags = tags | ({"mlflow.parentRunId": parent_id} if parent_id else {})
                return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
            except Exception as err:
                self._fail(err)
        local = new_local_id()
        self.spool.append("create_run", None, {"local": local, "name": name, "tags": tags, "parent": parent_id,
                                               "experiment": self.experiment_name})
        return local

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self._do("status", run_id, status=status)

    @contextmanager
    def run(self, *, name: str, parent_id: str | None, tags: dict[str, str],
            run_id: str | None = None) -> Iterator[str]:
        """A run that ends FINISHED, KILLED (signal) or FAILED (exception), with the reason as a
        tag, and says who owns it while it runs. ``run_id`` reopens an interrupted run to resume
        it: the interruption's end reason goes."""
        owner = owner_tags()
        if run_id:
            self.set_tags(run_id, {"batchlab.resumed": "true", **owner})
            self.delete_tag(run_id, TAG_END)
            self.finish(run_id, "RUNNING")
        else:
            run_id = self.create_run(name, tags | owner, parent_id)
        try:
            yield run_id
        except Interrupted as exc:
            self._end(run_id, "KILLED", str(exc))
            raise
        except KeyboardInterrupt:
            self._end(run_id, "KILLED", "stopped by SIGINT")
            raise
        except BaseException as exc:
            self._end(run_id, "FAILED", f"{type(exc).__name__}: {exc}"[:4000])
            raise
        else:
            self.finish(run_id, "FINISHED")

    def _end(self, run_id: str, status: str, reason: str) -> None:
        self.set_tags(run_id, {TAG_END: reason})
        self.finish(run_id, status)


def _log_model(run_id: str, model, example) -> None:
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    model = model.cpu().eval()
    example = example.cpu()
    with torch.no_grad():
        output = model(example)
    with mlflow.start_run(run_id=run_id) as run:
        # Named as its run (bs64-s0), not "model": the experiment's Models tab lists every model
        # of the sweep, and twelve models all called "model" told a user nothing.
        mlflow.pytorch.log_model(
            model, name=run.info.run_name or "model", signature=infer_signature(example.numpy(), output.numpy()),
            input_example=example.numpy(), serialization_format="pt2",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])


def owner_tags() -> dict[str, str]:
    """Who runs this process: enough to tell a live owner from a dead one later."""
    import socket
    return {f"{TAG_OWNER}.host": socket.gethostname(), f"{TAG_OWNER}.pid": str(os.getpid()),
            f"{TAG_OWNER}.start": process_start(os.getpid())}


def process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot ('' where unknown): with the pid it
    names one process, even after the pid is reused."""
    fields = proc_stat(pid)
    return fields[19] if len(fields) > 19 else ""


def owner_alive(tags: dict[str, str]) -> bool:
    import socket
    host, pid = tags.get(f"{TAG_OWNER}.host"), tags.get(f"{TAG_OWNER}.pid", "")
    if host != socket.gethostname() or not pid.isdigit():
        return host is not None and host != socket.gethostname()  # another machine's: assume alive
    return process_start(int(pid)) == tags.get(f"{TAG_OWNER}.start") != ""


def _once_more_on_conflict(write) -> None:
    """An idempotent write that a stage started at the same moment may race (an experiment tag, a
    data set row: unique in the store, and a server has no lock of ours): the second try finds the
    other's row and completes."""
    try:
        write()
    except Exception as err:
        if store_down(err) or not any(w in str(err).lower() for w in ("unique", "integrityerror")):
            raise
        write()


def _dataset_input(manifest: dict[str, Any]):
    """The prepared data set as an MLflow dataset input (name, digest = data hash, splits' sizes)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    source = manifest.get("source", {})
    profile = {name: split["n"] for name, split in manifest["splits"].items()}
    return DatasetInput(Dataset(name=source.get("name", "data"), digest=manifest["data_hash"][:16],
                                source_type="local", source=json.dumps(source, sort_keys=True),
                                profile=json.dumps(profile)),
                        tags=[InputTag("mlflow.data.context", "training")])


def data_params(manifest: dict[str, Any]) -> dict[str, Any]:
    """The data set's figures: they describe the sweep, they are not results (params, not metrics)."""
    stats = {f"data.n_{name}": split["n"] for name, split in manifest["splits"].items()}
    return stats | {"data.hash": manifest["data_hash"], "data.n_features": manifest["n_features"],
                    "data.n_classes": manifest["n_classes"], "data.mean": manifest["normalisation"]["mean"],
                    "data.std": manifest["normalisation"]["std"]}


def sweep_view(key: str) -> tuple[str, dict[str, Any]]:
    """The share key and UI state of sweep ``key``'s view: SHARED_VIEW for its runs alone."""
    return f"sweep-{key}", SHARED_VIEW | {"searchFilter": f"tags.`{TAG_SWEEP}` = '{key}'"}


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


class MlflowSink:
    """Receives step chunks from the loop; logs window means from a separate process.

    The window is ``ceil(total_steps / max_points)`` (1 with ``full_history``), so the MLflow
    history of every metric holds at most ``max_points`` points, each at step = samples seen.
    Writing to the store takes milliseconds a transaction, so the training process only queues
    the points; ``metric_logger`` writes them (rows into a SQL store, ``log_batch`` elsewhere)
    from its own process (start_new_session: a terminal's Ctrl-C reaches the trainer alone, which
    flushes and then closes the logger). When the store is down, or goes down, the points go to
    the stage's journal instead.
    """

    def __init__(self, tracker: Tracker, run_id: str, total_steps: int, max_points: int,
                 full_history: bool, start_time: float, window: int | None = None, another: bool = False):
        self.tracker, self.run_id = tracker, tracker.resolve(run_id)
        self.window = window or (1 if full_history else max(1, math.ceil(total_steps / max_points)))
        self._prev_time = start_time
        self._acc: dict[str, Any] = self._empty()
        self._pending: list[tuple] = []
        self._sent_at = time.monotonic()
        self.points = 0
        self.spool_file = tracker.spool.dir / f"metrics-{self.run_id}.jsonl"
        self._proc = None
        # ``another``: a run follows this one in the stage; this run's logger then serves it.
        self._keep = another
        if tracker.down is None and not is_local(self.run_id):
            # The stage's logger (started ahead, so its imports overlapped the stage's start, or
            # kept from the previous run), else one started now, is told its run in a line.
            self._proc = metric_logger.take(tracker.uri) or metric_logger.spawn(tracker.uri)
            self._proc.stdin.write(json.dumps([self.run_id, str(self.spool_file)]) + "\n")
            self._proc.stdin.flush()
        self._ready = threading.Event()
        if self._proc is None:
            self._ready.set()
        # A pipe write blocks when the logger lags; a feeder thread takes that wait off the loop.
        self._queue: queue.Queue = queue.Queue()
        self._ended = False
        self._feeder = threading.Thread(target=self._feed, name="metric-feeder", daemon=True)
        self._feeder.start()

    def ready(self) -> None:
        """Wait for the logger's imports and connection (started in __init__, they overlap the
        trainer's own start-up); they would otherwise compete with the first steps for the CPU."""
        if self._ready.is_set():
            return
        answer = self._proc.stdout.readline().strip()
        if answer != "ready":  # it could not reach the store: the points go to the journal
            self._proc.wait()
            self._proc = None
            error = json.loads(answer).get("error") if answer.startswith("{") else "no answer"
            self.tracker._fail(StoreDown(f"the metric logger could not reach the store: {error}"))
        self._ready.set()

    def _feed(self) -> None:
        while (item := self._queue.get()) is not None:
            self._ready.wait()
            try:
                if self._proc is not None:
                    self._proc.stdin.write(item)
                    self._proc.stdin.flush()
                    continue
            except OSError:
                pass  # the logger died; close() reports it, and later points go to the journal
            self.spool_file.parent.mkdir(parents=True, exist_ok=True)
            with self.spool_file.open("a") as fh:
                fh.write(item)
        if self._proc is not None:
            try:
                if self._keep:
                    self._proc.stdin.write("null\n")  # this run's end: the logger answers and waits
                    self._proc.stdin.flush()
                else:
                    self._proc.stdin.close()
            except OSError:
                pass

    @staticmethod
    def _empty() -> dict[str, Any]:
        return {"n": 0, "loss": 0.0, "correct": 0, "batch": 0}

    def resume_from(self, hist, resumed_step: int) -> None:
        """After a resume, offer every point the checkpoint's history holds again: what the dead
        process had not handed over yet (its last buffer) is sent, what the store has is skipped
        by the logger, and the window the interruption left partial is refilled."""
        if hist.time:  # the first step's start, as near as the record tells
            self._prev_time = hist.time[0] - (hist.time[-1] - hist.time[0]) / max(len(hist.time) - 1, 1)
        self.steps(hist.after(0))
        for e in hist.evals:
            self.point("val/loss", e["val_loss"], e["samples"])
            if not math.isnan(e["val_acc"]):
                self.point("val/acc", e["val_acc"], e["samples"])
        for samples, value in hist.noise:
            self.point("noise/b_simple", value, samples)

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
        self.end(complete)
        self.wait()

    def end(self, complete: bool) -> None:
        """Hand over what is buffered and the end of input, without waiting: the logger drains
        while the trainer writes its outputs. ``complete``: training ended, so the last partial
        window is logged too; after an interruption it is kept for the resumed run."""
        if self._ended:
            return
        self._ended = True
        self._keep = self._keep and complete  # an interrupted stage ends here: its logger too
        last = self._acc.get("last")
        if complete and self._acc["n"] and last:
            step, samples, lr, t, has_correct = last
            self._add(self._window_metrics(self._acc, step, samples, lr, t, has_correct))
            self._acc = self._empty()
        self._add([], force=True)
        self._queue.put(None)

    def wait(self) -> None:
        """Wait for the logger to send everything; what it could not send goes to the journal."""
        if self._feeder is None:
            return
        self.ready()
        self._feeder.join()
        self._feeder = None
        if self._proc is not None:
            result = metric_logger.read_answer(self._proc, "metric logger", exits=not self._keep)
            if result.get("error"):
                self.tracker._fail(StoreDown(result["error"]))
            if self._keep and not result.get("error"):
                metric_logger.give_back(self.tracker.uri, self._proc)
            elif self._keep:
                self._proc.stdin.close()
                self._proc.wait()
        if self.spool_file.is_file():
            self.tracker.log_metrics_file(self.run_id, self.spool_file)
