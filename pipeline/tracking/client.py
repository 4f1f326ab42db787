"""The project's MLflow store, through MLflow's public client: which store and experiment, the lock
that serialises find-or-create between processes, finding runs, and the parts of a run (params,
metric points, artifacts, the model), each sent only where the run lacks it.

Only MLflow's public client API is used, here and in the rest of ``pipeline.tracking``: the only
package that imports MLflow.
"""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

# A store that does not answer fails a request within seconds, not after MLflow's default of
# minutes of retries (a user's own settings win): every wait on it is bounded. A server that is
# gone refuses the connection at once, whatever the bound; the bound is for one that is there
# but slow, and a healthy server on a loaded machine can take several seconds to answer a
# request (docs/scaling.md), so it is 15 s, not less.
for _key, _value in (("MLFLOW_HTTP_REQUEST_TIMEOUT", "15"), ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"),
                     ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")):
    os.environ.setdefault(_key, _value)

from mlflow.entities import LoggedModelStatus, Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from .. import mlflow_ui as ui  # noqa: E402
from ..context import param_text as _text  # noqa: E402
from .points import by_key  # noqa: E402
from .uri import is_local_store, project_root, tracking_uri, workspace  # noqa: E402

# The store's table creation and migrations are not news to a user: warnings and errors only
# (set after MLflow's import, which configures its loggers).
for _name in ("mlflow", "alembic"):
    logging.getLogger(_name).setLevel(logging.WARNING)
# A database error is logged by MLflow's store with the whole SQLAlchemy traceback, then raised:
# the caller's one line (``warn``) says it. BATCHLAB_DEBUG=1 shows the traceback.
if not os.environ.get("BATCHLAB_DEBUG"):
    for _name in ("mlflow.store.db.utils", "sqlalchemy"):
        logging.getLogger(_name).setLevel(logging.CRITICAL)

TAG_ROLE, TAG_SWEEP, TAG_RECORD = "batchlab.role", "batchlab.sweep_key", "batchlab.record"
TAG_BATCH, TAG_SEED, TAG_END = "batchlab.batch_size", "batchlab.seed", "batchlab.end_reason"
TAG_LR = "batchlab.lr"  # a run of a learning-rate grid: its rate
TAG_OWNER, PUBLISHED = "batchlab.owner", "batchlab.published."
TAG_WORKSPACE, TAG_WORKSPACE_NAME = "batchlab.workspace", "batchlab.workspace_name"
MAX_BATCH = 1000


def one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:240]


def digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(Path(path).read_bytes() if Path(path).is_file() else b"-")
    return h.hexdigest()[:16]


