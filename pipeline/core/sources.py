"""From raw data to the three raw splits prepare stores: a built-in data set
(``pipeline/core/datasets.py``) or the user's own ``Dataset`` class (``data._target_``), the
params' transforms, then the seeded split."""
from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import torch

from ..config import DataError, DataParams, ParamsError


def check_data(p: DataParams, root: Path | str = ".") -> None:
    """A data._target_ imports, is callable and lives in data.code (before any work)."""
    from .targets import check_code, resolve_target
    if p.target is not None:
        check_code(resolve_target(p.target, "data._target_"), p.target, p.code, "data", root)


def _target_splits(p: DataParams) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A user's Dataset: called with the section's other keys, ``root`` (data.root) and
    ``train`` (True, then False for the test split) where its signature takes them; its items
    are (input, class id), inputs tensors, arrays or PIL images of one shape."""
    from .targets import bind, resolve_target

    cls = resolve_target(p.target, "data._target_")
    names = inspect.signature(cls).parameters
    kwargs = ({"root": p.root} if "root" in names and "root" not in p.kwargs else {}) | p.kwargs
    parts = {"train": kwargs | {"train": True}, "test": kwargs | {"train": False}} if "train" in names \
        else {"all": kwargs}
    out = {}
    for split, args in parts.items():
        bind(cls, args, p.target, "data")
        ds = cls(**args)
        if not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__"):
            raise ParamsError(f"data._target_={p.target!r} returned a {type(ds).__name__}, not a Dataset "
                              f"(allowed: an object with __len__ and __getitem__)")
        out[split] = _materialise(ds, p.target)
    return out


def _materialise(ds, target: str) -> tuple[np.ndarray, np.ndarray]:
    """Every item, once, at prepare: inputs stacked into one array, labels into another."""
    from torchvision.transforms import v2

    to_tensor = v2.ToImage()
    xs, ys = [], []
    for i in range(len(ds)):
        item = ds[i]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise DataError(f"data._target_={target!r}: item {i} is a {type(item).__name__}, not (input, class id)")
        x, y = item
        if not isinstance(x, (torch.Tensor, np.ndarray)):
            x = to_tensor(x).as_subclass(torch.Tensor)  # a PIL image -> (C, H, W) uint8
        x = torch.as_tensor(x)
        if xs and x.shape != xs[0].shape:
            raise DataError(f"data._target_={target!r}: item {i} has shape {tuple(x.shape)}, item 0 "
                            f"{tuple(xs[0].shape)}; give one size (data.transforms: [{{Resize: ...}}])")
        if isinstance(y, torch.Tensor):
            y = y.item()
        if isinstance(y, bool) or not isinstance(y, (int, np.integer)):
            raise DataError(f"data._target_={target!r}: item {i}'s label {y!r} is not a class id (an integer)")
        xs.append(x)
        ys.append(int(y))
    if not xs:
        raise DataError(f"data._target_={target!r}: the data set is empty")
    return torch.stack(xs).numpy(), np.asarray(ys, dtype=np.int64)


def _transformed(p: DataParams, raw: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The params' transforms on whole (n, C, H, W) tensors (image folders apply them per file)."""
    if not p.transforms or (p.name == "imagefolder" and p.target is None):
        return raw
    from torchvision.transforms import v2

    from .transforms import compose
    t = v2.Compose(compose(p.transforms, "data.transforms"))
    return {k: (t(torch.from_numpy(x)).numpy(), y) for k, (x, y) in raw.items()}


def build_splits(p: DataParams) -> tuple[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Return the task and raw (unnormalised) train/val/test arrays, split with the data seed."""
    from sklearn.model_selection import train_test_split

    if p.target is not None:
        task, raw = "classification", _target_splits(p)
    else:
        from .datasets import read
        task, raw = read(p)
    raw = _transformed(p, raw)
    if "all" in raw:  # one set: test, then val, carved with the data seed
        x, y = raw["all"]
        strat = y if task == "classification" and _stratifiable(y) else None
        x_rest, x_te, y_rest, y_te = train_test_split(x, y, test_size=p.test_fraction, random_state=p.seed,
                                                      stratify=strat)
        val_share = p.val_fraction / (1 - p.test_fraction)
        strat = y_rest if task == "classification" and _stratifiable(y_rest) else None
        x_tr, x_va, y_tr, y_va = train_test_split(x_rest, y_rest, test_size=val_share, random_state=p.seed,
                                                  stratify=strat)
        return task, {"train": (x_tr, y_tr), "val": (x_va, y_va), "test": (x_te, y_te)}
    x, y = raw["train"]
    if "test" not in raw:  # an image folder without test/: carved from train with the data seed
        x, x_te, y, y_te = train_test_split(x, y, test_size=p.test_fraction, random_state=p.seed,
                                            stratify=y if _stratifiable(y) else None)
        raw["test"] = (x_te, y_te)
    x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=p.val_fraction, random_state=p.seed,
                                              stratify=y if _stratifiable(y) else None)
    return task, {"train": (x_tr, y_tr), "val": (x_va, y_va), "test": raw["test"]}


def _stratifiable(y: np.ndarray) -> bool:
    return np.bincount(y).min(initial=0) >= 2 if y.dtype.kind in "iu" else False
