"""bench's image rows: training samples/s on an ImageFolder of PNGs, the pipeline's tensor path
(decoded once at prepare, batches cut from memory) against torch's DataLoader decoding the files
per sample with 0, 1 and 2 worker processes (pinned memory on a GPU, persistent workers): what a
data set that does not fit in memory would cost, where the tutorial's advice (workers, pinning)
is measured rather than assumed."""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import TrainParams
from ..core.data import Split
from ..core.compute import make_optimizer
from .rates import fit_rate, loader_rate

WORKERS = (0, 1, 2)
N_PER_CLASS, SIZE = 250, 32
PARAMS = TrainParams(max_steps=10**9, stop_at_target=False, lr=1e-3, optimizer="adam", noise_scale=False)


def _cnn() -> nn.Module:
    """Two 3x3 convolutions and a linear head: small enough that reading the data can matter."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32, 4))


def _cnn_and_optimizer(device) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _cnn().to(device)
    return model, make_optimizer(PARAMS, model, PARAMS.lr)


def image_rows(batch_sizes: list[int], seconds: float, repeats: int, device: torch.device) -> dict[str, Any]:
    from torchvision import datasets
    from torchvision.transforms import v2

    from ..config import DataParams
    from ..core.sources import build_splits
    from .samplefiles import write_imagefolder

    with tempfile.TemporaryDirectory() as tmp:
        root = write_imagefolder(Path(tmp) / "tree", per_class=N_PER_CLASS, size=SIZE)
        t0 = time.perf_counter()
        _, splits = build_splits(DataParams(name="imagefolder", root=str(root), val_fraction=0.01,
                                            test_fraction=0.01))
        decode_seconds = time.perf_counter() - t0
        x_raw, y = splits["train"]
        x = torch.from_numpy(x_raw).float()
        mean, std = x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).tolist()
        x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        train = Split(x, torch.from_numpy(y))
        folder = datasets.ImageFolder(str(root / "train"), transform=v2.Compose(
            [v2.ToImage(), v2.ToDtype(torch.float32), v2.Normalize(mean, std)]))
        per = seconds / repeats
        rates: dict[tuple[str, int], list[float]] = {}
        for _ in range(repeats):
            for bs in batch_sizes:
                rates.setdefault(("tensor", bs), []).append(
                    fit_rate(_cnn(), train, Split(x[:64], train.y[:64]), PARAMS, bs, device, per))
                for w in WORKERS:
                    loader = torch.utils.data.DataLoader(
                        folder, batch_size=bs, shuffle=True, num_workers=w, pin_memory=device.type == "cuda",
                        persistent_workers=w > 0)
                    rates.setdefault((f"loader{w}", bs), []).append(
                        loader_rate(loader, device, per, _cnn_and_optimizer))
                    del loader
    rows = [{"batch_size": bs, **{name: statistics.median(rates[(name, bs)])
                                  for name in ("tensor", *(f"loader{w}" for w in WORKERS))}}
            for bs in batch_sizes]
    return {"images": len(folder), "size": SIZE, "decode_seconds": decode_seconds, "rows": rows,
            "seconds_per_cell": per}


def lines(result: dict[str, Any] | None) -> list[str]:
    if not result:
        return []
    out = [f"ImageFolder of {result['images']:,} PNGs ({result['size']}x{result['size']} RGB), a small CNN: "
           f"training samples/s, tensor path (decoded once at prepare: {result['decode_seconds']:.1f} s) vs "
           f"DataLoader decoding each file, cells of {result['seconds_per_cell']:.1f} s",
           f"{'batch':>6} {'tensor':>9} " + " ".join(f"{f'loader w={w}':>12}" for w in WORKERS)]
    for r in result["rows"]:
        out.append(f"{r['batch_size']:>6} {r['tensor']:>9,.0f} " +
                   " ".join(f"{r[f'loader{w}']:>12,.0f}" for w in WORKERS))
    return out
