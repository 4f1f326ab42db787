"""The step that replaces the loop's plain one under torchrun: data-parallel. It says whether it
takes a step (``takes``) and takes it: ``step(xb, yb, n_b, index) -> (outputs, mean loss)``."""
from __future__ import annotations

import torch
from torch import nn

from .compute import Precision
from .dist import Dist


class DataParallelStep:
    """Each rank's loss is its shard's sum over the global batch size, times the world size: DDP
    averages gradients over ranks, so the result is the global batch's mean gradient even when
    the last batch splits unevenly."""

    def __init__(self, net: nn.Module, optimizer: torch.optim.Optimizer, precision: Precision,
                 shard_loss: nn.Module, dist: Dist):
        from torch.nn.parallel import DistributedDataParallel
        self.ddp, self.optimizer, self.precision = DistributedDataParallel(net), optimizer, precision
        self.shard_loss, self.world = shard_loss, dist.world

    def takes(self, n_b: int, index: int) -> bool:
        return True

    def __call__(self, xb, yb, n_b: int, index: int):
        self.optimizer.zero_grad(set_to_none=True)
        with self.precision.autocast():
            out = self.ddp(xb)
            loss = self.shard_loss(out, yb) * (self.world / n_b)
        self.precision.backward_step(loss, self.optimizer)
        return out, self.shard_loss(out.detach().float(), yb) / n_b  # this rank's share of the mean
