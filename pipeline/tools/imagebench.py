"""bench's CNN rows: PyTorch's two-convolution MNIST network on an ImageFolder of 28x28 PNGs that
the bench writes itself, trained four ways on the same files:

  torchvision   the plain script: ImageFolder + ToImage/ToDtype/Normalize in a DataLoader with
                shuffle=True and 0 or 2 worker processes (pinned memory on a GPU), torch's
                default threads; the better worker count is the row;
  steps         the pipeline's loop on the tensors its prepare stage decodes once, its threads
                chosen by its rule (``system.threads_for``): samples over the optimizer steps' time;
  loop          the same cells: samples over the loop's wall time (validations at the default
                spacing, figures drained, everything the user waits through);
  limit         optimizer steps on one batch already in memory, at every thread count: the best.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..config import TrainParams
from ..core.compute import make_optimizer
from ..core.cost import forward_flops
from ..core.system import cpu_count, threads_for
from .rates import compute_rate, fit_rates, loader_rate

WORKERS = (0, 2)
N_PER_CLASS, SIZE, CLASSES = 200, 28, 10
VAL_FRACTION = 0.1
# A CNN step takes tens of milliseconds on a CPU: cells long enough for tens of steps.
CELL_SECONDS = 4.0
PARAMS = TrainParams(max_steps=10**9, stop_at_target=False, lr=1e-3, optimizer="adam", noise_scale=False)


def _cnn(in_channels: int) -> torch.nn.Module:
    from examples.mymodels.nets import MnistCNN  # the user's own network, as a sweep would name it
    torch.manual_seed(0)
    return MnistCNN(in_channels, CLASSES)


def _prepared(tmp: Path):
    """The PNG tree, prepared as the pipeline's prepare stage does (decoded once, normalised on
    load), and torchvision's ImageFolder over the same files with the same normalisation."""
    from torchvision import datasets
    from torchvision.transforms import v2

    from ..config import DataParams
    from ..core.data import load_prepared, write_prepared
    from ..core.sources import build_splits
    from .samplefiles import write_imagefolder

    root = write_imagefolder(tmp / "tree", per_class=N_PER_CLASS, size=SIZE, n_classes=CLASSES)
    t0 = time.perf_counter()
    task, splits = build_splits(DataParams(name="imagefolder", root=str(root), val_fraction=VAL_FRACTION,
                                           test_fraction=0.01))
    manifest = write_prepared(tmp / "prepared", task, splits, {"name": "imagefolder"})
    data = load_prepared(tmp / "prepared", ("train", "val"))
    decode_seconds = time.perf_counter() - t0
    mean, std = (v if isinstance(v, list) else [v] for v in (manifest["normalisation"][k] for k in ("mean", "std")))
    folder = datasets.ImageFolder(str(root / "train"), transform=v2.Compose(
        [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]))
    return data, folder, decode_seconds


def image_rows(batch_sizes: list[int], seconds: float, repeats: int, device: torch.device) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        data, folder, decode_seconds = _prepared(Path(tmp))
        channels = data.sample_shape[0]
        per = max(seconds / repeats, CELL_SECONDS)
        flops = forward_flops(_cnn(channels), data.train.x[:2])
        cores = cpu_count() if device.type == "cpu" else 1
        rates: dict[tuple[str, int], list[float]] = {}

        def make(dev):
            model = _cnn(channels).to(dev)
            return model, make_optimizer(PARAMS, model, PARAMS.lr)

        for _ in range(repeats):
            for bs in batch_sizes:
                default = torch.get_num_threads()
                for w in WORKERS:
                    loader = torch.utils.data.DataLoader(folder, batch_size=bs, shuffle=True, num_workers=w,
                                                         pin_memory=device.type == "cuda", persistent_workers=w > 0)
                    rates.setdefault((f"torchvision{w}", bs), []).append(loader_rate(loader, device, per, make))
                    del loader
                torch.set_num_threads(threads_for(0, bs * flops, device.type))
                steps, loop = fit_rates(_cnn(channels), data.train, data.val, PARAMS, bs, device, per)
                rates.setdefault(("steps", bs), []).append(steps)
                rates.setdefault(("loop", bs), []).append(loop)
                for t in range(1, cores + 1):
                    torch.set_num_threads(t)
                    rates.setdefault((f"compute{t}", bs), []).append(
                        compute_rate(make, data.train.x[:bs], data.train.y[:bs], device, per))
                torch.set_num_threads(default)
    return {"images": len(folder), "size": SIZE, "channels": channels, "decode_seconds": decode_seconds,
            "forward_mflop": flops / 1e6, "rows": [_row(rates, bs, cores, flops, device) for bs in batch_sizes],
            "seconds_per_cell": per}


def _row(rates: dict, bs: int, cores: int, flops: float, device: torch.device) -> dict[str, Any]:
    """One batch size's medians: the better torchvision worker count, the best thread count."""
    med = {k[0]: statistics.median(v) for k, v in rates.items() if k[1] == bs}
    best_w = max(WORKERS, key=lambda w: med[f"torchvision{w}"])
    best_t = max(range(1, cores + 1), key=lambda t: med[f"compute{t}"])
    return {"batch_size": bs, "torchvision": med[f"torchvision{best_w}"], "workers": best_w,
            "steps": med["steps"], "loop": med["loop"], "limit": med[f"compute{best_t}"],
            "limit_threads": best_t, "threads": threads_for(0, bs * flops, device.type),
            **{k: v for k, v in med.items() if k.startswith(("torchvision", "compute"))}}


def lines(result: dict[str, Any] | None) -> list[str]:
    if not result:
        return []
    out = [f"CNN (PyTorch's 2-conv MNIST network, {result['forward_mflop']:.1f} MFLOP a forward pass) on an "
           f"ImageFolder of {result['images']:,} PNGs ({result['size']}x{result['size']}, {result['channels']} "
           f"channels as decoded): training samples/s, cells of {result['seconds_per_cell']:.1f} s; the pipeline "
           f"decoded them once at prepare ({result['decode_seconds']:.1f} s); [n]: threads, [w=n]: workers",
           f"{'batch':>6} {'torchvision':>15} {'pipe steps':>14} {'pipe loop':>10} {'limit':>13}"
           f" {'steps/limit':>11} {'loop/limit':>10} {'loop/tv':>8}"]
    for r in result["rows"]:
        out.append(f"{r['batch_size']:>6} {r['torchvision']:>9,.0f} [w={r['workers']}] {r['steps']:>10,.0f} "
                   f"[{r['threads']}] {r['loop']:>10,.0f} {r['limit']:>9,.0f} [{r['limit_threads']}]"
                   f" {r['steps'] / r['limit']:>11.2f} {r['loop'] / r['limit']:>10.2f}"
                   f" {r['loop'] / r['torchvision']:>7.2f}x")
    return out
