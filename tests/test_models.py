"""Your model and your data: torchvision models by name, the user's own class by ``_target_``,
data in its real on-disk formats, transforms and augmentation, precision and layout settings."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, SMALL, env_for, make_project, merge, runs_of, sh
from pipeline.config import ParamsError, parse_params
from pipeline.core.data import load_prepared
from pipeline.core.sources import build_splits
from pipeline.core.models import build_model, check_model
from pipeline.core.transforms import BatchAugment
from pipeline.tools.samplefiles import write_cifar, write_imagefolder


def test_torchvision_model_by_name_takes_its_classes_from_the_data_and_its_keywords_from_params():
    p = parse_params({"model": {"name": "resnet18", "zero_init_residual": True}}).model
    check_model(p)
    model = build_model(p, (3, 16, 16), 7)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 7)
    assert float(model.layer1[0].bn2.weight.detach().abs().sum()) == 0  # zero_init_residual reached the model
    with pytest.raises(ParamsError, match="model.name='resnet1': not a built-in or torchvision model"):
        check_model(parse_params({"model": {"name": "resnet1"}}).model)


def test_user_target_gets_in_channels_and_classes_from_the_data_unless_given():
    target = {"_target_": "examples.mymodels.nets.SmallCNN", "code": "examples/mymodels/nets.py", "width": 4}
    p = parse_params({"model": target}).model
    check_model(p, REPO)
    model = build_model(p, (3, 8, 8), 5)
    assert model.features[0].in_channels == 3 and model.head.out_features == 5
    given = build_model(parse_params({"model": target | {"num_classes": 9}}).model, (3, 8, 8), 5)
    assert given.head.out_features == 9


BAD_TARGETS = {
    "missing module": ({"_target_": "nosuch.nets.Net"}, "model._target_='nosuch.nets.Net': no module 'nosuch'"),
    "missing name": ({"_target_": "mine.nets.Nope", "code": "mine/nets.py"}, "mine.nets has no 'Nope'"),
    "not callable": ({"_target_": "mine.nets.WIDTH", "code": "mine/nets.py"}, "is a int, not a class or function"),
    "bad keyword": ({"_target_": "mine.nets.Net", "code": "mine/nets.py", "widht": 3},
                    "model.widht=3: mine.nets.Net takes no keyword 'widht' (allowed: num_classes, width)"),
    "not a Module": ({"_target_": "mine.nets.make_dict", "code": "mine/nets.py"},
                     "returned a dict, not a torch.nn.Module"),
}
USER_MODULE = '''from torch import nn
WIDTH = 3
class Net(nn.Module):
    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.fc = nn.Linear(64, num_classes)
    def forward(self, x):
        return self.fc(x.flatten(1))
def make_dict(num_classes=10):
    return {"not": "a module"}
'''


@pytest.mark.slow
def test_five_bad_targets_stop_with_one_line_exit_2_and_no_mlflow_run(tmp_path):
    """Each through the first stage a sweep runs (prepare: the parent run would be made there) and
    through train, the first to build the network on the real data."""
    proj = make_project(tmp_path / "p", SMALL, git=False)
    (proj / "mine").mkdir()
    (proj / "mine" / "nets.py").write_text(USER_MODULE)
    script = ("import json, sys; from pipeline.__main__ import main\n"
              "cases = json.loads(sys.argv[1]); out = {}\n"
              "for name, model in cases.items():\n"
              "    sets = [a for k, v in model.items() for a in ('--set', f'model.{k}={json.dumps(v)}')]\n"
              "    out[name] = [main([verb, *extra, *sets]) for verb, extra in (('prepare', []), ('train', ['--batch-size', '16']))]\n"
              "print(json.dumps(out))\n")
    cases = {name: model for name, (model, _) in BAD_TARGETS.items()}
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], cwd=proj, env=env_for(proj),
                          capture_output=True, text=True, timeout=300)
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert codes == {name: [2, 2] for name in BAD_TARGETS}, proc.stderr
    assert len(lines) == 2 * len(BAD_TARGETS), lines  # one line each, no traceback
    for (name, (_, needle)), pair in zip(BAD_TARGETS.items(), zip(lines[::2], lines[1::2])):
        assert all(needle in line for line in pair), (name, pair)
    assert not (proj / "data" / "prepared").exists()
    assert runs_of(f"sqlite:///{proj / 'mlflow.db'}", "test")[1] == [] if (proj / "mlflow.db").exists() else True


def test_imagefolder_of_pngs_becomes_image_tensors_with_a_test_split_carved_when_absent(tmp_path):
    write_imagefolder(tmp_path / "with", per_class=6, size=8, test_per_class=2)
    write_imagefolder(tmp_path / "without", per_class=10, size=8)
    task, splits = build_splits(parse_params({"data": {"name": "imagefolder", "root": str(tmp_path / "with")}}).data)
    assert task == "classification"
    assert splits["train"][0].shape[1:] == (3, 8, 8) and splits["train"][0].dtype == np.uint8
    assert len(splits["test"][0]) == 8 and len(splits["train"][0]) + len(splits["val"][0]) == 24
    _, carved = build_splits(parse_params({"data": {"name": "imagefolder", "root": str(tmp_path / "without"),
                                                    "test_fraction": 0.25}}).data)
    assert len(carved["test"][0]) == 10 and sum(len(s[0]) for s in carved.values()) == 40
    resized = parse_params({"data": {"name": "imagefolder", "root": str(tmp_path / "with"),
                                     "transforms": [{"Resize": {"size": [4, 4]}}, "Grayscale"]}}).data
    assert build_splits(resized)[1]["train"][0].shape[1:] == (1, 4, 4)


def test_bad_image_files_and_transforms_are_named_in_one_line(tmp_path):
    from pipeline.config import DataError
    root = write_imagefolder(tmp_path / "tree", per_class=3, size=8)
    from PIL import Image
    Image.new("RGB", (5, 5)).save(root / "train" / "rings" / "odd.png")
    with pytest.raises(DataError, match=r"odd.png: \(3, 5, 5\) after data.transforms.*Resize"):
        build_splits(parse_params({"data": {"name": "imagefolder", "root": str(root)}}).data)
    (root / "train" / "rings" / "odd.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="odd.png: cannot be read as an image"):
        build_splits(parse_params({"data": {"name": "imagefolder", "root": str(root),
                                            "transforms": [{"Resize": {"size": [8, 8]}}]}}).data)
    with pytest.raises(ParamsError, match=r"data.transforms\[0\]='Blur': not a torchvision.transforms.v2"):
        build_splits(parse_params({"data": {"name": "imagefolder", "root": str(root), "transforms": ["Blur"]}}).data)


def test_cifar_python_batches_are_read_and_a_malformed_one_is_named(tmp_path):
    write_cifar(tmp_path, n_train=50, n_test=20)
    task, splits = build_splits(parse_params({"data": {"name": "cifar10", "root": str(tmp_path)}}).data)
    assert splits["train"][0].shape[1:] == (3, 32, 32) and len(splits["test"][0]) == 20
    assert len(splits["train"][0]) + len(splits["val"][0]) == 50
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    from pipeline.config import DataError
    with pytest.raises(DataError, match="data_batch_3: not a CIFAR python batch"):
        build_splits(parse_params({"data": {"name": "cifar10", "root": str(tmp_path)}}).data)


def test_image_data_is_normalised_per_channel_on_train(ctx_factory, tmp_path):
    write_imagefolder(tmp_path / "tree", per_class=8, size=8)
    ctx = ctx_factory({"data": {"name": "imagefolder", "root": str(tmp_path / "tree")}})
    from pipeline.stages import prepare
    manifest = prepare.run(ctx)
    assert manifest["sample_shape"] == [3, 8, 8] and len(manifest["normalisation"]["mean"]) == 3
    x = load_prepared(ctx.data_dir).train.x
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std((0, 2, 3)), torch.ones(3), atol=1e-2)


def test_batch_augmentation_draws_per_sample_and_repeats_for_the_same_batch():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4).repeat(32, 1, 1, 1)
    aug = BatchAugment([{"RandomHorizontalFlip": {"p": 0.5}}, {"RandomCrop": {"size": 4, "padding": 1}}], seed=0)
    a, b = aug(x, epoch=0, batch=3), aug(x, epoch=0, batch=3)
    assert torch.equal(a, b)  # a resumed run augments a batch as the uninterrupted one did
    assert not torch.equal(a, aug(x, epoch=1, batch=3))
    flips = BatchAugment(["RandomHorizontalFlip"], seed=0)(x, 0, 0)
    flipped = (flips == x.flip(3)).flatten(1).all(1)
    assert 0 < int(flipped.sum()) < len(x)  # some samples flipped, not all: per sample, not per batch
    with pytest.raises(ParamsError, match=r"train.augment\[0\]='ColorJitter': not a batch-wise augmentation"):
        BatchAugment(["ColorJitter"], seed=0)


@pytest.mark.parametrize("settings", [{"precision": "bf16"}, {"precision": "fp16"}, {"channels_last": True},
                                      pytest.param({"compile": "default"}, marks=pytest.mark.slow)])
def test_precision_and_layout_settings_train_a_cnn_on_cpu(ctx_factory, settings):
    from pipeline.stages import prepare, train
    ctx = ctx_factory({"model": {"_target_": "examples.mymodels.nets.SmallCNN", "code": "examples/mymodels/nets.py",
                                 "width": 4}, "train": {"batch_sizes": [64], "epochs": 1} | settings})
    ctx.workdir.joinpath("examples").symlink_to(REPO / "examples")
    prepare.run(ctx)
    summary = train.run(ctx, 64, log_to_mlflow=False)[0]
    assert summary["steps"] == 20 and np.isfinite(summary["final_train_loss"])
    params = json.loads((ctx.train_dir(64, 0) / "run.json").read_text())["params"]
    for key, value in settings.items():
        assert params[f"train.{key}"] == str(value)


TINY = '''"""A user's network, in a folder of its own."""
from torch import nn


