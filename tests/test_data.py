import json
import struct

import pytest
import torch

from conftest import write_idx
from pipeline.stages import prepare
from pipeline.config import DataParams
from pipeline.core.data import DataError, load_prepared, write_prepared
from pipeline.core.sources import build_splits


def test_digits_prepare_writes_tensors_manifest_and_hashes(ctx_factory):
    ctx = ctx_factory()
    manifest = prepare.run(ctx)
    files = sorted(p.name for p in ctx.data_dir.iterdir())
    assert files == ["manifest.json", "test.pt", "train.pt", "val.pt"]
    splits = manifest["splits"]
    assert splits["train"]["n"] + splits["val"]["n"] + splits["test"]["n"] == 1797
    assert sum(splits["train"]["class_counts"].values()) == splits["train"]["n"]
    assert manifest["n_features"] == 64 and manifest["n_classes"] == 10
    data = load_prepared(ctx.data_dir)
    # Normalisation statistics come from the training split alone.
    assert abs(float(data.train.x.mean())) < 1e-4
    assert abs(float(data.train.x.std()) - 1) < 1e-3
    assert abs(float(data.val.x.mean())) > 1e-6


def test_prepare_is_deterministic_for_a_seed(ctx_factory):
    a = prepare.run(ctx_factory(folder="a"))
    b = prepare.run(ctx_factory(folder="b"))
    c = prepare.run(ctx_factory({"data": {"seed": 1}}, folder="c"))
    assert a["data_hash"] == b["data_hash"]
    assert a["data_hash"] != c["data_hash"]


def test_altered_or_truncated_file_is_refused_by_name(ctx_factory):
    ctx = ctx_factory()
    prepare.run(ctx)
    path = ctx.data_dir / "train.pt"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="train.pt.*does not match the manifest"):
        load_prepared(ctx.data_dir)


def test_missing_manifest_says_run_prepare(tmp_path):
    with pytest.raises(DataError, match="run the prepare stage first"):
        load_prepared(tmp_path)


def test_linear_data_is_the_tutorials_regression():
    task, splits = build_splits(DataParams(name="linear", linear_samples=500, linear_noise=0.0))
    x, y = splits["train"]
    assert task == "regression"
    assert torch.allclose(torch.from_numpy(y), 2 * torch.from_numpy(x) + 1, atol=1e-5)


def test_mnist_from_local_idx_files(ctx_factory):
    ctx = ctx_factory({"data": {"name": "mnist", "val_fraction": 0.2}})
    root = ctx.workdir / "raw"
    write_idx(root / "MNIST" / "raw", n_train=60, n_test=20)
    ctx = ctx_factory({"data": {"name": "mnist", "root": str(root), "val_fraction": 0.2}})
    manifest = prepare.run(ctx)
    assert manifest["splits"]["train"]["n"] == 48
    assert manifest["splits"]["val"]["n"] == 12
    assert manifest["splits"]["test"]["n"] == 20
    assert manifest["n_features"] == 784


def test_fashion_mnist_uses_its_own_folder(ctx_factory, tmp_path):
    write_idx(tmp_path / "raw" / "FashionMNIST" / "raw")
    ctx = ctx_factory({"data": {"name": "fashion_mnist", "root": str(tmp_path / "raw"), "val_fraction": 0.2}})
    assert prepare.run(ctx)["n_features"] == 784


def test_missing_mnist_files_say_where_to_put_them(ctx_factory, tmp_path):
    ctx = ctx_factory({"data": {"name": "mnist", "root": str(tmp_path / "nowhere")}})
    with pytest.raises(DataError) as err:
        prepare.run(ctx)
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in str(err.value)
    assert "data.download=true" in str(err.value)
    assert not ctx.data_dir.exists()


@pytest.mark.parametrize("damage, needle", [
    (lambda p: p.write_bytes(struct.pack(">I", 0x999) + p.read_bytes()[4:]), "wrong magic number"),
    (lambda p: p.write_bytes(p.read_bytes()[:-10]), "expected"),
    (lambda p: p.write_bytes(b"\x00\x00"), "truncated IDX header"),
])
def test_malformed_idx_files_stop_with_clear_error(ctx_factory, tmp_path, damage, needle):
    folder = tmp_path / "raw" / "MNIST" / "raw"
    write_idx(folder)
    damage(folder / "train-images-idx3-ubyte")
    ctx = ctx_factory({"data": {"name": "mnist", "root": str(tmp_path / "raw")}})
    with pytest.raises(DataError, match=needle):
        prepare.run(ctx)


def test_image_and_label_counts_must_match(ctx_factory, tmp_path):
    folder = tmp_path / "raw" / "MNIST" / "raw"
    write_idx(folder, n_train=60)
    write_idx(tmp_path / "other", n_train=50)
    (folder / "train-labels-idx1-ubyte").write_bytes((tmp_path / "other" / "train-labels-idx1-ubyte").read_bytes())
    ctx = ctx_factory({"data": {"name": "mnist", "root": str(tmp_path / "raw")}})
    with pytest.raises(DataError, match="60 images but .* 50 labels"):
        prepare.run(ctx)


def test_failed_write_leaves_previous_data_whole(tmp_path, monkeypatch):
    task, splits = build_splits(DataParams())
    out = tmp_path / "prepared"
    first = write_prepared(out, task, splits, {})
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        write_prepared(out, task, splits, {})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert json.loads((out / "manifest.json").read_text())["data_hash"] == first["data_hash"]
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]


@pytest.fixture
def mirror(tmp_path):
    """Tiny gzipped IDX files served over HTTP from 127.0.0.1, as a mirror serves MNIST."""
    import functools
    import http.server
    import threading

    served = tmp_path / "served"
    write_idx(served, n_train=60, n_test=20, gz=True)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def _md5(path):
    import hashlib
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_fetches_through_torchvision_from_a_mirror(ctx_factory, tmp_path, mirror, monkeypatch):
    from torchvision import datasets
    served, url = mirror
    # torchvision checks each file's md5: here the sums of the tiny files this mirror serves.
    monkeypatch.setattr(datasets.MNIST, "resources",
                        [(name, _md5(served / name)) for name, _ in datasets.MNIST.resources])
    root = tmp_path / "raw"
    ctx = ctx_factory({"data": {"name": "mnist", "root": str(root), "val_fraction": 0.2,
                                "download": True, "mirrors": [url]}})
    assert prepare.run(ctx)["splits"]["test"]["n"] == 20
    assert (root / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()


def test_download_refuses_files_whose_checksum_is_wrong(ctx_factory, tmp_path, mirror):
    _, url = mirror  # torchvision's real MNIST sums: the tiny files do not match them
    ctx = ctx_factory({"data": {"name": "mnist", "root": str(tmp_path / "raw"), "download": True,
                                "mirrors": [url]}})
    with pytest.raises(DataError) as err:
        prepare.run(ctx)
    msg = str(err.value)
    assert "\n" not in msg and "data.download" in msg and "corrupted" in msg
    assert not ctx.data_dir.exists()
