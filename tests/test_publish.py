"""The MLflow view is published from the outputs: exactly once, repeatable, rebuilt when lost."""
import socket
import time

import pytest

from conftest import check_published, runs_of
from pipeline.stages import compare, evaluate, prepare, train


def _uri(ctx):
    return f"sqlite:///{ctx.workdir / 'mlflow.db'}"


def _snapshot(uri):
    """Everything a publish could add: runs, their statuses, metric points, artifacts, models."""
    client, runs = runs_of(uri)
    out = {}
    for r in runs:
        points = {k: len(client.get_metric_history(r.info.run_id, k)) for k in r.data.metrics}
        arts = sorted(a.path for d in ("", "outputs", "evaluate", "compare") for a in client.list_artifacts(r.info.run_id, d or None))
        out[r.info.run_id] = (r.info.status, len(r.data.params), points, arts)
    models = client.search_logged_models([runs[0].info.experiment_id])
    return out, len(models)


def _sweep(ctx):
    prepare.run(ctx)
    for bs in ctx.params.train.batch_sizes:
        train.run(ctx, bs)
        evaluate.run(ctx, bs)
    compare.run(ctx)


def test_a_sweep_published_again_changes_nothing_and_a_lost_store_is_rebuilt(ctx_factory, capsys):
    from pipeline.core.models import rebuild_trained
    from pipeline.tracking.sweep import publish_sweep
    ctx = ctx_factory({"train": {"batch_sizes": [64, 256], "epochs": 2}})
    _sweep(ctx)
    before = _snapshot(_uri(ctx))
    stats = check_published(_uri(ctx), ctx.workdir)
    assert stats["runs"] == 2 and stats["points"] > 0
    for _ in range(2):
        assert publish_sweep(ctx, rebuild_trained) == {"runs": 2, "evaluated": 2, "closed": 0}
    assert _snapshot(_uri(ctx)) == before
    assert before[1] == 2  # one logged model per training

    # A store that holds nothing (deleted, or another one named): the outputs rebuild it whole.
    ctx.env = {"MLFLOW_TRACKING_URI": f"sqlite:///{ctx.workdir / 'rebuilt.db'}"}
    publish_sweep(ctx, rebuild_trained)
    rebuilt_uri = f"sqlite:///{ctx.workdir / 'rebuilt.db'}"
    assert check_published(rebuilt_uri, ctx.workdir) == stats
    again = _snapshot(rebuilt_uri)
    old_shape = sorted((s, n, sorted(p.items()), a) for s, n, p, a in before[0].values())
    new_shape = sorted((s, n, sorted(p.items()), a) for s, n, p, a in again[0].values())
    assert new_shape == old_shape and again[1] == 2
    client, runs = runs_of(rebuilt_uri)
    parent = next(r for r in runs if r.data.tags["batchlab.role"] == "sweep")
    assert {"sweep/best_bs", "by_batch_size/test_acc"} <= set(parent.data.metrics)
    # Rebuilt, the parent still spans the sweep: from its first training to its comparison.
    children = [r for r in runs if r.data.tags["batchlab.role"] == "train"]
    assert parent.info.start_time == min(c.info.start_time for c in children)
    assert parent.info.end_time == int((ctx.compare_dir / "summary.json").stat().st_mtime * 1000)
    assert parent.info.end_time >= max(c.info.end_time for c in children)
    # The parent's description, on its run page, is the sweep's answer.
    assert parent.data.tags["mlflow.note.content"].startswith(parent.data.tags["batchlab.recommendation"])
    assert parent.data.tags["batchlab.recommendation"].startswith("Use batch size")
    assert "warning" not in capsys.readouterr().err


