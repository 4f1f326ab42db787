import json

import torch

from pipeline import bench


def test_bench_reports_every_row_and_the_json_shape(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "N_SAMPLES", 4096)
    monkeypatch.setattr(bench, "N_VAL", 256)
    result = bench.run_bench([64, 512], seconds=0.15, repeats=1, device=torch.device("cpu"), log=lambda m: None)
    rows = result["rows"]
    assert {(r["loader"], r["batch_size"]) for r in rows} == {(l, b) for l in bench.LOADERS for b in (64, 512)}
    assert all(r["samples_per_s"] > 0 for r in rows)
    assert all(r["peak_memory_bytes"] > 0 for r in rows if r["loader"] == "pipeline")
    assert result["logging_overhead"]["batch_size"] == 8
    assert isinstance(result["threads"], int) and result["device"].startswith("cpu")
    json.dumps(result)
    text = bench.table(result)
    assert "3/1" in text and "logging overhead" in text and "512" in text


def test_tutorial_dataset_matches_torchvision_transform():
    images, labels = bench.synthetic()
    ds = bench.TutorialDataset(images[:3], labels[:3])
    x, y = ds[1]
    assert x.shape == (1, 28, 28) and y == int(labels[1])
    expected = (torch.from_numpy(images[1]).float() / 255 - bench.MEAN) / bench.STD
    assert torch.allclose(x[0], expected, atol=1e-6)
