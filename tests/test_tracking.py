import sys
import time

from pipeline.records import StepChunk
from pipeline.store import project_root, tracking_uri
from pipeline.tracking import MlflowSink, Tracker


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


def _tracker(store, lr=0.1, parent=None):
    from pipeline.config import parse_params
    return Tracker(store, "exp", {}, parent, params=parse_params({"train": {"lr": lr}}), run_tags=dict)


MANIFEST = {"data_hash": "abc", "splits": {"train": {"n": 10}}, "n_features": 4, "n_classes": 2,
            "normalisation": {"mean": 0.0, "std": 1.0}}


def test_each_sweep_has_a_ui_view_of_its_own_runs_and_the_url_opens_it(store):
    """Two sweeps in one experiment (another learning rate): each one's shared view filters the
    runs page to its own runs, so batch-size groups never mix the two; ui_url opens it."""
    import json

    from pipeline.tracking import TAG_SWEEP
    trackers = [_tracker(store), _tracker(store, lr=0.2)]
    parents = [t.sweep_parent(MANIFEST) for t in trackers]
    t = trackers[0]
    train = {p: t.client.create_run(t.experiment_id, tags={TAG_SWEEP: t.client.get_run(p).data.tags[TAG_SWEEP],
                                                           "mlflow.parentRunId": p}).info.run_id for p in parents}
    tags = t.client.get_experiment(t.experiment_id).tags
    for parent in parents:
        key = t.client.get_run(parent).data.tags[TAG_SWEEP]
        state = json.loads(tags[f"mlflow.sharedViewState.sweep-{key}"])
        assert state["groupBy"]["groupByKeys"][0]["groupByData"] == "batch_size"
        found = {r.info.run_id for r in t.client.search_runs([t.experiment_id], state["searchFilter"])}
        assert found == {parent, train[parent]}
        assert t.ui_url("http://h:1", key).endswith(f"viewStateShareKey=sweep-{key}")
    assert t.ui_url("http://h:1").endswith("viewStateShareKey=batch-sizes")  # no sweep: every run


def test_sweep_parent_is_found_not_duplicated_and_not_left_running(store):
    a = _tracker(store).sweep_parent(MANIFEST)
    b = _tracker(store).sweep_parent(MANIFEST)
    c = _tracker(store, lr=0.2).sweep_parent(MANIFEST)
    assert a == b != c
    t = _tracker(store)
    run = t.client.get_run(a)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.hash"] == "abc" and run.data.params["data.n_train"] == "10"
    assert run.data.tags["mlflow.runName"].startswith("sweep-")
    assert not run.data.metrics  # data figures are params, not metrics
    assert run.info.artifact_uri.startswith((store / "mlartifacts").as_uri())


def test_given_parent_is_adopted_and_named_like_any_parent(store):
    t = _tracker(store)
    given = t.client.create_run(t.experiment_id).info.run_id
    got = _tracker(store, parent=given).sweep_parent(MANIFEST)
    assert got == given
    run = t.client.get_run(given)
    assert run.data.tags["batchlab.role"] == "sweep"
    assert run.data.tags["mlflow.runName"] == f"sweep-{run.data.tags['batchlab.sweep_key'][:8]}"
    assert run.info.status == "RUNNING"  # owned by `mlflow run`, which ends it


def test_given_run_of_a_sweep_already_done_points_to_its_parent(store):
    first = _tracker(store).sweep_parent(MANIFEST)
    t = _tracker(store)
    given = t.client.create_run(t.experiment_id).info.run_id
    assert _tracker(store, parent=given).sweep_parent(MANIFEST) == first
    tags = t.client.get_run(given).data.tags
    assert tags["batchlab.role"] == "launch" and tags["batchlab.sweep_parent"] == first


