import math
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import env_for, make_project, runs_of, SMALL, merge
from pipeline.stages import compare
from pipeline.stages import evaluate
from pipeline.stages import prepare
from pipeline.stages import train
from pipeline.context import read_json
from pipeline.stages.evaluate import load_trained, predict
from pipeline.core.data import load_prepared


def _uri(ctx):
    return f"sqlite:///{ctx.workdir / 'mlflow.db'}"


def _run_id(ctx, bs: int, seed: int = 0) -> str:
    """The MLflow run of a training, found by the record id its outputs hold."""
    record = read_json(ctx.train_dir(bs, seed) / "run.json")["record"]
    _, runs = runs_of(_uri(ctx))
    return next(r.info.run_id for r in runs if r.data.tags.get("batchlab.record") == record)


def test_sweep_in_process_files_children_under_one_parent(ctx_factory, monkeypatch, tmp_path):
    ctx = ctx_factory()
    prepare.run(ctx)
    summaries = {bs: train.run(ctx, bs)[0] for bs in ctx.params.train.batch_sizes}
    # evaluate publishes to the store the stage's own env names, even when the process environment
    # names another.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    for bs in ctx.params.train.batch_sizes:
        evaluate.run(ctx, bs)
    evaluate.run(ctx, ctx.params.train.batch_sizes[0])  # again, as `dvc repro --force` would: no new point
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert not (tmp_path / "elsewhere.db").exists()
    result = compare.run(ctx)

    client, runs = runs_of(_uri(ctx))
    parents = [r for r in runs if r.data.tags.get("batchlab.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("batchlab.role") == "train"]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert all(r.info.status == "FINISHED" for r in runs)
    # The same metric keys in every child, so Compare in the UI lines them up.
    keys = [set(c.data.metrics) for c in children]
    assert keys[0] == keys[1] and {"train/loss", "val/acc", "test_acc", "throughput"} <= keys[0]
    for child in children:
        _check_training_run(client, child, parent, summaries)
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "compare")} >= {
        "compare/report.html", "compare/sweep.csv"}
    assert "sweep/best_test_acc" in client.get_run(parent.info.run_id).data.metrics
    assert "final_train_loss" in keys[0]
    assert not {"batch_size", "world_size"} & keys[0]
    report = (ctx.compare_dir / "report.html").read_text()
    assert "Critical batch size" in report and "data:image/png;base64," in report
    assert len(result["rows"]) == 2


def _check_training_run(client, child, parent, summaries):
    """One training's run: one point per step at samples seen, its test figure, tags, params, files."""
    bs = int(child.data.params["batch_size"])
    steps = summaries[bs]["steps"]
    assert steps == 2 * math.ceil(1257 / bs)
    history = client.get_metric_history(child.info.run_id, "train/loss")
    # Fewer steps than tracking.max_points: one point per optimizer step, at samples seen.
    assert len(history) == steps
    assert max(m.step for m in history) == 2 * 1257
    assert len(client.get_metric_history(child.info.run_id, "test_acc")) == 1
    for tag in ("batchlab.git_commit", "batchlab.version.torch", "batchlab.version.mlflow",
                "batchlab.version.dvc"):
        assert tag in child.data.tags
    assert child.data.params["seed"] == "0"
    assert child.data.params["data.hash"] == parent.data.params["data.hash"]
    assert "device" in child.data.params
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id, "outputs")}
    assert "outputs/steps.csv" in artifacts
    assert {a.path for a in client.list_artifacts(child.info.run_id, "evaluate")} >= {
        "evaluate/evaluation.png", "evaluate/metrics.json"}


