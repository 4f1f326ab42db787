"""Data sets, the prepared-tensor format and its manifest.

Prepared data lives in one folder: ``train.pt``, ``val.pt``, ``test.pt`` (tensors ``x`` and
``y``, stored raw) and ``manifest.json`` (shapes, class counts, normalisation fitted on the
training split, sha256 of each file). Loading checks every hash and normalises once.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import DataError
from ..context import MANIFEST, read_manifest, swap_dir

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # float32, normalised, (n, *sample_shape): (n, C, H, W) for images
    y: torch.Tensor  # int64 class ids, or float32 (n, 1) targets
    # A streamed split: ``x`` is the stored (uint8) tensor, memory-mapped from its file, and this
    # the normalisation each batch gets as it is read (``normalise``); None: ``x`` is ready.
    norm: dict[str, Any] | None = None

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device: torch.device | str) -> "Split":
        if self.norm is not None:
            return self  # stays on its file; batches move
        return Split(self.x.to(device), self.y.to(device))

    def rows(self, index) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``index`` (a slice or indices), normalised: the same float32 values either way."""
        x = self.x[index]
        return (normalise(x, self.norm) if self.norm is not None else x), self.y[index]


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


def normalise(x: torch.Tensor, norm: dict[str, Any]) -> torch.Tensor:
    mean, std = torch.tensor(norm["mean"]), torch.tensor(norm["std"])
    if mean.ndim:  # per channel of (n, C, H, W)
        mean, std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
    return (x.to(torch.float32) - mean) / std


def streams(data_dir: Path, budget_mb: float) -> bool:
    """Whether the training split, as the float32 tensor training reads, is larger than
    ``budget_mb`` (train.memory_budget_mb) and so streams from its file."""
    manifest = read_manifest(data_dir)
    return int(manifest["splits"]["train"]["n"]) * int(manifest["n_features"]) * 4 > budget_mb * 2**20


def load_prepared(data_dir: Path, splits: tuple[str, ...] = SPLITS, stream_train: bool = False) -> Prepared:
    """Load prepared splits, verifying each file's sha256 against the manifest. ``stream_train``:
    the training split stays in its file (memory-mapped, stored dtype) and is normalised a batch
    at a time as it is read (``Split.rows``)."""
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
        stream = stream_train and name == "train"
        tensors = torch.load(path, weights_only=True, mmap=stream)
        y = tensors["y"]
        y = y.to(torch.int64) if manifest["task"] == "classification" else y.to(torch.float32).reshape(-1, 1)
        if stream:
            loaded[name] = Split(tensors["x"], y.contiguous(), norm)
        else:
            loaded[name] = Split(normalise(tensors["x"], norm).contiguous(), y.contiguous())
    empty = Split(torch.empty(0, *(manifest.get("sample_shape") or [manifest["n_features"]])), torch.empty(0))
    return Prepared(loaded.get("train", empty), loaded.get("val", empty), loaded.get("test", empty), manifest)
