"""Figures of steps not yet read back from the device.

A step's on-device figures (its loss, its correct predictions) stay tensors until ``drain``
reads them all in one transfer, and one all-reduce under DDP: the loop never waits on the device
for a single step's numbers. Correct predictions are counted at the drain, for all its steps at
once, from each step's outputs and labels (three operators per step would cost more than the
step's bookkeeping otherwise does); the outputs held are bounded by ``HELD_ELEMENTS``.
"""
from __future__ import annotations

import torch

from ..steplog import FIELDS, Steps
from .dist import all_sum

ON_DEVICE = tuple(f for f in FIELDS if f.on_device)
ON_HOST = tuple(f.name for f in FIELDS if not f.on_device)
# Output elements held for counting before the buffer asks to drain: 32 MB of float32.
HELD_ELEMENTS = 1 << 23


class Pending:
    def __init__(self):
        self._empty()

    def _empty(self) -> None:
        self.host: dict[str, list] = {name: [] for name in ON_HOST}
        self.device: dict[str, list] = {f.name: [] for f in ON_DEVICE}
        self.held = 0

    def __len__(self) -> int:
        return len(self.host["step"])

    def full(self, steps: int) -> bool:
        return len(self) >= steps or self.held >= HELD_ELEMENTS

    def add(self, **figures) -> None:
        """One step: a value for every field of ``steplog.FIELDS`` (None for an absent optional one);
        ``correct`` as the step's (outputs, labels)."""
        for name in ON_HOST:
            self.host[name].append(figures[name])
        for f in ON_DEVICE:
            value = figures[f.name]
            if isinstance(value, tuple):
                out, labels = value
                self.device[f.name].append((out.detach(), labels))
                self.held += out.numel()
            elif value is not None:
                self.device[f.name].append(value.detach())

    def drain(self, world: int) -> Steps:
        """The pending steps; empties the buffers."""
        held = [f for f in ON_DEVICE if self.device[f.name]]
        stacked = torch.cat([_correct(self.device[f.name]) if isinstance(self.device[f.name][0], tuple)
                             else torch.stack(self.device[f.name]).to(torch.float64) for f in held])
        values = all_sum(stacked, world).tolist()  # per-rank shares -> global figures
        columns, n = dict(self.host), len(self)
        for i, f in enumerate(held):
            part = values[i * n:(i + 1) * n]
            columns[f.name] = [round(v) for v in part] if f.kind is int else part
        self._empty()
        return Steps(columns)


def _correct(scored: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Each step's correct predictions, from its (outputs, labels), in one pass over all of them."""
    hits = (torch.cat([out for out, _ in scored]).argmax(1) == torch.cat([y for _, y in scored]))
    total = hits.cumsum(0, dtype=torch.float64)
    ends = torch.tensor([len(y) for _, y in scored], device=total.device).cumsum(0) - 1
    upto = total[ends]
    return torch.cat([upto[:1], upto[1:] - upto[:-1]])
