"""What the stages ask of MLflow: open the view, follow one training live, publish the sweep.

Every call here is best effort: a store that fails or does not answer costs the stage one line
on stderr (what happened, and that ``python -m pipeline sync`` publishes the outputs later),
never its results or its exit status.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..context import read_json
from .publish import TAG_RECORD, TAG_ROLE, View, data_params, owner_alive, warn
from .store import project_root


def open_view(ctx, quiet: bool = False) -> View | None:
    try:
        return View(project_root(ctx.workdir), ctx.params.tracking.experiment, ctx.env)
    except Exception as err:
        if not quiet:
            from .store import tracking_uri
            warn(tracking_uri(project_root(ctx.workdir), ctx.env), "this stage's records", err)
        return None


def parent_params(ctx, manifest: dict[str, Any]) -> dict[str, Any]:
    """The sweep's params: not where it ran (executor), which is each training run's tag."""
    return {k: v for k, v in ctx.params.flat().items() if not k.startswith("executor.")} | data_params(manifest)


def sweep_parent(view: View, ctx, manifest: dict[str, Any], records: list | tuple = ()) -> str:
    """The sweep's parent, found or made. ``records``: the sweep's trainings already in outputs/
    (sweep_records), when the store may lack the parent (rebuilt, or deleted before compare): a
    parent made now for them starts with the first. A training starting now passes none."""
    key = ctx.params.sweep_key(manifest["data_hash"])
    first = min((int(r["created"] * 1000) for *_, r in records if r.get("created")), default=None)
    return view.parent(key, manifest, parent_params(ctx, manifest), ctx.run_tags(), ctx.parent_run_id, first)


def sweep_records(ctx, key: str) -> list[tuple]:
    """(batch size, lr, seed, folder, record) of each training of sweep ``key`` in outputs/."""
    records = []
    for bs in ctx.params.train.batch_sizes:
        for lr, seed in ctx.params.train.trials():
            folder = ctx.train_dir(bs, seed, lr)
            if (folder / "run.json").is_file() and (record := read_json(folder / "run.json")).get("sweep_key") == key:
                records.append((bs, lr, seed, folder, record))
    return records


def parent_link(view: View | None, ctx, manifest: dict[str, Any], base: str = "http://127.0.0.1:5000") -> str | None:
    """The sweep's parent run in MLflow's UI (``make ui``'s address, or the tracking server's),
    made or found now; None when the store does not answer."""
    if view is None:
        return None
    try:
        parent = sweep_parent(view, ctx, manifest, sweep_records(ctx, ctx.params.sweep_key(manifest["data_hash"])))
    except Exception:
        return None
    if view.uri.startswith(("http://", "https://")):
        base = view.uri.rstrip("/")
    return f"{base}/#/experiments/{view.experiment_id}/runs/{parent}"


class LiveRun:
    """The MLflow run of one training while it trains: live points, its end, its publishing."""

    def __init__(self, view: View | None, ctx, record: dict[str, Any], manifest: dict[str, Any]):
        self.view, self.record, self.sink, self.run_id, self.parent = view, record, None, None, None
        if view is None:
            return
        try:
            from .live import LiveMetrics
            self.parent = sweep_parent(view, ctx, manifest)
            self.run_id, held = view.open_train_run(record, self.parent)
            self.sink = LiveMetrics(view.client, self.run_id, record["window"], record["created"], held, view.uri)
        except Exception as err:
            warn(view.uri, f"the run of {record['name']}", err)
            self.view = None

    def ended_early(self, status: str, reason: str) -> None:
        """Training stopped (signal, error): the run says so; its points so far stay."""
        if self.view is None or self.run_id is None:
            return
        self.sink.close(complete=False, timeout=5.0)
        try:
            self.view.end_run(self.run_id, status, reason)
        except Exception as err:
            warn(self.view.uri, f"the end of {self.record['name']}", err)

    def publish(self, folder: Path, model) -> None:
        if self.view is None:
            return
        if not self.sink.close(complete=True):
            warn(self.view.uri, f"the rest of {self.record['name']}", "its live metrics are still waiting on it")
        elif self.view.store_replaced():
            warn(self.view.uri, f"{self.record['name']}", "the store file was deleted or replaced while it trained")
        else:
            try:
                self.view.publish_train(folder, self.parent, model=model)
            except Exception as err:
                warn(self.view.uri, f"{self.record['name']}", err)


def publish_sweep(ctx, view: View | None = None, quiet: bool = False) -> dict[str, int] | None:
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
        return _publish(view, ctx, manifest)
    except Exception as err:
        if not quiet:
            warn(view.uri, "the sweep's records", err)
        return None


def _publish(view: View, ctx, manifest: dict[str, Any]) -> dict[str, int]:
    key = ctx.params.sweep_key(manifest["data_hash"])
    records = sweep_records(ctx, key)
    parent = sweep_parent(view, ctx, manifest, records)
    runs = {r.data.tags.get(TAG_RECORD): r for r in view.sweep_runs(key) if r.data.tags.get(TAG_ROLE) == "train"}
    counts, published = {"runs": 0, "evaluated": 0, "closed": 0}, set()
    for bs, lr, seed, folder, record in records:
        run_id = view.publish_train(folder, parent, runs.get(record["record"]))
        counts["runs"] += 1
        published.add(record["record"])
        metrics = ctx.eval_dir(bs, seed, lr) / "metrics.json"
        if metrics.is_file() and read_json(metrics).get("train_record") == record["record"]:
            view.publish_eval(metrics.parent, view.client.get_run(run_id))
            counts["evaluated"] += 1
    counts["closed"] = close_dead_runs(view, [r for r in view.running_train_runs()
                                                 if r.data.tags.get(TAG_RECORD) not in published])
    # The parent ends with the last of its trainings and its comparison.
    ends = [int(r["end_time"] * 1000) for *_, r in records if r.get("end_time")]
    summary = ctx.compare_dir / "summary.json"
    if summary.is_file() and read_json(summary).get("sweep_key") == key:
        view.publish_compare(ctx.compare_dir, parent)
        ends.append(int(summary.stat().st_mtime * 1000))
    view.finish_parent(parent, ctx.parent_run_id, max(ends, default=None))
    return counts


def close_dead_runs(view: View, runs) -> int:
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