class TinyCNN(nn.Module):
    def __init__(self, in_channels=1, num_classes=10, width=4):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.conv(x).relu().mean((2, 3)))
'''


@pytest.mark.slow
def test_user_model_on_a_png_tree_through_mlflow_run_and_dvc_repro(tmp_path):
    """Both doors, a user's module and an ImageFolder of PNGs; editing the module retrains, editing
    anything else of the user's does not; every run reaches the store once."""
    from conftest import check_published, sh
    proj = make_project(tmp_path / "p", merge(SMALL, {"train": {"epochs": 1}}), git=False)
    (proj / "mymodels").mkdir()
    (proj / "mymodels" / "tiny.py").write_text(TINY)
    (proj / "mymodels" / "notes.py").write_text("# not the model\n")
    write_imagefolder(proj / "data" / "raw" / "tree", per_class=10, size=8, test_per_class=3)
    user = merge(SMALL, {"data": {"name": "imagefolder", "root": "data/raw/tree",
                                  "transforms": [{"Resize": {"size": [8, 8]}}]},
                         "model": {"_target_": "mymodels.tiny.TinyCNN", "code": "mymodels/tiny.py", "width": 6},
                         "train": {"batch_sizes": [8], "epochs": 2, "target_value": 0.3,
                                   "augment": [{"RandomCrop": {"size": 8, "padding": 1}}]}})
    import yaml
    (proj / "user.yaml").write_text(yaml.safe_dump(user))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "init"]):
        sh(cmd, proj)
    uri = f"sqlite:///{proj / 'mlflow.db'}"

    out = sh([sys.executable.replace("python", "mlflow"), "run", ".", "--env-manager", "local", "--experiment-name",
              "test", "-P", "params_file=user.yaml"], proj, timeout=600)
    assert "-S model._target_=mymodels.tiny.TinyCNN" in out.stderr
    assert "Data and pipelines are up to date" in sh(["dvc", "status"], proj).stdout
    assert check_published(uri, proj)["runs"] == 1
    _, runs = runs_of(uri, "test")
    train_runs = [r for r in runs if r.data.tags.get("batchlab.role") == "train"]
    assert {r.data.params["model._target_"] for r in train_runs} == {"mymodels.tiny.TinyCNN"}
    # Keys the user's network does not read are not recorded as if they described it.
    parent = next(r for r in runs if r.data.tags.get("batchlab.role") == "sweep")
    for run in (*train_runs, parent):
        assert "model.name" not in run.data.params and "model.hidden_sizes" not in run.data.params
        assert run.data.params["model.width"] == "6"
    assert {r.data.params["data.name"] for r in train_runs} == {"imagefolder"}
    recorded_hash = train_runs[0].data.params["model.code_sha256"]
    summary = json.loads((proj / "outputs" / "train" / "bs8" / "seed0" / "summary.json").read_text())
    assert summary["steps"] == 2 * 5  # 36 of the 40 training images (10 % to val): ceil(36 / 8) an epoch

    (proj / "mymodels" / "notes.py").write_text("# edited, still not the model\n")
    assert "up to date" in sh(["dvc", "status"], proj).stdout
    (proj / "mymodels" / "tiny.py").write_text(TINY + "# a comment changes the file\n")
    status = sh(["dvc", "status"], proj).stdout
    assert "train@8" in status and "evaluate@8" in status and "mymodels/tiny.py" in status

    sh(["dvc", "repro"], proj, timeout=600)
    assert "Data and pipelines are up to date" in sh(["dvc", "status"], proj).stdout
    published = check_published(uri, proj)
    assert published["runs"] == 1
    _, runs = runs_of(uri, "test")
    latest = {r.data.params["model.code_sha256"] for r in runs if r.data.tags.get("batchlab.role") == "train"
              and r.data.tags.get("batchlab.record") in {json.loads(f.read_text())["record"]
                                                         for f in (proj / "outputs" / "train").glob("bs*/seed*/run.json")}}
    assert len(latest) == 1 and latest != {recorded_hash}
    assert (proj / "outputs" / "compare" / "report.html").is_file()


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_a_split_over_the_memory_budget_streams_through_workers_with_the_same_batches(ctx_factory, workers):
    """Streamed (memory-mapped file, DataLoader workers, normalised per batch) or loaded whole:
    the same losses at every step, so resume and reproduce hold either way."""
    from pipeline.stages import prepare, train
    losses = {}
    for budget in (4096, 0.01):
        ctx = ctx_factory({"train": {"batch_sizes": [32], "epochs": 2, "memory_budget_mb": budget,
                                     "num_workers": workers, "persistent_workers": workers > 0,
                                     "augment": [{"RandomCrop": {"size": 8, "padding": 1}}]}},
                          folder=f"b{budget}")
        prepare.run(ctx)
        train.run(ctx, 32, log_to_mlflow=False)
        run = json.loads((ctx.train_dir(32, 0) / "run.json").read_text())
        assert run["params"]["data_path"] == ("tensor" if budget > 1 else "stream")
        steps = (ctx.train_dir(32, 0) / "steps.csv").read_text().splitlines()
        column = steps[0].split(",").index("loss")
        losses[budget] = [row.split(",")[column] for row in steps[1:]]
    assert len(losses[4096]) == 2 * 40 and losses[4096] == losses[0.01]


USER_DATASET = '''import torch
from PIL import Image