class TrackingClient:
    """The store and experiment a project publishes to (``MLFLOW_TRACKING_URI``, else the
    project's ``mlflow.db``), through MLflow's public client; and the parts of a run, each sent
    only where the run lacks it."""

    def __init__(self, root: Path, experiment: str, env: dict[str, str] | None = None):
        self.root, self.uri = root, tracking_uri(root, env)
        self.workspace, self.workspace_name = workspace(root, env)
        self._file = Path(self.uri[len("sqlite:///"):]) if self.uri.startswith("sqlite:///") else None
        # The first use of a new SQLite store creates its tables: two processes doing that at once
        # break the migration, so it happens under the lock.
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
            from mlflow.exceptions import MlflowException
            location = (self.root / "mlartifacts").as_uri() if is_local_store(self.uri) else None
            try:
                self.client.create_experiment(name, artifact_location=location)
            except MlflowException as err:  # another workspace made it first (one server, no lock)
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
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
        return ui.url(base, self.experiment_id, sweep_key and (sweep_key, self.workspace))

    def own(self) -> dict[str, str]:
        """The tags that say which workspace a run came from."""
        return {TAG_WORKSPACE: self.workspace, TAG_WORKSPACE_NAME: self.workspace_name}

    # ------------------------------------------------------------------ finding runs
    def running_train_runs(self) -> list:
        return self.client.search_runs([self.experiment_id], max_results=5000, filter_string=(
            f"attributes.status = 'RUNNING' and tags.`{TAG_ROLE}` = 'train' "
            f"and tags.`{TAG_WORKSPACE}` = '{self.workspace}'"))

    def sweep_runs(self, key: str) -> list:
        return self.client.search_runs([self.experiment_id], filter_string=f"tags.`{TAG_SWEEP}` = '{key}'",
                                       max_results=5000)

    def find_record(self, record_id: str):
        found = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{TAG_RECORD}` = '{record_id}'",
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

    def _model(self, run_id: str, folder: Path, identity: dict[str, Any], model) -> None:
        """The trained model as a LoggedModel in the pt2 (torch.export) format, named as its run;
        ``model`` is the module, or a function that rebuilds it from the training's folder."""
        if self.model_ready(run_id):
            return
        # A model of this run that is not READY is what an interrupted upload left (the server or
        # its database lost mid-way): it has no files and cannot load. It goes, and the model is
        # sent again.
        for stale in self._models(run_id):
            self.client.delete_logged_model(stale.model_id)
        import mlflow
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature
        if callable(model) and not isinstance(model, torch.nn.Module):
            model = model(folder)
        model = model.cpu().eval()
        example = torch.load(folder / "input_example.pt", weights_only=True)
        with torch.no_grad():
            output = model(example)
        mlflow.set_tracking_uri(self.uri)
        # The fluent run ends the run when left: the caller sets the final status after this.
        import warnings
        with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
            # torch.export's packaging warns for each group of weights that share one storage (18
            # lines were reported for the CIFAR example's residual network): a library's note to
            # itself, not something the user can act on. The model is checked READY below.
            warnings.filterwarnings("ignore", message="No complete tensor found in the group")
            # The Models tab lists every sweep's models together: the sweep's short key makes the
            # name unique there. A logged model's name may not hold '.', which a grid run's rate does.
            name = f"{identity['name']}-{identity['sweep_key'][:8]}".replace(".", "_")
            info = mlflow.pytorch.log_model(model, name=name, serialization_format="pt2",
                                            signature=infer_signature(example.numpy(), output.numpy()),
                                            input_example=example.numpy(),
                                            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
        # Verified by its state, not taken on trust: the run is marked published only after this.
        status = self.client.get_logged_model(info.model_id).status
        if status != LoggedModelStatus.READY:
            raise RuntimeError(f"the model of run {run_id} is {status} after its upload, not READY")

    def _models(self, run_id: str) -> list:
        return self.client.search_logged_models([self.experiment_id], filter_string=f"source_run_id = '{run_id}'",
                                                max_results=100)

    def model_ready(self, run_id: str) -> bool:
        """The run holds a LoggedModel in state READY (its files uploaded and finalized)."""
        return any(m.status == LoggedModelStatus.READY for m in self._models(run_id))


def owner_tags() -> dict[str, str]:
    """Who trains the run now: enough to tell a live owner from a dead one later."""
    from ..procs import proc_stat
    fields = proc_stat(os.getpid())
    return {f"{TAG_OWNER}.host": socket.gethostname(), f"{TAG_OWNER}.pid": str(os.getpid()),
            f"{TAG_OWNER}.start": fields[19] if len(fields) > 19 else ""}


def owner_alive(tags: dict[str, str]) -> bool:
    from ..procs import proc_stat
    host, pid = tags.get(f"{TAG_OWNER}.host"), tags.get(f"{TAG_OWNER}.pid", "")
    if host != socket.gethostname() or not pid.isdigit():
        return host is not None and host != socket.gethostname()  # another machine's: assume alive
    fields = proc_stat(int(pid))
    return len(fields) > 19 and fields[19] == tags.get(f"{TAG_OWNER}.start")


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


def experiment_name(experiment_id: str) -> str | None:
    """The name of an experiment of the store ``mlflow run`` names (MLFLOW_TRACKING_URI)."""
    try:
        return MlflowClient(tracking_uri(project_root())).get_experiment(experiment_id).name
    except Exception:
        return None


def mark_refused(run_id: str, note: str) -> None:
    """The run `mlflow run` made for a launch refused before any work says so: its name, role and
    note give the reason (MLflow ends it FAILED). It cannot go to the trash from here: MLflow's CLI
    sets the run's status after the entry point returns, and fails on a deleted run."""
    try:
        MlflowClient(tracking_uri(project_root())).log_batch(run_id, tags=[RunTag(k, v) for k, v in {
            "mlflow.runName": "refused-launch", "batchlab.role": "refused", "mlflow.note.content": note}.items()])
    except Exception:  # best effort: the refusal itself is the answer
        pass
