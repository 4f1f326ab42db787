"""The MLflow view of a sweep, published from its DVC outputs: the files are the record.

``SweepPublisher`` sends the store what ``outputs/`` holds and the store lacks: the sweep's
parent run, one run per training (found by the record id its ``run.json`` holds), their params,
every metric point, artifacts and model, the test figures and the comparison. Each part is checked
before it is sent (params held, steps held per key, artifacts listed, logged models searched), so
publishing the same outputs again changes nothing, and publishing after a fault sends exactly what
is missing. A run is set FINISHED only once all of it is there; then a tag
``batchlab.published.<part>`` holds the digest of the files it came from, so the next publish
skips it with one search. A deleted store is rebuilt whole.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mlflow.entities import RunTag

from .. import mlflow_ui as ui
from ..context import param_text as _text, read_json
from .client import (PUBLISHED, TAG_BATCH, TAG_END, TAG_LR, TAG_RECORD, TAG_ROLE, TAG_SEED, TAG_SWEEP,
                     TAG_WORKSPACE, TrackingClient, digest, owner_alive, owner_tags)
from .points import scalar_points, train_points


class SweepPublisher(TrackingClient):
    """The batchlab layout of a sweep in the store: its parent, one run per training."""

    def parent(self, key: str, manifest: dict, params: dict[str, Any], tags: dict[str, str],
               given: str | None = None, start_ms: int | None = None) -> str:
        """The sweep's parent run: found by its key, else the run `mlflow run` made (``given``),
        else a new one; its params, data set and manifest sent where missing."""
        with self.lock():
            parents = self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.`{TAG_SWEEP}` = '{key}' and tags.`{TAG_ROLE}` = 'sweep'",
                max_results=100)
            # This workspace's; else one published before runs named their workspace, adopted.
            found = self.parent_of([r for r in parents if r.data.tags.get(TAG_WORKSPACE) == self.workspace]) \
                or self.parent_of([r for r in parents if TAG_WORKSPACE not in r.data.tags])
            if found is not None and TAG_WORKSPACE not in found.data.tags:
                self.client.log_batch(found.info.run_id, tags=[RunTag(k, v) for k, v in self.own().items()])
            if found is not None:
                run_id = found.info.run_id
                if given and given != run_id:
                    self._point_launch(given, run_id, key)
            else:
                tags = tags | {TAG_ROLE: "sweep", TAG_SWEEP: key} | self.own()
                run_id = self._adopt(given, tags, key)
                if run_id is None:  # ended at once: it is a folder of runs, FINISHED again by each publish
                    run_id = self.client.create_run(self.experiment_id, run_name=f"sweep-{key[:8]}",
                                                    tags=tags, start_time=start_ms).info.run_id
                    self.client.set_terminated(run_id, "FINISHED")
        self.experiment_tags(dict([ui.sweep_view_tag(key, self.workspace, bool(params.get("train.lr_grid")))]))
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
    def open_train_run(self, identity: dict[str, Any], parent: str) -> tuple[str, dict[str, int]]:
        """The run of the training ``identity`` names (reopened when a resumed training had one),
        RUNNING and owned by this process; and the highest step it holds per metric key."""
        with self.lock():
            run = self.find_record(identity["record"])
            if run is None:
                run_id = self.client.create_run(self.experiment_id, run_name=identity["name"],
                                                start_time=int(identity["created"] * 1000),
                                                tags=self._train_tags(identity, parent) | owner_tags()).info.run_id
                return run_id, {}
        run_id = run.info.run_id
        # The training's tags as they are now (a Ray task resumed on another node), and its owner.
        now = identity["tags"] | owner_tags() | {"batchlab.resumed": "true"}
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in now.items()])
        if TAG_END in run.data.tags:
            self.client.delete_tag(run_id, TAG_END)
        self.client.update_run(run_id, status="RUNNING")
        held = {k: max((m.step for m in self.client.get_metric_history(run_id, k)), default=-1)
                for k in run.data.metrics}
        return run_id, held

    def publish_train(self, folder: Path, parent: str, model, run=None) -> str:
        """Everything of one training's output folder into its run, then FINISHED. ``model``: the
        trained module, or a function that rebuilds it from the folder (``core.models.rebuild_trained``)."""
        identity = read_json(folder / "run.json")
        stamp = digest(folder / "summary.json", folder / "run.json")
        if run is None:
            run = self.find_record(identity["record"])
        if run is None:
            with self.lock():
                run = self.find_record(identity["record"]) or self.client.get_run(self.client.create_run(
                    self.experiment_id, run_name=identity["name"], start_time=int(identity["created"] * 1000),
                    tags=self._train_tags(identity, parent)).info.run_id)
        run_id = run.info.run_id
        if TAG_WORKSPACE not in run.data.tags:  # published before runs named their workspace
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in self.own().items()])
        if run.data.tags.get(PUBLISHED + "train") == stamp and run.info.status == "FINISHED" \
                and self.model_ready(run_id):
            return run_id
        self._params(run, identity["params"])
        summary = read_json(folder / "summary.json")
        points = train_points(folder, identity["window"], identity["steps_t0"])
        points += scalar_points(final_metrics(summary), summary["samples"], int(identity["end_time"] * 1000))
        self._metrics(run, points)
        self._artifacts(run_id, [folder / n for n in TRAIN_FILES], "outputs")
        self.client.log_artifact(run_id, str(folder / "params.json"))
        self._model(run_id, folder, identity, model)
        self.client.set_tag(run_id, PUBLISHED + "train", stamp)
        self.client.set_terminated(run_id, "FINISHED", end_time=int(identity["end_time"] * 1000))
        self._retire_others(run_id, identity)
        return run_id

    def _retire_others(self, keep: str, identity: dict[str, Any]) -> None:
        """A deliberate retrain (``dvc repro --force``), or a training started again because its
        trainer died before its first checkpoint, replaces the run of the same (sweep, batch size,
        seed): the older one goes to MLflow's trash, never counted side by side."""
        for run in self.client.search_runs([self.experiment_id], max_results=100, filter_string=(
                f"tags.`{TAG_SWEEP}` = '{identity['sweep_key']}' and tags.`{TAG_BATCH}` = '{identity['batch_size']}' "
                f"and tags.`{TAG_SEED}` = '{identity['seed']}' and tags.`{TAG_ROLE}` = 'train' "
                f"and tags.`{TAG_WORKSPACE}` = '{self.workspace}'"
                + (f" and tags.`{TAG_LR}` = '{identity['lr']!r}'" if identity.get("lr") is not None else ""))):
            if run.info.run_id != keep and (run.info.status != "RUNNING" or not owner_alive(run.data.tags)):
                self.client.set_tag(run.info.run_id, "batchlab.superseded_by", keep)
                self.client.delete_run(run.info.run_id)

    def _train_tags(self, identity: dict[str, Any], parent: str) -> dict[str, str]:
        return _train_tags(identity, parent) | self.own()

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


