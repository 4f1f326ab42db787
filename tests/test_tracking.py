import json
import time

from pipeline.steplog import Steps
from pipeline.tracking.uri import project_root, tracking_uri
from pipeline.tracking.live import LiveMetrics
from pipeline.tracking.client import TAG_SWEEP
from pipeline.tracking.publish import SweepPublisher


def test_project_root_from_inside_a_dvc_queue_copy(tmp_path):
    copy = tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "tmpab12"
    copy.mkdir(parents=True)
    assert project_root(copy) == tmp_path / "proj"
    assert project_root(tmp_path / "proj") == tmp_path / "proj"


def test_tracking_uri_default_override_and_relative_sqlite(tmp_path):
    assert tracking_uri(tmp_path, {}) == f"sqlite:///{tmp_path}/mlflow.db"
    assert tracking_uri(tmp_path, {"MLFLOW_TRACKING_URI": "sqlite:///runs.db"}) == f"sqlite:///{tmp_path}/runs.db"
    assert tracking_uri(tmp_path, {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}) == "http://127.0.0.1:5000"
    assert tracking_uri(tmp_path, {"MLFLOW_TRACKING_URI": "sqlite:////abs/x.db"}) == "sqlite:////abs/x.db"


MANIFEST = {"data_hash": "abc" * 8, "splits": {"train": {"n": 10}}, "n_features": 4, "n_classes": 2,
            "normalisation": {"mean": 0.0, "std": 1.0}, "source": {"name": "digits"}}


def _parent(view, key="k1", given=None):
    return view.parent(key, MANIFEST, {"train.lr": 0.1, "data.n_train": 10}, {}, given)


def test_each_sweep_has_a_ui_view_of_its_own_runs_and_the_url_opens_it(store):
    """Two sweeps in one experiment (another learning rate): each one's shared view filters the
    runs page to its own runs, so batch-size groups never mix the two; ui_url opens it."""
    view = SweepPublisher(store, "exp", {})
    parents = {key: _parent(view, key) for key in ("k1", "k2")}
    train = {key: view.client.create_run(view.experiment_id, tags={TAG_SWEEP: key, "mlflow.parentRunId": p,
                                                                   "batchlab.role": "train"} | view.own()).info.run_id
             for key, p in parents.items()}
    # The same sweep published by another workspace (another clone, another machine): not in this view.
    other = SweepPublisher(store, "exp", {"BATCHLAB_WORKSPACE": "elsewhere:/clone"})
    assert other.workspace != view.workspace
    view.client.create_run(view.experiment_id, tags={TAG_SWEEP: "k1", "batchlab.role": "train"} | other.own())
    tags = view.client.get_experiment(view.experiment_id).tags
    for key, parent in parents.items():
        state = json.loads(tags[f"mlflow.sharedViewState.sweep-{key}-{view.workspace}"])
        assert state["groupBy"]["groupByKeys"][0]["groupByData"] == "batch_size"
        found = {r.info.run_id for r in view.client.search_runs([view.experiment_id], state["searchFilter"])}
        assert found == {train[key]}  # the parent has no batch size: it would be a group of its own
        assert view.ui_url("http://h:1", key).endswith(f"viewStateShareKey=sweep-{key}-{view.workspace}")
    assert view.ui_url("http://h:1").endswith("viewStateShareKey=batch-sizes")  # no sweep: every run


def test_sweep_parent_is_found_not_duplicated_and_not_left_running(store):
    a, b = _parent(SweepPublisher(store, "exp", {})), _parent(SweepPublisher(store, "exp", {}))
    c = _parent(SweepPublisher(store, "exp", {}), "k2")
    assert a == b != c
    view = SweepPublisher(store, "exp", {})
    run = view.client.get_run(a)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.n_train"] == "10" and run.data.tags["mlflow.runName"] == "sweep-k1"
    assert len(run.inputs.dataset_inputs) == 1
    assert not run.data.metrics  # data figures are params, not metrics
    assert run.info.artifact_uri.startswith((store / "mlartifacts").as_uri())


def test_given_parent_is_adopted_and_a_later_one_points_to_it(store):
    view = SweepPublisher(store, "exp", {})
    given = view.client.create_run(view.experiment_id).info.run_id
    assert _parent(view, given=given) == given
    run = view.client.get_run(given)
    assert run.data.tags["batchlab.role"] == "sweep" and run.data.tags["mlflow.runName"] == "sweep-k1"
    assert run.info.status == "RUNNING"  # owned by `mlflow run`, which ends it
    later = view.client.create_run(view.experiment_id).info.run_id
    assert _parent(view, given=later) == given
    assert _parent(view, given=later) == given  # again, as each stage of the launch asks: no error
    tags = view.client.get_run(later).data.tags
    # The later launch trained nothing of its own: it says where the sweep is, nested under it,
    # so that the experiment's top level lists sweeps only.
    assert tags["batchlab.role"] == "launch" and tags["batchlab.sweep_parent"] == given
    assert tags["mlflow.parentRunId"] == given


def _chunk(start, n, batch=4):
    steps = list(range(start, start + n))
    now = time.time()
    return Steps({"step": steps, "samples": [s * batch for s in steps], "loss": [1.0 / s for s in steps],
                  "correct": [2] * n, "batch": [batch] * n, "lr": [0.1] * n,
                  "time": [now + i * 1e-3 for i in range(n)], "seconds": [0.002 + s * 1e-6 for s in steps]})


def _live(store, window):
    view = SweepPublisher(store, "exp", {})
    run = view.client.create_run(view.experiment_id).info.run_id
    return view.client, run, LiveMetrics(view.client, run, window)


def test_live_metrics_are_window_means_at_samples_seen(store):
    client, run, sink = _live(store, 10)
    sink.steps(_chunk(1, 55))
    sink.steps(_chunk(56, 45))
    sink.point("val/acc", 0.5, 400)
    assert sink.close(complete=True)
    loss = sorted(client.get_metric_history(run, "train/loss"), key=lambda m: m.step)
    assert [m.step for m in loss] == [40 * k for k in range(1, 11)]
    assert abs(loss[0].value - sum(1.0 / s for s in range(1, 11)) / 10) < 1e-9
    assert all(m.value == 0.5 for m in client.get_metric_history(run, "train/batch_acc"))
    # Throughput: the window's samples over its steps' own seconds, not the wall time between
    # points (which is zero before the first step's end).
    speed = sorted(client.get_metric_history(run, "train/throughput"), key=lambda m: m.step)
    assert abs(speed[0].value - 40 / sum(0.002 + s * 1e-6 for s in range(1, 11))) < 1e-6
    assert [m.value for m in client.get_metric_history(run, "val/acc")] == [0.5]


def test_live_metrics_end_with_the_last_partial_window(store):
    client, run, sink = _live(store, 3)
    sink.steps(_chunk(1, 23))
    sink.close(complete=True)
    steps = sorted(m.step for m in client.get_metric_history(run, "train/loss"))
    # window of 3 steps: seven full windows, then the partial one at step 23.
    assert steps == [3 * 4 * k for k in range(1, 8)] + [23 * 4]


def test_live_metrics_skip_what_the_store_holds(store):
    """A resumed run: the points a killed trainer already sent are not sent again."""
    client, run, _ = _live(store, 1)
    sink = LiveMetrics(client, run, 1, held={"train/loss": 40})
    sink.steps(_chunk(1, 20))
    sink.close(complete=True)
    assert sorted(m.step for m in client.get_metric_history(run, "train/loss")) == [4 * k for k in range(11, 21)]
    assert len(client.get_metric_history(run, "train/lr")) == 20