def test_a_retrain_retires_the_older_run_of_the_same_batch_size(store):
    t = _tracker(store)
    parent = t.sweep_parent(MANIFEST)
    tags = {"batchlab.role": "train", "batchlab.batch_size": "8", "batchlab.seed": "0"}
    runs = [t.create_run(f"bs8-s0-{i}", tags, parent) for i in range(2)]
    other = t.create_run("bs8-s1", tags | {"batchlab.seed": "1"}, parent)
    assert t.retire_others(parent, 8, 0, keep=runs[1]) == [runs[0]]
    assert t.client.get_run(runs[0]).info.lifecycle_stage == "deleted"
    assert t.client.get_run(runs[0]).data.tags["batchlab.superseded_by"] == runs[1]
    assert t.client.get_run(other).info.lifecycle_stage == "active"


def _chunk(start, n, batch=4):
    steps = list(range(start, start + n))
    now = time.time()
    return StepChunk(steps, [s * batch for s in steps], [1.0 / s for s in steps], [2] * n,
                     [batch] * n, [0.1] * n, [now + i * 1e-3 for i in range(n)])


def test_sink_logs_window_means_at_samples_seen(store):
    t = Tracker(store, "exp", {})
    run = t.client.create_run(t.experiment_id).info.run_id
    sink = MlflowSink(t, run, total_steps=100, max_points=10, full_history=False, start_time=time.time())
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
    sink = MlflowSink(t, run, total_steps=23, max_points=10, full_history=True, start_time=time.time())
    sink.steps(_chunk(1, 23))
    sink.close(complete=True)
    assert len(t.client.get_metric_history(run, "train/loss")) == 23
    run2 = t.client.create_run(t.experiment_id).info.run_id
    sink = MlflowSink(t, run2, total_steps=23, max_points=10, full_history=False, start_time=time.time())
    sink.steps(_chunk(1, 23))
    sink.close(complete=True)
    steps = sorted(m.step for m in t.client.get_metric_history(run2, "train/loss"))
    # window = ceil(23 / 10) = 3 steps: seven full windows, then the partial one at step 23.
    assert steps == [3 * 4 * k for k in range(1, 8)] + [23 * 4]


def test_one_logger_serves_the_stages_runs_in_turn_and_a_spare_never_used_exits(store):
    """``another=True``: once the logger has answered for this run it is kept, and the next run's
    sink hands it that run in a line; every point arrives once, in its own run, and the logger of
    the last run (or of an interrupted one) exits."""
    from pipeline import metric_logger

    t = Tracker(store, "exp", {})
    runs = [t.client.create_run(t.experiment_id).info.run_id for _ in range(3)]
    procs = []
    for i, run in enumerate(runs):
        sink = MlflowSink(t, run, total_steps=10, max_points=100, full_history=False, start_time=time.time(),
                          another=i + 1 < len(runs))
        procs.append(sink._proc)
        sink.steps(_chunk(1, 10))
        sink.close(complete=True)
        assert (metric_logger._SPARES.get(t.uri) is sink._proc) == (i + 1 < len(runs))
    assert procs[0] is procs[1] is procs[2] and procs[0].returncode == 0
    for run in runs:
        assert sorted(m.step for m in t.client.get_metric_history(run, "train/loss")) == [4 * k for k in range(1, 11)]
    # A run that does not end complete (a signal, an error) ends its logger, even if runs would follow.
    run = t.client.create_run(t.experiment_id).info.run_id
    sink = MlflowSink(t, run, total_steps=10, max_points=100, full_history=False, start_time=time.time(),
                      another=True)
    sink.steps(_chunk(1, 5))
    sink.close(complete=False)
    assert sink._proc.returncode == 0 and t.uri not in metric_logger._SPARES
    assert len(t.client.get_metric_history(run, "train/loss")) == 5
    metric_logger.prestart(t.uri)  # a spare nobody takes reads the end of its input and exits
    unused = metric_logger.take(t.uri)
    unused.stdin.close()
    assert unused.wait(timeout=120) == 0


def test_sql_points_store_what_log_batch_stores(store):
    check_sql_points(Tracker(store, "exp", {}))


