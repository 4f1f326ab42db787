"""How the model computes: its optimizer, device, layout and precision, compiled or not, and
warmed up before the clock starts."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..config import TrainParams
from .batches import Batches
from .system import sync


def make_optimizer(p: TrainParams, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The fused kernels: one call per step instead of several per parameter (docs/performance.md)."""
    if p.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=p.momentum, weight_decay=p.weight_decay,
                               fused=True)
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=p.weight_decay, fused=True)


class Precision:
    """``train.precision``: autocast around forward and loss; fp16 scales the loss so that small
    gradients survive (torch.amp.GradScaler), bf16 and fp32 need no scaling."""

    def __init__(self, p: TrainParams, device: torch.device):
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[p.precision]
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type) if p.precision == "fp16" else None

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None)

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()


def prepare_model(model: nn.Module, p: TrainParams, device: torch.device) -> nn.Module:
    """The module the steps call: the model on its device, in channels-last layout and compiled
    when asked. Its parameters are the model's own (the state dict is unchanged)."""
    model = model.to(device)
    if p.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if p.compile != "none":
        return torch.compile(model, mode=p.compile)
    return model


def warm_up_compiled(net: nn.Module, model: nn.Module, criterion: nn.Module, batches: Batches,
                      precision: Precision) -> None:
    """Compile before the clock starts: a forward and backward pass through the compiled module
    at the run's batch size (compiling takes seconds to minutes, and would read as step time).
    The model's buffers (batch-norm statistics) and gradients are restored: the run trains as if
    this never happened."""
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    full = min(batches.batch_size, batches.n)
    for n in {full, batches.n % batches.batch_size or full}:  # the last batch may be smaller
        xb, yb = batches.head(n)
        with precision.autocast():
            loss = criterion(net(xb), yb)
        loss.backward()
        model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(buffers[k])
    sync(batches.device)


def warm_up(model: nn.Module, p: TrainParams, criterion: nn.Module, batches: Batches) -> None:
    """One step on a throwaway copy: the first optimizer step imports and initialises library
    code (seconds on CPU) that would otherwise be counted in the first steps' time."""
    clone = copy.deepcopy(model)
    opt = make_optimizer(p, clone, 1e-9)
    xb, yb = batches.head(2)
    opt.zero_grad()
    criterion(clone(xb), yb).backward()
    opt.step()
    sync(batches.device)  # its kernels are not the first steps' time
