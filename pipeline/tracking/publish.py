"""The MLflow view of a sweep, published from its DVC outputs: the files are the record.

``publish_sweep`` reads ``outputs/`` (and the prepared data's manifest) for the current params and
sends the store what it lacks: the sweep's parent run, one run per training (found by the record
id its ``run.json`` holds), their params, every metric point, artifacts and model, the test
figures and the comparison. Each part is checked before it is sent (params held, steps held per
key, artifacts listed, logged models searched), so publishing the same outputs again changes
nothing, and publishing after a fault sends exactly what is missing. A run is set FINISHED only
once all of it is there; then a tag ``batchlab.published.<part>`` holds the digest of the files
it came from, so the next publish skips it with one search. A deleted store is rebuilt whole.

Only MLflow's public client API is used. This module and ``live`` are the only ones that import
MLflow.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

# A store that does not answer fails a request within seconds, not after MLflow's default of
# minutes of retries (a user's own settings win): every wait on it is bounded.
for _key, _value in (("MLFLOW_HTTP_REQUEST_TIMEOUT", "3"), ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"),
                     ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")):
    os.environ.setdefault(_key, _value)

from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from ..context import param_text as _text, read_json  # noqa: E402
from . import ui  # noqa: E402
from .points import by_key, scalar_points, train_points  # noqa: E402
from .store import is_local_store, tracking_uri  # noqa: E402

# The store's table creation and migrations are not news to a user: warnings and errors only
# (set after MLflow's import, which configures its loggers).
for _name in ("mlflow", "alembic"):
    logging.getLogger(_name).setLevel(logging.WARNING)

TAG_ROLE, TAG_SWEEP, TAG_RECORD = "batchlab.role", "batchlab.sweep_key", "batchlab.record"
TAG_BATCH, TAG_SEED, TAG_END = "batchlab.batch_size", "batchlab.seed", "batchlab.end_reason"
TAG_LR = "batchlab.lr"  # a run of a learning-rate grid: its rate
TAG_OWNER, PUBLISHED = "batchlab.owner", "batchlab.published."
MAX_BATCH = 1000


def one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:240]


def digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(Path(path).read_bytes() if Path(path).is_file() else b"-")
    return h.hexdigest()[:16]


class Store:
    """The store and experiment a project publishes to (``MLFLOW_TRACKING_URI``, else the
    project's ``mlflow.db``), and the parts of a run, each sent only where the run lacks it."""

    def __init__(self, root: Path, experiment: str, env: dict[str, str] | None = None):
        self.root, self.uri = root, tracking_uri(root, env)
        self._file = Path(self.uri[len("sqlite:///"):]) if self.uri.startswith("sqlite:///") else None
        # The first use of a new SQLite store creates its tables: two processes doing that at once
        # break the migration (seen with two sweeps started together), so it happens under the lock.
        with self.lock():
            self.client = MlflowClient(self.uri)
            self.experiment_id = self._experiment(experiment)
        self._inode = self._file.stat().st_ino if self._file and self._file.exists() else None

    # ------------------------------------------------------------------ store, experiment, lock
    def store_replaced(self) -> bool:
        """A SQLite file deleted or replaced since this process opened it: its connections still
        write into the old file, so nothing more is sent from here (a new process rebuilds it)."""
        if self._file is None:
            return False
        return not self._file.exists() or self._file.stat().st_ino != self._inode

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Find-or-create of runs is serialised between processes of one machine (a lock file
        beside a SQLite store, in the project for other local stores; none for a server)."""
        if self._file is not None:
            path = Path(str(self._file) + ".lock")
        elif is_local_store(self.uri):
            path = self.root / ".mlflow-publish.lock"
        else:
            yield
            return
        from filelock import FileLock
        with FileLock(str(path), timeout=120):
            yield

    def _experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            location = (self.root / "mlartifacts").as_uri() if is_local_store(self.uri) else None
            self.client.create_experiment(name, artifact_location=location)
            exp = self.client.get_experiment_by_name(name)
        self._exp_tags = dict(exp.tags)
        self.experiment_tags(ui.experiment_tags(), exp.experiment_id)
        return exp.experiment_id

    def experiment_tags(self, tags: dict[str, str], experiment_id: str | None = None) -> None:
        """Sets those of ``tags`` the experiment lacks or holds with another value."""
        for key, value in tags.items():
            if self._exp_tags.get(key) != value:
                self.client.set_experiment_tag(experiment_id or self.experiment_id, key, value)
                self._exp_tags[key] = value

    def ui_url(self, base: str, sweep_key: str | None = None) -> str:
        return ui.url(base, self.experiment_id, sweep_key)

    # ------------------------------------------------------------------ finding runs
    def running_train_runs(self) -> list:
        return self.client.search_runs([self.experiment_id], max_results=5000, filter_string=(
            f"attributes.status = 'RUNNING' and tags.`{TAG_ROLE}` = 'train'"))

    def sweep_runs(self, key: str) -> list:
        return self.client.search_runs([self.experiment_id], filter_string=f"tags.`{TAG_SWEEP}` = '{key}'",
                                       max_results=5000)

    def find_record(self, record: str):
        found = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{TAG_RECORD}` = '{record}'",
                                        max_results=10)
        return found[0] if found else None

    @staticmethod
    def parent_of(runs: list):
        parents = [r for r in runs if r.data.tags.get(TAG_ROLE) == "sweep"]
        return min(parents, key=lambda r: r.info.start_time) if parents else None

    def end_run(self, run_id: str, status: str, reason: str) -> None:
        self.client.set_tag(run_id, TAG_END, reason[:4000])
        self.client.set_terminated(run_id, status)

    # ------------------------------------------------------------------ the parts
    def _params(self, run, params: dict[str, Any]) -> None:
        held = run.data.params
        items = [Param(k, _text(v)) for k, v in params.items() if k not in held]
        for i in range(0, len(items), 100):
            self.client.log_batch(run.info.run_id, params=items[i:i + 100])

    def _metrics(self, run, points: list) -> int:
        """Sends the points whose (key, step) the run does not hold; returns how many."""
        run_id, latest, missing = run.info.run_id, run.data.metrics, []
        for key, mine in by_key(points).items():
            if key in latest:
                held = {m.step for m in self.client.get_metric_history(run_id, key)}
                mine = [p for p in mine if p[3] not in held]
            missing += mine
        for i in range(0, len(missing), MAX_BATCH):
            self.client.log_batch(run_id, metrics=[Metric(*p) for p in missing[i:i + MAX_BATCH]])
        return len(missing)

    def _artifacts(self, run_id: str, files: list[Path], path: str) -> None:
        held = {Path(f.path).name: f.file_size for f in self.client.list_artifacts(run_id, path)}
        for f in files:
            if f.is_file() and held.get(f.name) != f.stat().st_size:
                self.client.log_artifact(run_id, str(f), path)

    def _model(self, run_id: str, folder: Path, record: dict[str, Any], model) -> None:
        """The trained model as a LoggedModel in the pt2 (torch.export) format, named as its run;
        rebuilt from ``model.pt`` when publishing from files alone."""
        if self.client.search_logged_models([self.experiment_id], filter_string=f"source_run_id = '{run_id}'",
                                            max_results=1):
            return
        import mlflow
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature
        if model is None:
            model = load_model(folder, record)
        model = model.cpu().eval()
        example = torch.load(folder / "input_example.pt", weights_only=True)
        with torch.no_grad():
            output = model(example)
        mlflow.set_tracking_uri(self.uri)
        # The fluent run ends the run when left: the caller sets the final status after this.
        with mlflow.start_run(run_id=run_id):
            # The Models tab lists every sweep's models together: the sweep's short key makes the
            # name unique there. A logged model's name may not hold '.', which a grid run's rate does.
            name = f"{record['name']}-{record['sweep_key'][:8]}".replace(".", "_")
            mlflow.pytorch.log_model(model, name=name, serialization_format="pt2",
                                     signature=infer_signature(example.numpy(), output.numpy()),
                                     input_example=example.numpy(),
                                     pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])


class View(Store):
    """The batchlab layout of a sweep in the store: its parent, one run per training record."""

    def parent(self, key: str, manifest: dict, params: dict[str, Any], tags: dict[str, str],
               given: str | None = None, start_ms: int | None = None) -> str:
        """The sweep's parent run: found by its key, else the run `mlflow run` made (``given``),
        else a new one; its params, data set and manifest sent where missing."""
        with self.lock():
            found = self.parent_of(self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.`{TAG_SWEEP}` = '{key}' and tags.`{TAG_ROLE}` = 'sweep'",
                max_results=10))
            if found is not None:
                run_id = found.info.run_id
                if given and given != run_id:
                    self._point_launch(given, run_id, key)
            else:
                tags = tags | {TAG_ROLE: "sweep", TAG_SWEEP: key}
                run_id = self._adopt(given, tags, key)
                if run_id is None:  # ended at once: it is a folder of runs, FINISHED again by each publish
                    run_id = self.client.create_run(self.experiment_id, run_name=f"sweep-{key[:8]}",
                                                    tags=tags, start_time=start_ms).info.run_id
                    self.client.set_terminated(run_id, "FINISHED")
        self.experiment_tags(dict([ui.sweep_view_tag(key, bool(params.get("train.lr_grid")))]))
        run = self.client.get_run(run_id)
        if run.data.tags.get(PUBLISHED + "prepare") != manifest["data_hash"][:16]:
            self._params(run, params)
            self.client.log_dict(run_id, manifest, "data/manifest.json")
            if not run.inputs.dataset_inputs:
                self.client.log_inputs(run_id, datasets=[_dataset_input(manifest)])
            self.client.set_tag(run_id, PUBLISHED + "prepare", manifest["data_hash"][:16])
        return run_id

    def _adopt(self, given: str | None, tags: dict[str, str], key: str) -> str | None:
        """The run `mlflow run` made becomes a new sweep's parent (when it is in this experiment)."""
        if not given:
            return None
        run = self.client.get_run(given)
        if run.info.experiment_id != self.experiment_id:
            return None
        self.client.log_batch(given, tags=[RunTag(k, _text(v)) for k, v in
                                           (tags | {"mlflow.runName": f"sweep-{key[:8]}"}).items()])
        return given

    def _point_launch(self, given: str, parent: str, key: str) -> None:
        """A `mlflow run` whose sweep already had a parent (DVC found it up to date, or restored
        it): the run says where the sweep is and nests under it, so that the experiment's list
        holds sweeps only (the sweep's view shows its training runs alone)."""
        self.client.log_batch(given, tags=[RunTag(k, v) for k, v in {
            TAG_ROLE: "launch", "batchlab.sweep_parent": parent, "mlflow.parentRunId": parent,
            "mlflow.runName": f"up-to-date-sweep-{key[:8]}",
            "mlflow.note.content": f"DVC found this sweep already done: nothing trained. Its runs are under "
                                   f"sweep-{key[:8]} ({parent})."}.items()])

    def finish_parent(self, parent: str, given: str | None, end_ms: int | None = None) -> None:
        """Ends the parent at ``end_ms`` (its last training or comparison), else now."""
        if parent != given:  # `mlflow run` ends its own run
            self.client.set_terminated(parent, "FINISHED", end_time=end_ms)

    # ------------------------------------------------------------------ training runs
    def open_train_run(self, record: dict[str, Any], parent: str) -> tuple[str, dict[str, int]]:
        """The run of ``record`` (reopened when a resumed training had one), RUNNING and owned by
        this process; and the highest step it holds per metric key."""
        with self.lock():
            run = self.find_record(record["record"])
            if run is None:
                run_id = self.client.create_run(self.experiment_id, run_name=record["name"],
                                                start_time=int(record["created"] * 1000),
                                                tags=_train_tags(record, parent) | owner_tags()).info.run_id
                return run_id, {}
        run_id = run.info.run_id
        # The record's tags as they are now (a Ray task resumed on another node), and its owner.
        now = record["tags"] | owner_tags() | {"batchlab.resumed": "true"}
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in now.items()])
        if TAG_END in run.data.tags:
            self.client.delete_tag(run_id, TAG_END)
        self.client.update_run(run_id, status="RUNNING")
        held = {k: max((m.step for m in self.client.get_metric_history(run_id, k)), default=-1)
                for k in run.data.metrics}
        return run_id, held

    def publish_train(self, folder: Path, parent: str, run=None, model=None) -> str:
        """Everything of one training's output folder into its run, then FINISHED."""
        record = read_json(folder / "run.json")
        stamp = digest(folder / "summary.json", folder / "run.json")
        if run is None:
            run = self.find_record(record["record"])
        if run is None:
            with self.lock():
                run = self.find_record(record["record"]) or self.client.get_run(self.client.create_run(
                    self.experiment_id, run_name=record["name"], start_time=int(record["created"] * 1000),
                    tags=_train_tags(record, parent)).info.run_id)
        run_id = run.info.run_id
        if run.data.tags.get(PUBLISHED + "train") == stamp and run.info.status == "FINISHED":
            return run_id
        self._params(run, record["params"])
        summary = read_json(folder / "summary.json")
        points = train_points(folder, record["window"], record["steps_t0"])
        points += scalar_points(final_metrics(summary), summary["samples"], int(record["end_time"] * 1000))
        self._metrics(run, points)
        self._artifacts(run_id, [folder / n for n in TRAIN_FILES], "outputs")
        self.client.log_artifact(run_id, str(folder / "params.json"))
        self._model(run_id, folder, record, model)
        self.client.set_tag(run_id, PUBLISHED + "train", stamp)
        self.client.set_terminated(run_id, "FINISHED", end_time=int(record["end_time"] * 1000))
        self._retire_others(run_id, record)
        return run_id

    def _retire_others(self, keep: str, record: dict[str, Any]) -> None:
        """A deliberate retrain (``dvc repro --force``), or a training started again because its
        trainer died before its first checkpoint, replaces the run of the same (sweep, batch size,
        seed): the older one goes to MLflow's trash, never counted side by side."""
        for run in self.client.search_runs([self.experiment_id], max_results=100, filter_string=(
                f"tags.`{TAG_SWEEP}` = '{record['sweep_key']}' and tags.`{TAG_BATCH}` = '{record['batch_size']}' "
                f"and tags.`{TAG_SEED}` = '{record['seed']}' and tags.`{TAG_ROLE}` = 'train'"
                + (f" and tags.`{TAG_LR}` = '{record['lr']!r}'" if record.get("lr") is not None else ""))):
            if run.info.run_id != keep and (run.info.status != "RUNNING" or not owner_alive(run.data.tags)):
                self.client.set_tag(run.info.run_id, "batchlab.superseded_by", keep)
                self.client.delete_run(run.info.run_id)

    def publish_eval(self, folder: Path, run) -> None:
        metrics = read_json(folder / "metrics.json")
        stamp = digest(folder / "metrics.json")
        if run.data.tags.get(PUBLISHED + "evaluate") == stamp:
            return
        named = {k: v for k, v in metrics.items() if k not in ("batch_size", "seed", "lr", "train_record")}
        self._metrics(run, scalar_points(named, 0, int(os.path.getmtime(folder / "metrics.json") * 1000)))
        self._artifacts(run.info.run_id, [folder / n for n in EVAL_FILES], "evaluate")
        self.client.set_tag(run.info.run_id, PUBLISHED + "evaluate", stamp)

    def publish_compare(self, folder: Path, parent: str) -> None:
        summary = read_json(folder / "summary.json")
        run = self.client.get_run(parent)
        stamp = digest(folder / "summary.json")
        if run.data.tags.get(PUBLISHED + "compare") == stamp:
            return
        ms = int(os.path.getmtime(folder / "summary.json") * 1000)
        points = scalar_points({f"sweep/{k}": v for k, v in summary["metrics"].items()}, 0, ms)
        for row in summary["rows"]:
            points += scalar_points({f"by_batch_size/{k}": row[k] for k in summary["figures"] if k in row},
                                    row["batch_size"], ms)
            points += scalar_points({f"by_batch_size_ci/{k}": row[f"{k}_ci"] for k in summary["figures"]
                                     if f"{k}_ci" in row}, row["batch_size"], ms)
        self._metrics(run, points)
        tags = [RunTag(k, _text(v)) for k, v in summary["tags"].items()]
        if "batchlab.recommendation" in summary["tags"]:  # the run page's description: the answer
            tags.append(RunTag("mlflow.note.content", f"{summary['tags']['batchlab.recommendation']}\n\n"
                                                      "The sweep's report: `compare/report.html` under Artifacts."))
        self.client.log_batch(parent, tags=tags)
        self._artifacts(parent, [folder / n for n in summary["files"]], "compare")
        self.client.set_tag(parent, PUBLISHED + "compare", stamp)



