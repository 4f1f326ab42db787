import time
from pathlib import Path

from pipeline.engine import StepChunk
from pipeline.tracking import MlflowSink, Tracker, project_root, tracking_uri


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


def test_sweep_parent_is_found_not_duplicated_and_not_left_running(store):
    t = Tracker(store, "exp", {})
    manifest = {"data_hash": "abc", "splits": {}}
    a = t.sweep_parent("key1", {"train.lr": 0.1}, manifest, {})
    b = t.sweep_parent("key1", {"train.lr": 0.1}, manifest, {})
    c = t.sweep_parent("key2", {"train.lr": 0.2}, manifest, {})
    assert a == b != c
    run = t.client.get_run(a)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.hash"] == "abc"
    assert run.info.artifact_uri.startswith((store / "mlartifacts").as_uri())


def test_given_parent_is_used_as_is(store):
    t = Tracker(store, "exp", {})
    given = t.client.create_run(t.experiment_id).info.run_id
    got = t.sweep_parent("k", {}, {"data_hash": "h"}, {}, given=given)
    assert got == given
    assert t.client.get_run(given).data.tags["batchlab.sweep_key"] == "k"
    assert t.client.get_run(given).info.status == "RUNNING"  # owned by `mlflow run`, not us


def _chunk(start, n, batch=4):
    steps = list(range(start, start + n))
    now = time.time()
    return StepChunk(steps, [s * batch for s in steps], [1.0 / s for s in steps], [2] * n,
                     [batch] * n, [0.1] * n, [now + i * 1e-3 for i in range(n)])


def test_sink_logs_window_means_at_samples_seen(store):
    t = Tracker(store, "exp", {})
    run = t.client.create_run(t.experiment_id).info.run_id
    sink = MlflowSink(t.uri, run, total_steps=100, max_points=10, full_history=False, start_time=time.time())
    sink.ready()
    assert sink.window == 10
    sink.steps(_chunk(1, 55))
    sink.steps(_chunk(56, 45))
    sink.point("val/acc", 0.5, 400)
    sink.close(complete=True)
    loss = sorted(t.client.get_metric_history(run, "train/loss"), key=lambda m: m.step)
    assert [m.step for m in loss] == [40 * k for k in range(1, 11)]
    assert abs(loss[0].value - sum(1.0 / s for s in range(1, 11)) / 10) < 1e-9
    acc = t.client.get_metric_history(run, "train/batch_acc")
    assert all(m.value == 0.5 for m in acc)
    assert [m.value for m in t.client.get_metric_history(run, "val/acc")] == [0.5]


def test_sink_full_history_logs_every_step_and_the_last_partial_window(store):
    t = Tracker(store, "exp", {})
    run = t.client.create_run(t.experiment_id).info.run_id
    sink = MlflowSink(t.uri, run, total_steps=23, max_points=10, full_history=True, start_time=time.time())
    sink.steps(_chunk(1, 23))
    sink.close(complete=True)
    assert len(t.client.get_metric_history(run, "train/loss")) == 23
    run2 = t.client.create_run(t.experiment_id).info.run_id
    sink = MlflowSink(t.uri, run2, total_steps=23, max_points=10, full_history=False, start_time=time.time())
    sink.steps(_chunk(1, 23))
    sink.close(complete=True)
    steps = sorted(m.step for m in t.client.get_metric_history(run2, "train/loss"))
    # window = ceil(23 / 10) = 3 steps: seven full windows, then the partial one at step 23.
    assert steps == [3 * 4 * k for k in range(1, 8)] + [23 * 4]