TRAIN_FILES = ("steps.csv", "evals.csv", "noise.csv", "summary.json", "model.pt", "lr_search.json")
EVAL_FILES = ("metrics.json", "report.json", "predictions.csv", "evaluation.png")
# Summary keys that are settings or bookkeeping, not results: params and tags hold them.
_NOT_METRICS = ("batch_size", "seed", "lr", "epochs", "lr_effective", "world_size", "resumed_from_step")


def final_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The summary as MLflow metrics, named as in summary.json (``final_val_acc``, ``throughput``).
    Single values carry no prefix so that MLflow's run page, which orders its chart sections by
    prefix and puts unprefixed metrics last, opens on the curves (``train/``, ``val/``)."""
    return {k: float(v) for k, v in summary.items()
            if k not in _NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _train_tags(identity: dict[str, Any], parent: str) -> dict[str, str]:
    return identity["tags"] | {"mlflow.parentRunId": parent, TAG_RECORD: identity["record"], TAG_ROLE: "train",
                             TAG_SWEEP: identity["sweep_key"], TAG_BATCH: str(identity["batch_size"]),
                             TAG_SEED: str(identity["seed"]), "mlflow.runColor": ui.batch_size_colour(identity["batch_size"])} \
        | ({} if identity.get("lr") is None else {TAG_LR: repr(identity["lr"])})


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