class Squares(torch.utils.data.Dataset):
    """Items (PIL image, class id): a bright square top-left (class 0) or bottom-right (class 1)."""

    def __init__(self, root, train=True, n=40):
        self.n, self.offset = n, 0 if train else 1000

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        label = (i + self.offset) % 2
        img = Image.new("L", (6, 6))
        img.paste(255, (0, 0, 3, 3) if label == 0 else (3, 3, 6, 6))
        return img, label
'''


def test_a_user_dataset_class_by_target_is_read_once_with_its_own_test_split(tmp_path, monkeypatch):
    (tmp_path / "mydata.py").write_text(USER_DATASET)
    monkeypatch.syspath_prepend(str(tmp_path))
    from pipeline.core.sources import check_data
    p = parse_params({"data": {"_target_": "mydata.Squares", "code": "mydata.py", "n": 30}}).data
    check_data(p, tmp_path)
    task, splits = build_splits(p)
    assert task == "classification" and splits["train"][0].shape[1:] == (1, 6, 6)
    assert len(splits["test"][0]) == 30 and len(splits["train"][0]) + len(splits["val"][0]) == 30
    with pytest.raises(ParamsError, match="data.nn=30: mydata.Squares takes no keyword 'nn'"):
        build_splits(parse_params({"data": {"_target_": "mydata.Squares", "code": "mydata.py", "nn": 30}}).data)
    with pytest.raises(ParamsError, match="data.code='pipeline/core/datasets.py': data._target_ mydata.Squares is defined in mydata.py"):
        check_data(parse_params({"data": {"_target_": "mydata.Squares"}}).data, tmp_path)
    with pytest.raises(ParamsError, match=r"data.n=3: unknown key"):
        parse_params({"data": {"n": 3}})


EVIL_MODULE = '''from pathlib import Path
def make(path="MARKER") -> str:
    Path(path).write_text("called")
    return "not a network"
