import json
from contextlib import nullcontext

import pytest

import torch

from pipeline.tools import bench
from pipeline.core.engine import NullSink


def test_bench_reports_every_row_and_the_json_shape(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "N_SAMPLES", 4096)
    monkeypatch.setattr(bench, "N_VAL", 256)
    monkeypatch.setattr(bench, "LOGGING_CELL_MIN", 0.0)
    result = bench.run_bench([64, 512], seconds=0.15, repeats=1, device=torch.device("cpu"), log=lambda m: None,
                             sink_factory=lambda name: nullcontext(NullSink()))
    rows = [r for r in result["rows"] if not r["loader"].startswith("compute")]
    assert {(r["loader"], r["batch_size"]) for r in rows} == {(l, b) for l in bench.LOADERS for b in (64, 512)}
    assert all(r["samples_per_s"] > 0 for r in result["rows"])
    assert all(r["peak_memory_bytes"] > 0 for r in rows if r["loader"] == "pipeline")
    cores = result["cores"]
    for bs in (64, 512):
        # The limit is the best of the compute-only rates over every thread count, and says which.
        computes = {r["threads"]: r["samples_per_s"] for r in result["rows"]
                    if r["loader"].startswith("compute") and r["batch_size"] == bs}
        assert sorted(computes) == list(range(1, cores + 1))
        (limit,) = [r for r in rows if r["loader"] == "limit" and r["batch_size"] == bs]
        assert limit["samples_per_s"] == max(computes.values()) and computes[limit["threads"]] == limit["samples_per_s"]
        (tut,) = [r for r in rows if r["loader"] == "tutorial" and r["batch_size"] == bs]
        assert tut["threads"] == bench.DEFAULT_THREADS
    assert result["logging_overhead"]["batch_size"] == 8
    assert result["device"].startswith("cpu")
    json.dumps(result)
    text = bench.table(result)
    assert "pipe/limit" in text and "logging overhead" in text and "512" in text


def test_tutorial_dataset_matches_torchvision_transform():
    images, labels = bench.synthetic()
    ds = bench.TutorialDataset(images[:3], labels[:3])
    x, y = ds[1]
    assert x.shape == (1, 28, 28) and y == int(labels[1])
    expected = (torch.from_numpy(images[1]).float() / 255 - bench.MEAN) / bench.STD
    assert torch.allclose(x[0], expected, atol=1e-6)


@pytest.mark.slow
def test_stage_bench_times_the_real_train_and_evaluate_stages(tmp_path):
    """The fixed-cost line comes from real stage processes: their outputs say how long the
    optimizer steps took, and the wall time is more than that."""
    from pipeline.tools import stagebench

    fixed = stagebench.fixed_cost({"model": {"name": "mlp", "hidden_sizes": [16]},
                                   "train": {"batch_sizes": [64], "seeds": [0], "epochs": 1}})
    assert fixed["seeds"] == 1 and 0 < fixed["train_step_seconds"] < fixed["train_wall_seconds"]
    assert fixed["train_fixed_seconds"] == fixed["train_wall_seconds"] - fixed["train_step_seconds"]
    assert fixed["evaluate_wall_seconds"] > 0
    text = "\n".join(stagebench.lines(fixed, []))
    assert "fixed cost on digits at batch size 64 (1 seeds)" in text


def test_memory_line_is_the_growth_per_added_training_image():
    from pipeline.tools import stagebench

    row = {"batch_size": 512, "epochs": 2, "samples_per_s": 1.0, "stage_wall_seconds": 1.0, "peak_rss_bytes": 2**30}
    small = row | {"train_samples": 10_000, "training_peak_bytes": 500 * 2**20}
    big = row | {"train_samples": 50_000, "training_peak_bytes": 500 * 2**20 + 40_000 * 3_136}
    text = "\n".join(stagebench.lines(None, [small, big]))
    assert "3,136 bytes per added training image = 1.00 x" in text


def test_bench_without_tracking_runs_where_mlflow_is_not_installed(tmp_path):
    """`bench --no-tracking` is what runs on a lent GPU machine, which has torch but no MLflow:
    here MLflow is made unimportable, and the bench must neither need it nor write a store."""
    import os
    import shutil
    import subprocess
    import sys

    from conftest import REPO

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    code = ("import sys; sys.modules['mlflow'] = None\n"
            "from pipeline.__main__ import main\n"
            "sys.exit(main(['bench', '--no-tracking', '--batch-sizes', '64', '--seconds', '0.2',"
            " '--repeats', '1', '--ranks', '1', '--no-images', '--json', 'b.json']))")
    # The inherited environment stays (a machine may find packages through PYTHONPATH); the
    # project goes first on the path.
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "logging overhead: not measured (--no-tracking)" in proc.stdout
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["logging_overhead"] is None and "fixed_cost" not in result
    assert {r["loader"] for r in result["rows"] if r["batch_size"] == 64} >= set(bench.LOADERS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "params.yaml"]


@pytest.mark.slow
def test_cnn_rows_set_the_pipeline_beside_torchvision_and_the_limit_on_the_same_pngs(monkeypatch):
    from pipeline.tools import imagebench
    monkeypatch.setattr(imagebench, "N_PER_CLASS", 6)
    monkeypatch.setattr(imagebench, "CELL_SECONDS", 0.3)
    result = imagebench.image_rows([8], seconds=0.1, repeats=1, device=torch.device("cpu"))
    assert result["images"] == 6 * imagebench.CLASSES  # the files torchvision reads: every one written
    assert result["size"] == 28 and result["forward_mflop"] > 10  # the 2-conv MNIST network's work
    (row,) = result["rows"]
    for key in ("torchvision", "steps", "loop", "limit", *(f"torchvision{w}" for w in imagebench.WORKERS)):
        assert row[key] > 0, key
    assert row["limit"] == max(v for k, v in row.items() if k.startswith("compute"))
    assert row["torchvision"] == row[f"torchvision{row['workers']}"]
    text = "\n".join(imagebench.lines(result))
    assert "pipe loop" in text and "loop/limit" in text and "2-conv MNIST" in text