def test_logged_model_is_a_logged_model_with_signature(ctx_factory):
    import mlflow
    ctx = ctx_factory({"train": {"batch_sizes": [64], "epochs": 1}})
    prepare.run(ctx)
    train.run(ctx, 64)
    client, runs = runs_of(_uri(ctx))
    child = next(r for r in runs if r.data.tags.get("batchlab.role") == "train")
    models = mlflow.search_logged_models(experiment_ids=[child.info.experiment_id], output_format="list")
    assert len(models) == 1 and models[0].source_run_id == child.info.run_id
    assert child.info.run_name == "bs64-s0"
    assert models[0].name == f"bs64-s0-{child.data.tags['batchlab.sweep_key'][:8]}"  # unique across sweeps
    loaded = mlflow.pytorch.load_model(f"models:/{models[0].model_id}")
    x = load_prepared(ctx.data_dir).test.x[:3]
    assert loaded(x).shape == (3, 10)


def test_predictions_do_not_depend_on_inference_batch_size(ctx_factory):
    ctx = ctx_factory({"train": {"batch_sizes": [32], "epochs": 1}})
    prepare.run(ctx)
    train.run(ctx, 32, log_to_mlflow=False)
    data = load_prepared(ctx.data_dir)
    model = load_trained(ctx, 32, 0, data.n_features, data.n_outputs)
    ref = predict(model, data.test.x, len(data.test.x))
    for bs in (1, 7, 32, 1000):
        out = predict(model, data.test.x, bs)
        assert torch.equal(out.argmax(1), ref.argmax(1))
        assert torch.allclose(out, ref, atol=1e-5)


def test_named_linear_configuration_recovers_w_2_and_b_1(ctx_factory):
    """The tutorial's example 1, by name: configs/linear.yaml."""
    import yaml
    from conftest import REPO
    from pipeline.config import parse_params
    ctx = ctx_factory()
    ctx.params = parse_params(yaml.safe_load((REPO / "configs" / "linear.yaml").read_text())
                              | {"tracking": {"experiment": "test"}})
    prepare.run(ctx)
    s = train.run(ctx, 10)[0]
    m = evaluate.run(ctx, 10)[0]
    assert abs(s["weight"] - 2) < 0.05 and abs(s["bias"] - 1) < 0.05
    assert m["test_r2"] > 0.99
    client, runs = runs_of(_uri(ctx))
    child = next(r for r in runs if r.data.tags.get("batchlab.role") == "train")
    assert abs(child.data.metrics["weight"] - 2) < 0.05
    assert abs(child.data.metrics["bias"] - 1) < 0.05


def test_bad_batch_size_with_drop_last_is_refused_before_any_run(ctx_factory):
    from pipeline.config import ParamsError
    ctx = ctx_factory({"train": {"drop_last": True}})
    prepare.run(ctx)
    with pytest.raises(ParamsError, match="at most 1257"):
        train.run(ctx, 5000)
    _, runs = runs_of(_uri(ctx))
    assert not [r for r in runs if r.data.tags.get("batchlab.role") == "train"]


