"""What the stages ask of MLflow: open the view, follow one training live, publish the sweep.

Every call here is best effort: a store that fails or does not answer costs the stage one line
on stderr (what happened, and that ``python -m pipeline sync`` publishes the outputs later),
never its results or its exit status.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

from ..context import read_json
from ..procs import Interrupted
from .client import TAG_RECORD, TAG_ROLE, owner_alive, warn
from .publish import SweepPublisher, data_params
from .uri import project_root, tracking_uri

# Rebuilds a trained model from its output folder (``core.models.rebuild_trained``): the stages
# pass it in, so that tracking needs no model code of its own.
ModelLoader = Callable[[Path], Any]


class Trained(NamedTuple):
    """One training of a sweep found in outputs/: its place in the sweep and its identity (run.json)."""
    batch_size: int
    lr: float | None
    seed: int
    folder: Path
    identity: dict[str, Any]


def open_view(ctx, quiet: bool = False) -> SweepPublisher | None:
    try:
        return SweepPublisher(project_root(ctx.workdir), ctx.params.tracking.experiment, ctx.env)
    except Exception as err:
        if not quiet:
            warn(tracking_uri(project_root(ctx.workdir), ctx.env), "this stage's records", err)
        return None


def parent_params(ctx, manifest: dict[str, Any]) -> dict[str, Any]:
    """The sweep's params: not where it ran (executor), which is each training run's tag."""
    return {k: v for k, v in ctx.params.described().items() if not k.startswith("executor.")} | data_params(manifest)


def sweep_parent(view: SweepPublisher, ctx, manifest: dict[str, Any], trained: list[Trained] | tuple = ()) -> str:
    """The sweep's parent, found or made. ``trained``: the sweep's trainings already in outputs/
    (``sweep_trainings``), when the store may lack the parent (rebuilt, or deleted before
    compare): a parent made now for them starts with the first. A training starting now passes none."""
    key = ctx.params.sweep_key(manifest["data_hash"])
    first = min((int(t.identity["created"] * 1000) for t in trained if t.identity.get("created")), default=None)
    return view.parent(key, manifest, parent_params(ctx, manifest), ctx.run_tags(), ctx.parent_run_id, first)


def sweep_trainings(ctx, key: str) -> list[Trained]:
    """Each training of sweep ``key`` in outputs/."""
    found = []
    for bs in ctx.params.train.batch_sizes:
        for lr, seed in ctx.params.train.trials():
            folder = ctx.train_dir(bs, seed, lr)
            if (folder / "run.json").is_file() and (identity := read_json(folder / "run.json")).get("sweep_key") == key:
                found.append(Trained(bs, lr, seed, folder, identity))
    return found


def parent_link(view: SweepPublisher | None, ctx, manifest: dict[str, Any],
                base: str = "http://127.0.0.1:5000") -> str | None:
    """The sweep's parent run in MLflow's UI (``make ui``'s address, or the tracking server's),
    made or found now; None when the store does not answer."""
    if view is None:
        return None
    try:
        parent = sweep_parent(view, ctx, manifest, sweep_trainings(ctx, ctx.params.sweep_key(manifest["data_hash"])))
    except Exception:
        return None
    if view.uri.startswith(("http://", "https://")):
        base = view.uri.rstrip("/")
    return f"{base}/#/experiments/{view.experiment_id}/runs/{parent}"


class TrainingRun:
    """The MLflow run of one training while it trains: live points, its end, its publishing.
    Without a store (``view`` None, or it failed) every call does nothing and ``sink`` is None."""

    def __init__(self, view: SweepPublisher | None, ctx, identity: dict[str, Any], manifest: dict[str, Any]):
        self.view, self.identity, self.sink, self.run_id, self.parent = view, identity, None, None, None
        if view is None:
            return
        try:
            from .live import LiveMetrics
            self.parent = sweep_parent(view, ctx, manifest)
            self.run_id, held = view.open_train_run(identity, self.parent)
            self.sink = LiveMetrics(view.client, self.run_id, identity["window"], held, view.uri)
        except Exception as err:
            warn(view.uri, f"the run of {identity['name']}", err)
            self.view = None

    def ended_early(self, status: str, reason: str) -> None:
        """Training stopped (signal, error): the run says so; its points so far stay."""
        if self.view is None or self.run_id is None:
            return
        self.sink.close(complete=False, timeout=5.0)
        try:
            self.view.end_run(self.run_id, status, reason)
        except Exception as err:
            warn(self.view.uri, f"the end of {self.identity['name']}", err)

    def publish(self, folder: Path, model) -> None:
        if self.view is None:
            return
        name = self.identity["name"]
        if not self.sink.close(complete=True):
            warn(self.view.uri, f"the rest of {name}", "its live metrics are still waiting on it")
        elif self.view.store_replaced():
            warn(self.view.uri, name, "the store file was deleted or replaced while it trained")
        else:
            try:
                self.view.publish_train(folder, self.parent, model)
            except Exception as err:
                warn(self.view.uri, name, err)


@contextmanager
def training_run(view: SweepPublisher | None, ctx, identity: dict[str, Any], manifest: dict[str, Any],
                 holding: Callable) -> Iterator[TrainingRun]:
    """A training's MLflow run from its start to an early end: opened (or reopened on resume) on
    entry; a signal or an error in the block ends it KILLED or FAILED with the reason, while
    ``holding()`` keeps a further signal from cutting that short. A training that ends well is
    published by ``TrainingRun.publish`` once its files are written."""
    run = TrainingRun(view, ctx, identity, manifest)
    try:
        yield run
    except BaseException as exc:
        if isinstance(exc, (Interrupted, KeyboardInterrupt)):
            status, reason = "KILLED", str(exc) if isinstance(exc, Interrupted) else "stopped by SIGINT"
        else:
            status, reason = "FAILED", f"{type(exc).__name__}: {exc}"
        with holding():
            run.ended_early(status, reason)
        raise


def publish_parent(ctx) -> None:
    """Only the sweep's parent run, with the data set's figures as its params: what prepare has
    to show (it makes no model, so it needs no model code)."""
    _publish_own(ctx, None, "the sweep's parent run", lambda view, parent, key, trained: None)


def publish_comparison(ctx, view: SweepPublisher | None = None) -> None:
    """The comparison onto the sweep's parent, which then ends with it: what compare made. Its
    trainings were published by the stages that made them (or ``sync`` publishes them)."""
    def comparison(view: SweepPublisher, parent: str, key: str, trained: list[Trained]) -> None:
        _end_parent(view, ctx, parent, key, trained)
    _publish_own(ctx, view, "the sweep's comparison", comparison)


def _publish_own(ctx, view: SweepPublisher | None, what: str, publish: Callable) -> None:
    from ..context import read_manifest
    view = view or open_view(ctx)
    if view is None:
        return
    try:
        manifest = read_manifest(ctx.data_dir)
        key = ctx.params.sweep_key(manifest["data_hash"])
        trained = sweep_trainings(ctx, key)
        publish(view, sweep_parent(view, ctx, manifest, trained), key, trained)
    except Exception as err:
        warn(view.uri, what, err)


def _end_parent(view: SweepPublisher, ctx, parent: str, key: str, trained: list[Trained]) -> None:
    """The comparison, where outputs/ holds this sweep's; then the parent ends with the last of
    its trainings and its comparison."""
    ends = [int(t.identity["end_time"] * 1000) for t in trained if t.identity.get("end_time")]
    summary = ctx.compare_dir / "summary.json"
    if summary.is_file() and read_json(summary).get("sweep_key") == key:
        view.publish_compare(ctx.compare_dir, parent)
        ends.append(int(summary.stat().st_mtime * 1000))
    view.finish_parent(parent, ctx.parent_run_id, max(ends, default=None))


def publish_sweep(ctx, load_model: ModelLoader, view: SweepPublisher | None = None,
                  quiet: bool = False) -> dict[str, int] | None:
    """Publish every output of the sweep that params.yaml describes and the store lacks; close
    training runs whose trainer died. Returns what it looked at, or None when the store failed."""
    from ..context import read_manifest
    from ..config import DataError
    view = view or open_view(ctx, quiet)
    if view is None:
        return None
    try:
        manifest = read_manifest(ctx.data_dir)
    except DataError:
        return {"runs": 0}  # nothing prepared: nothing to show
    try:
        return _publish(view, ctx, manifest, load_model)
    except Exception as err:
        if not quiet:
            warn(view.uri, "the sweep's records", err)
        return None


def _publish(view: SweepPublisher, ctx, manifest: dict[str, Any], load_model: ModelLoader) -> dict[str, int]:
    key = ctx.params.sweep_key(manifest["data_hash"])
    trained = sweep_trainings(ctx, key)
    parent = sweep_parent(view, ctx, manifest, trained)
    runs = {r.data.tags.get(TAG_RECORD): r for r in view.sweep_runs(key) if r.data.tags.get(TAG_ROLE) == "train"}
    counts, published = {"runs": 0, "evaluated": 0, "closed": 0}, set()
    for t in trained:
        record_id = t.identity["record"]
        run_id = view.publish_train(t.folder, parent, load_model, runs.get(record_id))
        counts["runs"] += 1
        published.add(record_id)
        metrics = ctx.eval_dir(t.batch_size, t.seed, t.lr) / "metrics.json"
        if metrics.is_file() and read_json(metrics).get("train_record") == record_id:
            view.publish_eval(metrics.parent, view.client.get_run(run_id))
            counts["evaluated"] += 1
    counts["closed"] = close_dead_runs(view, [r for r in view.running_train_runs()
                                              if r.data.tags.get(TAG_RECORD) not in published])
    _end_parent(view, ctx, parent, key, trained)
    return counts


def close_dead_runs(view: SweepPublisher, runs) -> int:
    """Training runs left RUNNING by a trainer that died (SIGKILL, the OOM killer) are closed
    KILLED with the reason; a rerun of the same command resumes from the checkpoint and reopens it."""
    closed = 0
    for run in runs:
        tags = run.data.tags
        if run.info.status == "RUNNING" and not owner_alive(tags):
            view.end_run(run.info.run_id, "KILLED", f"its trainer (pid {tags.get('batchlab.owner.pid', '?')}) "
                         f"died without ending the run; rerun its train stage to resume it")
            closed += 1
    return closed
