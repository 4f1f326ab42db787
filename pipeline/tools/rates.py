"""What the bench's rows share: the samples/s of a plain loop over a DataLoader, of optimizer steps
on one batch in memory (the compute limit), and of the pipeline's own loop (``engine.fit``),
all timed the same way."""
from __future__ import annotations

import time

import torch
from torch import nn

from ..config import TrainParams
from ..core.data import Split
from ..core.engine import TrainSpec, fit, Hooks
from ..core.system import sync


def loader_rate(loader, device, seconds: float, make, warmup: int = 3) -> float:
    """Samples/s of optimizer steps on the loader's batches, after ``warmup`` steps; ``make``
    gives (model, optimizer) for the device."""
    model, opt = make(device)
    crit = nn.CrossEntropyLoss()
    samples, t0 = 0, None
    while True:
        for i, (xb, yb) in enumerate(loader):
            xb, yb = xb.to(device), yb.to(device)
            opt.zero_grad(set_to_none=True)
            crit(model(xb), yb).backward()
            opt.step()
            if t0 is None and i + 1 >= warmup:
                sync(device)
                t0 = time.perf_counter()
                continue
            if t0 is not None:
                samples += xb.shape[0]
                if time.perf_counter() - t0 >= seconds:
                    sync(device)
                    return samples / (time.perf_counter() - t0)


def compute_rate(make, xb: torch.Tensor, yb: torch.Tensor, device, seconds: float, warmup: int = 2) -> float:
    """Samples/s of optimizer steps on one batch already on the device: the compute limit."""
    model, opt = make(device)
    crit = nn.CrossEntropyLoss()
    xb, yb = xb.to(device), yb.to(device)
    steps, t0 = 0, None
    while True:
        opt.zero_grad(set_to_none=True)
        crit(model(xb), yb).backward()
        opt.step()
        steps += 1
        if t0 is None:
            if steps >= warmup:
                sync(device)
                t0, steps = time.perf_counter(), 0
            continue
        if time.perf_counter() - t0 >= seconds:
            sync(device)
            return steps * xb.shape[0] / (time.perf_counter() - t0)


def fit_rates(model: nn.Module, train: Split, val: Split, p: TrainParams, batch_size: int, device: torch.device,
              seconds: float, hooks: Hooks | None = None) -> tuple[float, float]:
    """Samples per second of the pipeline's loop, over ``seconds`` of its step time: over the steps'
    time, and over the loop's wall time."""
    result = fit(model, TrainSpec(train, val, p, batch_size, "classification", device), hooks, max_seconds=seconds)
    return result.samples / result.train_seconds, result.samples / result.loop["loop_seconds"]


def fit_rate(model: nn.Module, train: Split, val: Split, p: TrainParams, batch_size: int, device: torch.device,
             seconds: float, hooks: Hooks | None = None) -> float:
    """Samples per second of the pipeline's loop, over ``seconds`` of its step time."""
    return fit_rates(model, train, val, p, batch_size, device, seconds, hooks)[0]