TRAIN_FILES = ("steps.csv", "evals.csv", "noise.csv", "summary.json", "model.pt")
EVAL_FILES = ("metrics.json", "report.json", "predictions.csv", "evaluation.png")
# Summary keys that are settings or bookkeeping, not results: params and tags hold them.
_NOT_METRICS = ("batch_size", "seed", "lr", "epochs", "lr_effective", "world_size", "resumed_from_step")


def final_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The summary as MLflow metrics, named as in summary.json (``final_val_acc``, ``throughput``).
    Single values carry no prefix so that MLflow's run page, which orders its chart sections by
    prefix and puts unprefixed metrics last, opens on the curves (``train/``, ``val/``)."""
    return {k: float(v) for k, v in summary.items()
            if k not in _NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def load_model(folder: Path, record: dict[str, Any]):
    import torch
    from ..config import parse_params
    from ..core.models import build_model
    params = parse_params(read_json(folder / "params.json"))
    model = build_model(params.model, record.get("sample_shape") or record["n_in"], record["n_out"])
    model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    return model


def _train_tags(record: dict[str, Any], parent: str) -> dict[str, str]:
    return record["tags"] | {"mlflow.parentRunId": parent, TAG_RECORD: record["record"], TAG_ROLE: "train",
                             TAG_SWEEP: record["sweep_key"], TAG_BATCH: str(record["batch_size"]),
                             TAG_SEED: str(record["seed"]), "mlflow.runColor": ui.batch_size_colour(record["batch_size"])} \
        | ({} if record.get("lr") is None else {TAG_LR: repr(record["lr"])})


def owner_tags() -> dict[str, str]:
    """Who trains the run now: enough to tell a live owner from a dead one later."""
    from ..core.signals import proc_stat
    fields = proc_stat(os.getpid())
    return {f"{TAG_OWNER}.host": socket.gethostname(), f"{TAG_OWNER}.pid": str(os.getpid()),
            f"{TAG_OWNER}.start": fields[19] if len(fields) > 19 else ""}


def owner_alive(tags: dict[str, str]) -> bool:
    from ..core.signals import proc_stat
    host, pid = tags.get(f"{TAG_OWNER}.host"), tags.get(f"{TAG_OWNER}.pid", "")
    if host != socket.gethostname() or not pid.isdigit():
        return host is not None and host != socket.gethostname()  # another machine's: assume alive
    fields = proc_stat(int(pid))
    return len(fields) > 19 and fields[19] == tags.get(f"{TAG_OWNER}.start")


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


def warn(uri: str, what: str, err: BaseException | str) -> None:
    """One line: what the store did not take, and that ``sync`` will send it. (BATCHLAB_DEBUG=1
    raises instead, with the traceback: a bug here would otherwise read as a store outage.)"""
    if isinstance(err, BaseException) and os.environ.get("BATCHLAB_DEBUG"):
        raise err
    text = err if isinstance(err, str) else one_line(err)
    print(f"warning: tracking store {uri} did not take {what} ({text}); the outputs are complete, "
          f"`python -m pipeline sync` publishes them once it answers", file=sys.stderr, flush=True)


def read_artifact(client: MlflowClient, run_id: str, path: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        return Path(client.download_artifacts(run_id, path, tmp)).read_text()