def _start_train(proj, bs):
    return subprocess.Popen([sys.executable, "-m", "pipeline", "train", "--batch-size", str(bs)],
                            cwd=proj, env=env_for(proj), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.slow
def test_sigterm_marks_run_killed_then_rerun_resumes_to_identical_metrics(tmp_path):
    params = merge(SMALL, {"train": {"batch_sizes": [1], "epochs": 3, "checkpoint_every_steps": 200,
                                     "noise_scale": False}})
    proj = make_project(tmp_path / "a", params, git=False)
    ref = make_project(tmp_path / "b", params, git=False)
    for p in (proj, ref):
        subprocess.run([sys.executable, "-m", "pipeline", "prepare"], cwd=p, env=env_for(p), check=True,
                       capture_output=True)
    subprocess.run([sys.executable, "-m", "pipeline", "train", "--batch-size", "1"], cwd=ref,
                   env=env_for(ref), check=True, capture_output=True)

    proc = _start_train(proj, 1)
    ckpt = proj / "checkpoints" / "bs1-s0.pt"
    deadline = time.monotonic() + 180
    while not ckpt.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert ckpt.exists(), "no checkpoint was written"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "resume" in err
    client, runs = runs_of(f"sqlite:///{proj / 'mlflow.db'}")
    child = next(r for r in runs if r.data.tags.get("batchlab.role") == "train")
    assert child.info.status == "KILLED"
    assert "SIGTERM" in child.data.tags["batchlab.end_reason"]
    # The run page's "Source" and "Created by": the stage's command, the user.
    assert child.data.tags["mlflow.source.name"] == "python -m pipeline train --batch-size 1"
    assert child.data.tags["mlflow.source.type"] == "LOCAL" and child.data.tags["mlflow.user"]
    assert not (proj / "outputs" / "train" / "bs1" / "seed0" / "summary.json").exists()

    subprocess.run([sys.executable, "-m", "pipeline", "train", "--batch-size", "1"], cwd=proj,
                   env=env_for(proj), check=True, capture_output=True)
    resumed = read_json(proj / "outputs" / "train" / "bs1" / "seed0" / "summary.json")
    full = read_json(ref / "outputs" / "train" / "bs1" / "seed0" / "summary.json")
    assert resumed["resumed_from_step"] > 0
    for key in ("final_train_loss", "final_val_loss", "final_val_acc", "steps", "samples"):
        assert resumed[key] == full[key], key
    a = (proj / "outputs" / "train" / "bs1" / "seed0" / "steps.csv").read_text().splitlines()
    b = (ref / "outputs" / "train" / "bs1" / "seed0" / "steps.csv").read_text().splitlines()
    column = a[0].split(",").index("loss")
    assert [r.split(",")[column] for r in a] == [r.split(",")[column] for r in b]
    _, runs = runs_of(f"sqlite:///{proj / 'mlflow.db'}")
    children = [r for r in runs if r.data.tags.get("batchlab.role") == "train"]
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    assert children[0].data.tags.get("batchlab.resumed") == "true"
    assert not ckpt.exists()


def test_reproduce_matches_step_by_step_and_refuses_other_data(ctx_factory, capsys):
    from pipeline.tools.reproduce import Refused, run as reproduce
    ctx = ctx_factory({"train": {"batch_sizes": [32], "epochs": 1}})
    prepare.run(ctx)
    train.run(ctx, 32)
    run_id = _run_id(ctx, 32)
    assert reproduce(ctx, run_id, log=lambda m: None) is True

    other = ctx_factory({"data": {"seed": 5}}, folder="work")
    prepare.run(other)
    with pytest.raises(Refused, match="data differ"):
        reproduce(other, run_id)


def test_reproduce_refuses_when_the_user_model_file_changed(ctx_factory, monkeypatch, tmp_path):
    from pipeline.tools.reproduce import Refused, run as reproduce
    code = "from torch import nn\ndef net(num_classes=10):\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))\n"
    ctx = ctx_factory({"model": {"_target_": "mine_repro.net", "code": "mine_repro.py"},
                       "train": {"batch_sizes": [32], "epochs": 1}})
    (ctx.workdir / "mine_repro.py").write_text(code)
    monkeypatch.syspath_prepend(str(ctx.workdir))
    prepare.run(ctx)
    train.run(ctx, 32)
    run_id = _run_id(ctx, 32)
    assert reproduce(ctx, run_id, log=lambda m: None) is True
    (ctx.workdir / "mine_repro.py").write_text(code + "# edited\n")
    with pytest.raises(Refused, match="model code differs: mine_repro.py has sha256"):
        reproduce(ctx, run_id)


def test_reproduce_reports_a_mismatch(ctx_factory, monkeypatch):
    from pipeline.tools import reproduce as rep
    ctx = ctx_factory({"train": {"batch_sizes": [64], "epochs": 1}})
    prepare.run(ctx)
    train.run(ctx, 64)
    run_id = _run_id(ctx, 64)
    real = rep._recorded_steps

    def altered(client, rid):
        steps = real(client, rid)
        steps["loss"][3] += 1e-7
        return steps
    monkeypatch.setattr(rep, "_recorded_steps", altered)
    lines = []
    assert rep.run(ctx, run_id, log=lines.append) is False
    assert "first at optimizer step 4" in lines[-1]


def test_exception_marks_run_failed_with_reason(ctx_factory):
    from pipeline.core.signals import NonFiniteLoss
    ctx = ctx_factory({"train": {"batch_sizes": [16], "optimizer": "sgd", "lr": 1e30}})
    prepare.run(ctx)
    with pytest.raises(NonFiniteLoss):
        train.run(ctx, 16)
    _, runs = runs_of(_uri(ctx))
    child = next(r for r in runs if r.data.tags.get("batchlab.role") == "train")
    assert child.info.status == "FAILED"
    assert "NonFiniteLoss" in child.data.tags["batchlab.end_reason"]
    assert not ctx.train_dir(16).exists()


def test_evaluate_that_fails_at_a_later_seed_writes_and_publishes_no_figures(ctx_factory):
    """A seed's folder cannot be written: the stage fails with the reason, no seed's metrics.json
    is written and nothing reaches the training runs."""
    ctx = ctx_factory({"train": {"batch_sizes": [64], "seeds": [0, 1], "epochs": 1}})
    prepare.run(ctx)
    train.run(ctx, 64)
    blocker = ctx.eval_dir(64, 1)
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("a file where seed 1's folder goes")
    with pytest.raises(FileExistsError):
        evaluate.run(ctx, 64)
    _, runs = runs_of(_uri(ctx))
    children = [r for r in runs if r.data.tags.get("batchlab.role") == "train"]
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    assert not [k for r in children for k in r.data.metrics if k.startswith("test_")]
    assert not (ctx.eval_dir(64, 0) / "metrics.json").exists()


def test_seeds_are_repeats_under_one_parent_and_the_report_gives_intervals(ctx_factory):
    ctx = ctx_factory({"train": {"batch_sizes": [16, 128], "seeds": [0, 1], "epochs": 1}})
    prepare.run(ctx)
    for bs in (16, 128):
        summaries = train.run(ctx, bs)
        assert [s["seed"] for s in summaries] == [0, 1]
        assert summaries[0]["final_train_loss"] != summaries[1]["final_train_loss"]
        evaluate.run(ctx, bs)
    result = compare.run(ctx)
    client, runs = runs_of(_uri(ctx))
    parent = next(r for r in runs if r.data.tags.get("batchlab.role") == "sweep")
    children = [r for r in runs if r.data.tags.get("batchlab.role") == "train"]
    assert sorted(r.data.tags["mlflow.runName"] for r in children) == ["bs128-s0", "bs128-s1", "bs16-s0", "bs16-s1"]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    # Memory that measures the batch: the same bytes per sample, so a step at 128 holds ~8x one at 16.
    rows = {r["batch_size"]: r for r in result["rows"]}
    assert abs(rows[128]["bytes_per_sample"] / rows[16]["bytes_per_sample"] - 1) < 0.01
    assert rows[128]["step_memory_bytes"] > 7.9 * rows[16]["step_memory_bytes"]
    assert rows[16]["n"] == 2 and rows[16]["test_acc_ci"] > 0
    per_size = client.get_metric_history(parent.info.run_id, "by_batch_size/test_acc")
    assert sorted(m.step for m in per_size) == [16, 128]
    # Each interval under the prefix of its own section on the run page, none among the means.
    ci = {m.step: m.value for m in client.get_metric_history(parent.info.run_id, "by_batch_size_ci/test_acc")}
    assert ci[16] == rows[16]["test_acc_ci"]
    assert not [k for k in client.get_run(parent.info.run_id).data.metrics if k.startswith("by_batch_size/")
                and k.endswith("_ci")]
    report = (ctx.compare_dir / "report.html").read_text()
    assert " ± " in report and "The tutorial's claims, checked" in report and "Critical batch size" in report
    header = (ctx.compare_dir / "sweep.csv").read_text().splitlines()[0].split(",")
    assert {"test_acc", "test_acc_ci", "step_memory_bytes_ci"} <= set(header)


# The train stage's start, then a parallel multiply of subnormal floats (2**-139, made from its bits:
# no float arithmetic) on two threads: how many results stay non-zero. OpenMP's threads take the
# setting from the thread that starts them, so the stage must set it before its first parallel
# work, or the second thread would keep computing them.
PROBE = ("import torch; from pipeline.config import load_params; from pipeline.context import Context; "
         "from pipeline.stages import train; ctx = Context.from_environment(load_params('params.yaml')); "
         "train.prepare_jobs(ctx, 16, (0,)); assert torch.get_num_threads() == 2; "
         "sub = torch.full((1 << 22,), 1024, dtype=torch.int32).view(torch.float32); "
         "print(int((sub * 1.0).count_nonzero()))")


@pytest.mark.slow
@pytest.mark.parametrize("flush", [True, False])
def test_subnormals_are_flushed_on_every_thread_of_a_training_process(tmp_path, flush):
    params = merge(SMALL, {"train": {"threads": 2, "flush_denormal": flush}})
    proj = make_project(tmp_path / "p", params, git=False)
    subprocess.run([sys.executable, "-m", "pipeline", "prepare"], cwd=proj, env=env_for(proj), check=True,
                   capture_output=True)
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=proj, env=env_for(proj), check=True,
                         capture_output=True, text=True).stdout
    assert int(out.split()[-1]) == (0 if flush else 1 << 22)