'''


@pytest.mark.slow
def test_a_target_that_is_not_a_model_maker_is_refused_uncalled(tmp_path):
    """os.system, builtins.eval, subprocess.run and a project function annotated to return a str,
    each with arguments that would write a marker file: refused with one line, exit 2, by prepare
    and by train, and the marker never appears (nothing was called)."""
    proj = make_project(tmp_path / "p", SMALL, git=False)
    (proj / "mine").mkdir()
    (proj / "mine" / "evil.py").write_text(EVIL_MODULE)
    marker = proj / "MARKER"
    cases = {"os.system": {"_target_": "os.system", "command": f"touch {marker}"},
             "builtins.eval": {"_target_": "builtins.eval", "source": f"open({str(marker)!r}, 'w')"},
             "subprocess.run": {"_target_": "subprocess.run", "args": ["touch", str(marker)]},
             "str function": {"_target_": "mine.evil.make", "code": "mine/evil.py", "path": str(marker)}}
    for name, model in cases.items():
        sets = [a for k, v in model.items() for a in ("--set", f"model.{k}={json.dumps(v)}")]
        for verb in (["prepare"], ["train", "--batch-size", "16"]):
            proc = subprocess.run([sys.executable, "-m", "pipeline", *verb, *sets], cwd=proj, env=env_for(proj),
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode == 2, (name, proc.stderr)
            (line,) = proc.stderr.strip().splitlines()
            assert f"model._target_={model['_target_']!r}" in line and "it was not called" in line, line
            assert not marker.exists(), name
    assert not (proj / "data" / "prepared").exists()


def _gray_tree(root, size: int = 28, per_class: int = 12, classes: int = 3):
    """Single-channel PNGs (mode L), as MNIST's are: root/train/<class>/*.png."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / "train" / f"c{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            img = (rng.random((size, size)) * 60).astype(np.uint8)
            img[:, c * size // classes:(c + 1) * size // classes] += 180  # the class: a bright band
            Image.fromarray(img, mode="L").save(folder / f"{i:03d}.png")
    return root


CNN = {"_target_": "examples.mymodels.nets.MnistCNN", "code": "examples/mymodels/nets.py"}


@pytest.mark.slow
def test_a_grayscale_png_tree_is_one_channel_and_trains_a_one_channel_cnn(tmp_path):
    """No transform: the files are grayscale, so the samples have one channel, prepare says so,
    and the CNN gets in_channels=1 from the data."""
    proj = make_project(tmp_path / "p", merge(SMALL, {
        "data": {"name": "imagefolder", "root": str(_gray_tree(tmp_path / "gray")), "transforms": []},
        "model": CNN, "train": {"batch_sizes": [8], "epochs": 1}}), git=False)
    shutil.copytree(REPO / "examples" / "mymodels", proj / "examples" / "mymodels")
    env = env_for(proj)
    out = sh([sys.executable, "-m", "pipeline", "prepare"], proj, env=env).stdout
    assert "samples of shape [1, 28, 28]" in out, out
    sh([sys.executable, "-m", "pipeline", "train", "--batch-size", "8"], proj, env=env)
    weights = torch.load(proj / "outputs/train/bs8/seed0/model.pt", weights_only=True)
    assert weights["features.0.weight"].shape[1] == 1  # the first convolution takes one channel
    assert json.loads((proj / "outputs/train/bs8/seed0/run.json").read_text())["sample_shape"] == [1, 28, 28]


@pytest.mark.slow
def test_a_28_pixel_cnn_given_32_pixel_images_is_refused_before_prepare_writes(tmp_path):
    proj = make_project(tmp_path / "p", merge(SMALL, {
        "data": {"name": "imagefolder", "root": str(_gray_tree(tmp_path / "gray")),
                 "transforms": [{"Resize": {"size": [32, 32]}}]}, "model": CNN}), git=False)
    shutil.copytree(REPO / "examples" / "mymodels", proj / "examples" / "mymodels")
    proc = sh([sys.executable, "-m", "pipeline", "prepare"], proj, env=env_for(proj), check=False)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    print(line)
    assert "examples.mymodels.nets.MnistCNN" in line and "[2, 1, 32, 32]" in line and "head.0 (Linear)" in line
    assert not (proj / "data" / "prepared").exists()
    assert not (proj / "mlflow.db").exists() or runs_of(f"sqlite:///{proj / 'mlflow.db'}", "test")[1] == []
