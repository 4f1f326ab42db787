"""The built-in data sets' raw sources: each reads files in their own format (or makes the data)
and returns raw arrays per split. This file is ``data.code``'s default, a dep of the prepare
stage; a user's Dataset class (``data._target_``) takes its place there."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from ..config import DataError, DataParams

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
            ds = datasets.ImageFolder(str(root / split), transform=prep, loader=_channels_as_stored)
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
            if xs and img.shape[1:] != xs[0].shape[1:]:
                raise DataError(f"{path}: {tuple(img.shape)} after data.transforms, but {ds.samples[0][0]} is "
                                f"{tuple(xs[0].shape)}; give one size, e.g. data.transforms: "
                                f"[{{Resize: {{size: [32, 32]}}}}, {{CenterCrop: {{size: 32}}}}]")
            xs.append(img.as_subclass(torch.Tensor))
        if not xs:
            raise DataError(f"{root / split}: no images found")
        out[split] = (xs, np.asarray(ds.targets, dtype=np.int64))
    # Grayscale files give one channel, colour files three; a tree of both gives three throughout.
    channels = max(x.shape[0] for xs, _ in out.values() for x in xs)
    return {split: (torch.stack([x.expand(channels, *x.shape[1:]) for x in xs]).numpy(), y)
            for split, (xs, y) in out.items()}


GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F")


def _channels_as_stored(path: str):
    """An image file as PIL reads it, in the channels it holds: grayscale stays one channel (L)
    where torchvision's default loader would make every image RGB; anything else becomes RGB."""
    from PIL import Image
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("L" if img.mode in GRAYSCALE_MODES else "RGB")



_CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}  # torchvision's


def check_present(p: DataParams) -> None:
    """The data's files are where the params say (cheap: no file is read), or will be downloaded:
    one line before any work where they are not."""
    if p.target is not None or p.name in ("digits", "linear"):
        return
    root = Path(p.root)
    if p.name == "imagefolder":
        if not (root / "train").is_dir():
            raise DataError(f"data.name='imagefolder': {root / 'train'}/ not found (allowed: a folder "
                            f"root/train/<class>/ of images, and optionally root/test/<class>/)")
        return
    if p.download:
        return
    folder = idx_folder(p.name, root) if p.name in _TORCHVISION_CLASS else root / _CIFAR_FOLDERS[p.name]
    if not folder.is_dir():
        raise DataError(f"data.name={p.name!r}: {folder}/ not found (allowed: the files in torchvision's layout "
                        f"there, or data.download=true)")


def read(p: DataParams) -> tuple[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The task and raw arrays: ``train`` and maybe ``test`` (files with a test split of their
    own), or ``all`` (split later with the data seed)."""
    if p.name in _TORCHVISION_CLASS:
        return "classification", _torchvision(p.name, p)
    if p.name in ("cifar10", "cifar100"):
        return "classification", _cifar(p.name, p)
    if p.name == "imagefolder":
        return "classification", _imagefolder(p)
    if p.name == "digits":
        return "classification", {"all": _digits()}
    return "regression", {"all": _linear(p)}