def test_a_learning_rate_grid_trains_every_rate_and_compares_each_batch_size_at_its_best(ctx_factory):
    """train.lr_grid adds an axis: every (batch size, lr, seed) is a run of its own, in its own
    folder and MLflow run, once; compare picks each batch size's rate on validation alone and
    reports the sweep at those rates."""
    import csv
    import statistics
    from conftest import check_published

    grid = [0.001, 0.01]
    ctx = ctx_factory({"train": {"lr_grid": grid, "seeds": [0, 1], "batch_sizes": [64]}})
    prepare.run(ctx)
    for bs in ctx.params.train.batch_sizes:
        summaries = train.run(ctx, bs)
        assert [(s["lr"], s["seed"]) for s in summaries] == [(lr, s) for lr in grid for s in (0, 1)]
        evaluate.run(ctx, bs)
    compare.run(ctx)

    assert (ctx.workdir / "outputs/train/bs64/lr0.01/seed1/model.pt").is_file()
    assert check_published(_uri(ctx), ctx.workdir)["train_runs"] == 4
    _, runs = runs_of(_uri(ctx))
    children = [r for r in runs if r.data.tags.get("batchlab.role") == "train"]
    assert sorted(r.info.run_name for r in children) == sorted(
        f"bs64-lr{lr:g}-s{s}" for lr in grid for s in (0, 1))
    assert {(r.data.params["lr"], r.data.tags["batchlab.lr"]) for r in children} == {("0.001", "0.001"), ("0.01", "0.01")}

    # The choice, recomputed from the validation figures alone.
    want = {}
    for bs in (64,):
        val = {lr: statistics.fmean(read_json(ctx.train_dir(bs, s, lr) / "summary.json")["final_val_acc"]
                                    for s in (0, 1)) for lr in grid}
        want[bs] = max(grid, key=lambda lr: val[lr])
    metrics = read_json(ctx.compare_dir / "metrics.json")
    assert metrics["best_lr"] == {str(bs): lr for bs, lr in want.items()}
    with (ctx.compare_dir / "sweep.csv").open() as fh:
        assert {int(r["batch_size"]): float(r["lr"]) for r in csv.DictReader(fh)} == want
    with (ctx.compare_dir / "runs.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 4
    parent = next(r for r in runs if r.data.tags.get("batchlab.role") == "sweep")
    assert {k: v for k, v in parent.data.metrics.items() if k.startswith("sweep/best_lr_bs")} == {
        f"sweep/best_lr_bs{bs}": lr for bs, lr in want.items()}
    report = (ctx.compare_dir / "report.html").read_text()
    assert "chosen on the validation split" in report and "<th>lr 0.01</th>" in report
    assert "widen train.lr_grid" in report  # two rates: the chosen one is always at an edge
    assert report.index("Use batch size") < report.index("Conclusions")