def test_only_the_missing_steps_of_a_key_are_sent(ctx_factory):
    from pipeline.tracking.publish import SweepPublisher
    ctx = ctx_factory()
    view = SweepPublisher(ctx.workdir, "test", {})
    run_id = view.client.create_run(view.experiment_id).info.run_id
    view._metrics(view.client.get_run(run_id), [("k", float(s), 0, s) for s in (1, 2, 3)])
    sent = view._metrics(view.client.get_run(run_id), [("k", float(s), 0, s) for s in range(1, 7)]
                         + [("j", 1.0, 0, 0)])
    assert sent == 4
    assert sorted(m.step for m in view.client.get_metric_history(run_id, "k")) == [1, 2, 3, 4, 5, 6]


def test_live_metrics_to_a_store_that_does_not_answer_stop_with_one_line(capsys):
    """Nothing listens on the port: the thread gives up, says so once, and close() returns."""
    from mlflow.tracking import MlflowClient
    from pipeline.steplog import Steps
    from pipeline.tracking.live import LiveMetrics

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    live = LiveMetrics(MlflowClient(f"http://127.0.0.1:{port}"), "0" * 32, window=1,
                       uri="http://dead")
    n = 3000
    chunk = Steps({"step": list(range(1, n + 1)), "samples": list(range(4, 4 * n + 1, 4)), "loss": [0.5] * n,
                   "correct": [2] * n, "batch": [4] * n, "lr": [1e-3] * n, "time": [time.time()] * n,
                   "seconds": [1e-3] * n})
    live.steps(chunk)
    live.point("val/loss", 0.4, 4 * n)
    assert live.close(complete=True, timeout=120) is True
    assert live.failed and live.sent == 0
    err = capsys.readouterr().err
    assert err.count("warning: live metrics to http://dead stopped") == 1


def test_a_training_whose_store_does_not_answer_writes_its_outputs_and_says_what_sync_does(ctx_factory, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = ctx_factory({"train": {"batch_sizes": [256], "epochs": 1}})
    prepare.run(ctx)
    ctx.env = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    summary = train.run(ctx, 256)[0]
    assert summary["steps"] == 5 and (ctx.train_dir(256, 0) / "run.json").is_file()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "python -m pipeline sync" in err[0] and f"127.0.0.1:{port}" in err[0]


@pytest.mark.slow
def test_a_model_left_pending_is_sent_again_and_loads(ctx_factory):
    """The state an upload cut short leaves (a server or its database lost mid-way): the run
    FINISHED and tagged published, its LoggedModel PENDING with no files. Publishing judges the
    model by its state: the stale one goes, a READY one that loads takes its place."""
    import mlflow.pytorch
    import torch
    from mlflow.entities import LoggedModelStatus
    from pipeline.core.models import rebuild_trained
    from pipeline.tracking.sweep import publish_sweep
    ctx = ctx_factory({"train": {"batch_sizes": [256], "epochs": 1}})
    _sweep(ctx)
    client, runs = runs_of(_uri(ctx))
    run = next(r for r in runs if r.data.tags["batchlab.role"] == "train")
    exp = run.info.experiment_id
    (ready,) = client.search_logged_models([exp])
    client.delete_logged_model(ready.model_id)
    stale = client.create_logged_model(exp, name="cut-short", source_run_id=run.info.run_id)
    assert stale.status == LoggedModelStatus.PENDING
    before = check_published(_uri(ctx), ctx.workdir)

    publish_sweep(ctx, rebuild_trained)
    models = client.search_logged_models([exp])
    assert [m.status for m in models] == [LoggedModelStatus.READY] and models[0].model_id != stale.model_id
    mlflow.set_tracking_uri(_uri(ctx))
    net = mlflow.pytorch.load_model(f"models:/{models[0].model_id}")
    x = torch.load(ctx.train_dir(256, 0) / "input_example.pt", weights_only=True)
    assert net(x).shape[0] == x.shape[0]
    assert check_published(_uri(ctx), ctx.workdir) == before
    publish_sweep(ctx, rebuild_trained)  # once whole, again changes nothing
    assert [m.model_id for m in client.search_logged_models([exp])] == [models[0].model_id]
