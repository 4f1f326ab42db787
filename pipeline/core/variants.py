"""The two steps that replace the loop's plain step: data-parallel (under torchrun) and the
noise-scale step (every ``train.noise_scale_every`` steps). Each says whether it takes a step
(``takes``) and takes it: ``step(xb, yb, n_b, index) -> (outputs, mean loss)``."""
from __future__ import annotations

import torch
from torch import nn

from .compute import Precision
from .dist import Dist
from .noise import NoiseScale, squared_norm
from .pending import Pending


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


class NoiseScaleStep:
    """The step's gradient from two half batches, so that |G|^2 is seen at two batch sizes
    (McCandlish et al. 2018): one process only (under DDP it would need the gradients before
    their all-reduce), and not under fp16, whose scaled gradients would need unscaling first."""

    def __init__(self, net: nn.Module, model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                 precision: Precision, every: int, noise: NoiseScale, pending: Pending):
        self.net, self.criterion, self.optimizer, self.precision = net, criterion, optimizer, precision
        self.params = [q for q in model.parameters() if q.requires_grad]
        self.every, self.noise, self.pending = every, noise, pending

    def takes(self, n_b: int, index: int) -> bool:
        return n_b >= 2 and index % self.every == 0 and self.precision.scaler is None

    def __call__(self, xb, yb, n_b: int, index: int):
        with self.precision.autocast():
            out, loss, b_simple = self._half_batch_gradients(xb, yb)
        self.optimizer.step()
        self.pending.noise.append((index, b_simple))
        return out, loss

    def _half_batch_gradients(self, xb, yb):
        n = xb.shape[0]
        half = n // 2
        out_a = self.net(xb[:half])
        loss_a = self.criterion(out_a, yb[:half])
        grads_a = torch.autograd.grad(loss_a, self.params)
        out_b = self.net(xb[half:])
        loss_b = self.criterion(out_b, yb[half:])
        grads_b = torch.autograd.grad(loss_b, self.params)
        wa, wb = half / n, (n - half) / n
        for q, ga, gb in zip(self.params, grads_a, grads_b):
            q.grad = wa * ga + wb * gb
        small_sq = 0.5 * (squared_norm(list(grads_a)) + squared_norm(list(grads_b)))
        big_sq = squared_norm([q.grad for q in self.params])
        b_simple = self.noise.update(small_sq, big_sq, n / 2, n)
        return torch.cat([out_a, out_b]), wa * loss_a + wb * loss_b, b_simple
