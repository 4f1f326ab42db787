"""Data sets, the prepared-tensor format and its manifest.

Prepared data lives in one folder: ``train.pt``, ``val.pt``, ``test.pt`` (tensors ``x`` and
``y``, stored raw) and ``manifest.json`` (shapes, class counts, normalisation fitted on the
training split, sha256 of each file). Loading checks every hash and normalises once.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import DataError, DataParams
from ..context import MANIFEST, read_manifest, swap_dir  # noqa: F401  (read_manifest, as before)

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # float32, normalised, (n, *sample_shape): (n, C, H, W) for images
    y: torch.Tensor  # int64 class ids, or float32 (n, 1) targets

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device: torch.device | str) -> "Split":
        return Split(self.x.to(device), self.y.to(device))


@dataclass(frozen=True)
class Prepared:
    train: Split
    val: Split
    test: Split
    manifest: dict[str, Any]

    @property
    def task(self) -> str:
        return self.manifest["task"]

    @property
    def n_features(self) -> int:
        return int(self.manifest["n_features"])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest.get("sample_shape") or (self.n_features,))

    @property
    def n_outputs(self) -> int:
        return int(self.manifest["n_classes"]) if self.task == "classification" else 1

    @property
    def data_hash(self) -> str:
        return self.manifest["data_hash"]


# ---------------------------------------------------------------- raw sources

def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32)[:, None], bunch.target.astype(np.int64)  # (n, 1, 8, 8)


def _linear(p: DataParams) -> tuple[np.ndarray, np.ndarray]:
    gen = torch.Generator().manual_seed(p.seed)
    x = torch.randn(p.linear_samples, 1, generator=gen)
    y = 2 * x + 1 + torch.randn(p.linear_samples, 1, generator=gen) * p.linear_noise
    return x.numpy(), y.numpy()


IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_TORCHVISION_CLASS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


def idx_folder(name: str, root: str | Path) -> Path:
    return Path(root) / _TORCHVISION_CLASS[name] / "raw"


def check_idx(path: Path, magic: int, ndim: int) -> int:
    """Check an IDX file's header and size; return its item count. Clear errors, no traceback."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(4 + 4 * ndim)
    if len(head) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header ({size} bytes)")
    got = struct.unpack(">I", head[:4])[0]
    if got != magic:
        raise DataError(f"{path}: wrong magic number {got} (expected {magic}, an IDX file of uint8 with {ndim} dims)")
    dims = struct.unpack(f">{ndim}I", head[4:])
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if size != expected:
        raise DataError(f"{path}: {size} bytes, expected {expected} for dims {list(dims)}")
    return dims[0]


def _torchvision(name: str, p: DataParams) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from torchvision import datasets

    folder = idx_folder(name, p.root)
    missing = [f for pair in IDX_FILES.values() for f in pair if not (folder / f).is_file()]
    if missing and p.download:
        _download(name, p)
        missing = [f for pair in IDX_FILES.values() for f in pair if not (folder / f).is_file()]
    if missing:
        raise DataError(
            f"data.name={name!r}: files not found under {folder}/: {', '.join(missing)}. "
            f"Put the uncompressed IDX files there (torchvision's layout), or set data.download=true."
        )
    for split, (images, labels) in IDX_FILES.items():
        n_img = check_idx(folder / images, 0x00000803, 3)
        n_lab = check_idx(folder / labels, 0x00000801, 1)
        if n_img != n_lab:
            raise DataError(f"{folder / images}: {n_img} images but {folder / labels} has {n_lab} labels")
    cls = getattr(datasets, _TORCHVISION_CLASS[name])
    out = {}
    for split in IDX_FILES:
        ds = cls(p.root, train=split == "train", download=False)
        out[split] = (ds.data[:, None].numpy(), ds.targets.numpy().astype(np.int64))  # (n, 1, 28, 28) uint8
    return out


def _download(name: str, p: DataParams) -> None:
    """torchvision's own download: its files, its md5 sums, from data.mirrors when given."""
    from torchvision import datasets

    base = getattr(datasets, _TORCHVISION_CLASS[name])
    # Same class name: torchvision derives the folder (root/MNIST/raw) from it.
    cls = type(base.__name__, (base,), {"mirrors": [m.rstrip("/") + "/" for m in p.mirrors]}) if p.mirrors else base
    try:
        cls(p.root, train=True, download=True)
    except RuntimeError as err:
        first = " ".join(str(err).split())[:300]
        raise DataError(f"data.download: fetching {name} failed ({first}); check data.mirrors or put the "
                        f"files under {idx_folder(name, p.root)}/") from None