def check_sql_points(t: Tracker) -> None:
    """The logger's SQL path and MLflow's own ``log_batch`` leave the same records: each key's
    history, the latest value per key (NaN, infinities and an older step that must not become
    the latest included), and both refuse a deleted run."""
    import math

    import pytest
    from mlflow.exceptions import MlflowException
    from pipeline.metric_logger import Points

    writer = Points(t.client, t.uri)
    assert writer.sql is not None  # a SQL store: the fast path, else this test compares log_batch with itself
    batches = [[("a", 0.5, 1000, 1), ("b", float("nan"), 1000, 1), ("a", 0.25, 1001, 2), ("c", math.inf, 1000, 1)],
               [("a", 0.125, 1002, 3), ("b", 2.0, 1002, 3), ("c", -math.inf, 999, 0), ("d", 7.0, 1003, 5)],
               [("d", 1.0, 1004, 4)] + [("e", float(i), 2000 + i, i) for i in range(2500)]]
    fast, slow = (t.client.create_run(t.experiment_id).info.run_id for _ in range(2))
    for batch in batches:
        writer.send(fast, [list(p) for p in batch])
        writer._log_batch(slow, [list(p) for p in batch])

    def records(run):
        hist = {k: sorted((m.step, m.timestamp, m.value if not math.isnan(m.value) else "nan")
                          for m in t.client.get_metric_history(run, k)) for k in "abcde"}
        latest = {k: v if not math.isnan(v) else "nan" for k, v in t.client.get_run(run).data.metrics.items()}
        return hist, latest

    assert records(fast) == records(slow)
    assert records(fast)[1] == {"a": 0.125, "b": 2.0, "c": sys.float_info.max, "d": 7.0, "e": 2499.0}
    assert len(records(fast)[0]["e"]) == 2500
    t.client.delete_run(fast)
    with pytest.raises(MlflowException, match="active"):
        writer.send(fast, [["a", 1.0, 3000, 9]])


def test_points_journaled_while_the_store_was_down_reach_a_sqlite_store_once(store):
    """A stage whose store never answered journals its run and every metric point; the next
    stage on a SQLite store replays them through the logger's SQL path, and a further sync sends
    nothing twice."""
    down = Tracker(store, "exp", {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}, warn=False)
    assert down.down is not None
    run = down.create_run("journaled", {})
    sink = MlflowSink(down, run, total_steps=30, max_points=100, full_history=False, start_time=time.time())
    sink.steps(_chunk(1, 30))
    sink.point("val/acc", 0.75, 120)
    sink.close(complete=True)
    down.finish(run)

    t = Tracker(store, "exp", {})  # its start sends the journal
    real = t.resolve(run)
    assert real != run and t._points().sql is not None
    loss = t.client.get_metric_history(real, "train/loss")
    assert sorted(m.step for m in loss) == [4 * s for s in range(1, 31)]
    stored = t.client.get_run(real)
    assert stored.data.metrics["val/acc"] == 0.75 and stored.data.metrics["train/loss"] == 1.0 / 30
    assert stored.info.status == "FINISHED"
    assert Tracker(store, "exp", {}).sync() == 0
    assert len(t.client.get_metric_history(real, "train/loss")) == 30


def test_logging_the_same_metrics_again_adds_no_point_and_a_new_value_does(store):
    """What a forced rerun of evaluate (or a replayed journal) does: the same key, step and value
    again is not a second point; another value at that step is, and becomes the one shown."""
    t = Tracker(store, "exp", {})
    run = t.create_run("again", {})
    t.log_metrics(run, {"test/acc": 0.9, "test/loss": float("nan")}, step=0)
    t.log_metrics(run, {"test/acc": 0.9, "test/loss": float("nan"), "test/f1": 0.5}, step=0)
    assert [m.value for m in t.client.get_metric_history(run, "test/acc")] == [0.9]
    assert len(t.client.get_metric_history(run, "test/loss")) == 1
    assert len(t.client.get_metric_history(run, "test/f1")) == 1
    t.log_metrics(run, {"test/acc": 0.95}, step=0)
    t.log_metrics(run, {"test/acc": 0.9}, step=10)
    assert sorted((m.step, m.value) for m in t.client.get_metric_history(run, "test/acc")) == [
        (0, 0.9), (0, 0.95), (10, 0.9)]
