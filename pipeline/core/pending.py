"""Figures of steps not yet read back from the device.

A step's on-device figures (its loss, its correct predictions) stay tensors until ``drain``
reads them all in one transfer, and one all-reduce under DDP: the loop never waits on the device
for a single step's numbers.
"""
from __future__ import annotations

import torch

from ..steplog import FIELDS, Steps
from .dist import all_sum

ON_DEVICE = tuple(f for f in FIELDS if f.on_device)
ON_HOST = tuple(f.name for f in FIELDS if not f.on_device)


class Pending:
    def __init__(self):
        self._empty()

    def _empty(self) -> None:
        self.host: dict[str, list] = {name: [] for name in ON_HOST}
        self.device: dict[str, list[torch.Tensor]] = {f.name: [] for f in ON_DEVICE}

    def __len__(self) -> int:
        return len(self.host["step"])

    def add(self, **figures) -> None:
        """One step: a value for every field of ``steplog.FIELDS`` (None for an absent optional one)."""
        for name in ON_HOST:
            self.host[name].append(figures[name])
        for f in ON_DEVICE:
            if figures[f.name] is not None:
                self.device[f.name].append(figures[f.name].detach())

    def drain(self, world: int) -> Steps:
        """The pending steps; empties the buffers."""
        held = [f for f in ON_DEVICE if self.device[f.name]]
        stacked = torch.cat([torch.stack(self.device[f.name]).to(torch.float64) for f in held])
        values = all_sum(stacked, world).tolist()  # per-rank shares -> global figures
        columns, n = dict(self.host), len(self)
        for i, f in enumerate(held):
            part = values[i * n:(i + 1) * n]
            columns[f.name] = [round(v) for v in part] if f.kind is int else part
        self._empty()
        return Steps(columns)