def _cifar(name: str, p: DataParams) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """CIFAR-10/100 from their python batches under ``root/<torchvision's folder>``. Read here
    rather than by torchvision's class, which accepts only the published files' md5 sums; the
    prepared tensors are what is hashed and checked from then on."""
    import pickle

    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    folder = Path(p.root) / cls.base_folder
    names = [f for f, _ in cls.train_list + cls.test_list]
    if any(not (folder / f).is_file() for f in names) and p.download:
        try:
            cls(p.root, train=True, download=True)
        except RuntimeError as err:
            raise DataError(f"data.download: fetching {name} failed ({' '.join(str(err).split())[:300]})") from None
    missing = [f for f in names if not (folder / f).is_file()]
    if missing:
        raise DataError(f"data.name={name!r}: files not found under {folder}/: {', '.join(missing)}. Put the "
                        f"python batches there (torchvision's layout), or set data.download=true.")
    out = {}
    for split, files in (("train", cls.train_list), ("test", cls.test_list)):
        xs, ys = [], []
        for fname, _ in files:
            path = folder / fname
            try:
                with path.open("rb") as fh:
                    entry = pickle.load(fh, encoding="latin1")
                x = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                y = np.asarray(entry["labels"] if "labels" in entry else entry["fine_labels"], dtype=np.int64)
            except Exception as err:  # any malformed file: its name and what was wrong, one line
                raise DataError(f"{path}: not a CIFAR python batch ({type(err).__name__}: "
                                f"{' '.join(str(err).split())[:200]})") from None
            if len(x) != len(y):
                raise DataError(f"{path}: {len(x)} images but {len(y)} labels")
            xs.append(x)
            ys.append(y)
        out[split] = (np.concatenate(xs), np.concatenate(ys))
    return out


def _imagefolder(p: DataParams) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``root/train/<class>/*`` (and ``root/test/<class>/*`` when present), decoded by
    torchvision's ImageFolder, through the params' transforms, into one uint8 tensor per split."""
    from torchvision import datasets
    from torchvision.transforms import v2

    from .transforms import compose

    root = Path(p.root)
    if not (root / "train").is_dir():
        raise DataError(f"data.name='imagefolder': {root / 'train'}/ not found (allowed: a folder root/train/<class>/ "
                        f"of images, and optionally root/test/<class>/)")
    prep = v2.Compose([v2.ToImage(), *compose(p.transforms, "data.transforms")])
    out, classes = {}, None
    for split in ("train", "test"):
        if not (root / split).is_dir():
            continue
        try:
            ds = datasets.ImageFolder(str(root / split), transform=prep)
        except (FileNotFoundError, OSError) as err:
            raise DataError(f"{root / split}: {' '.join(str(err).split())[:300]}") from None
        if classes is not None and ds.classes != classes:
            raise DataError(f"{root / 'test'}: classes {ds.classes} differ from {root / 'train'}'s {classes}")
        classes = ds.classes
        xs = []
        for i, (path, _) in enumerate(ds.samples):  # once, at prepare; training reads the tensor
            try:
                img = ds[i][0]
            except Exception as err:
                raise DataError(f"{path}: cannot be read as an image ({type(err).__name__}: {err})") from None
            if xs and img.shape != xs[0].shape:
                raise DataError(f"{path}: {tuple(img.shape)} after data.transforms, but {ds.samples[0][0]} is "
                                f"{tuple(xs[0].shape)}; give one size, e.g. data.transforms: "
                                f"[{{Resize: {{size: [32, 32]}}}}, {{CenterCrop: {{size: 32}}}}]")
            xs.append(img.as_subclass(torch.Tensor))
        if not xs:
            raise DataError(f"{root / split}: no images found")
        out[split] = (torch.stack(xs).numpy(), np.asarray(ds.targets, dtype=np.int64))
    return out


def _transformed(p: DataParams, raw: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The params' transforms on whole (n, C, H, W) tensors (image folders apply them per file)."""
    if not p.transforms or p.name == "imagefolder":
        return raw
    from torchvision.transforms import v2

    from .transforms import compose
    t = v2.Compose(compose(p.transforms, "data.transforms"))
    return {k: (t(torch.from_numpy(x)).numpy(), y) for k, (x, y) in raw.items()}


def build_splits(p: DataParams) -> tuple[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Return the task and raw (unnormalised) train/val/test arrays, split with the data seed."""
    from sklearn.model_selection import train_test_split

    if p.name in _TORCHVISION_CLASS or p.name in ("cifar10", "cifar100", "imagefolder"):
        raw = (_torchvision(p.name, p) if p.name in _TORCHVISION_CLASS
               else _imagefolder(p) if p.name == "imagefolder" else _cifar(p.name, p))
        raw = _transformed(p, raw)
        x, y = raw["train"]
        stratify = y if np.bincount(y).min(initial=0) >= 2 else None
        if "test" not in raw:  # an image folder without test/: carved from train with the data seed
            x, x_te, y, y_te = train_test_split(x, y, test_size=p.test_fraction, random_state=p.seed, stratify=stratify)
            raw["test"] = (x_te, y_te)
            stratify = y if np.bincount(y).min(initial=0) >= 2 else None
        x_tr, x_va, y_tr, y_va = train_test_split(
            x, y, test_size=p.val_fraction, random_state=p.seed, stratify=stratify)
        return "classification", {"train": (x_tr, y_tr), "val": (x_va, y_va), "test": raw["test"]}
    if p.name == "digits":
        task, (x, y) = "classification", _digits()
        x, y = _transformed(p, {"all": (x, y)})["all"]
    else:
        task, (x, y) = "regression", _linear(p)
    stratify = y if task == "classification" else None
    x_rest, x_te, y_rest, y_te = train_test_split(
        x, y, test_size=p.test_fraction, random_state=p.seed, stratify=stratify)
    val_share = p.val_fraction / (1 - p.test_fraction)
    stratify = y_rest if task == "classification" else None
    x_tr, x_va, y_tr, y_va = train_test_split(
        x_rest, y_rest, test_size=val_share, random_state=p.seed, stratify=stratify)
    return task, {"train": (x_tr, y_tr), "val": (x_va, y_va), "test": (x_te, y_te)}


# ---------------------------------------------------------------- prepared format

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_prepared(out_dir: Path, task: str, splits: dict[str, tuple[np.ndarray, np.ndarray]],
                   source: dict[str, Any]) -> dict[str, Any]:
    """Write tensors and manifest into a temporary folder, then swap it in whole."""
    x_train = splits["train"][0]
    if task == "classification":
        # Per channel, like torchvision's Normalize((0.1307,), (0.3081,)); one channel: one scalar.
        mean, std = _channel_stats(x_train)
    else:
        # The regression keeps raw inputs so that the fitted w and b are the tutorial's 2 and 1.
        mean, std = 0.0, 1.0
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        files: dict[str, Any] = {}
        for name in SPLITS:
            x, y = splits[name]
            tensors = {"x": torch.from_numpy(np.ascontiguousarray(x)),
                       "y": torch.from_numpy(np.ascontiguousarray(y))}
            torch.save(tensors, tmp / f"{name}.pt")
            entry: dict[str, Any] = {"file": f"{name}.pt", "n": int(x.shape[0]),
                                     "x_shape": list(x.shape), "x_dtype": str(x.dtype),
                                     "sha256": sha256_file(tmp / f"{name}.pt")}
            if task == "classification":
                values, counts = np.unique(y, return_counts=True)
                entry["class_counts"] = {str(int(v)): int(c) for v, c in zip(values, counts)}
            files[name] = entry
        n_classes = int(max(int(splits[s][1].max()) for s in SPLITS) + 1) if task == "classification" else 0
        manifest = {
            "task": task,
            "n_features": int(np.prod(x_train.shape[1:])),
            "sample_shape": [int(d) for d in x_train.shape[1:]],
            "n_classes": n_classes,
            "normalisation": {"mean": mean, "std": std, "fitted_on": "train"},
            "splits": files,
            "source": source,
        }
        manifest["data_hash"] = hashlib.sha256(
            json.dumps({k: files[k]["sha256"] for k in SPLITS} | {"norm": [mean, std]},
                       sort_keys=True).encode()).hexdigest()
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        swap_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _channel_stats(x: np.ndarray) -> tuple[float | list[float], float | list[float]]:
    """Mean and std over the training split, per channel of (n, C, H, W) images; in chunks, so
    that a large uint8 set is never copied whole as float64."""
    channels = x.shape[1] if x.ndim == 4 else 1
    flat = x.reshape(x.shape[0], channels, -1) if x.ndim == 4 else x.reshape(x.shape[0], 1, -1)
    total, sq = np.zeros(channels), np.zeros(channels)
    for i in range(0, len(flat), 4096):
        chunk = flat[i:i + 4096].astype(np.float64)
        total += chunk.sum(axis=(0, 2))
        sq += (chunk ** 2).sum(axis=(0, 2))
    count = flat.shape[0] * flat.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(sq / count - mean ** 2, 0))
    std[std == 0] = 1.0
    if channels == 1:
        return float(mean[0]), float(std[0])
    return mean.tolist(), std.tolist()


def _normalise(x: torch.Tensor, norm: dict[str, Any]) -> torch.Tensor:
    mean, std = torch.tensor(norm["mean"]), torch.tensor(norm["std"])
    if mean.ndim:  # per channel of (n, C, H, W)
        mean, std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
    return (x.to(torch.float32) - mean) / std


def load_prepared(data_dir: Path, splits: tuple[str, ...] = SPLITS) -> Prepared:
    """Load prepared splits, verifying each file's sha256 against the manifest."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    norm = manifest["normalisation"]
    loaded: dict[str, Split] = {}
    for name in SPLITS:
        if name not in splits:
            continue
        entry = manifest["splits"][name]
        path = data_dir / entry["file"]
        if not path.is_file():
            raise DataError(f"{path} is missing (listed in {data_dir / MANIFEST}); rerun prepare")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise DataError(f"{path}: sha256 {digest[:12]}… does not match the manifest's "
                            f"{entry['sha256'][:12]}…: the file was altered or truncated; rerun prepare")
        tensors = torch.load(path, weights_only=True)
        x = _normalise(tensors["x"], norm)
        y = tensors["y"]
        y = y.to(torch.int64) if manifest["task"] == "classification" else y.to(torch.float32).reshape(-1, 1)
        loaded[name] = Split(x.contiguous(), y.contiguous())
    empty = Split(torch.empty(0, *(manifest.get("sample_shape") or [manifest["n_features"]])), torch.empty(0))
    return Prepared(loaded.get("train", empty), loaded.get("val", empty), loaded.get("test", empty), manifest)
