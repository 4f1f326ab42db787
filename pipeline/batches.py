"""Batches for one epoch: a seeded permutation of (seed, epoch), cut by index from tensors on the
device (no per-sample Python), or the same order through a torch DataLoader."""
from __future__ import annotations

import math
from typing import Iterator

import torch

from .config import TrainParams
from .data import Split
from .dist import Dist


def epoch_permutation(seed: int, epoch: int, n: int, device: torch.device) -> torch.Tensor:
    """The order of epoch ``epoch``: a function of (seed, epoch) alone, so a resumed run
    continues the same order without replaying earlier epochs."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).to(device)


def batch_bounds(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)


class EpochSampler(torch.utils.data.Sampler[int]):
    """DataLoader sampler yielding the same order as the tensor path (``set_epoch`` per epoch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(epoch_permutation(self.seed, self.epoch, self.n, torch.device("cpu")).tolist())

    def __len__(self) -> int:
        return self.n


class Batches:
    """Yields (x, y) batches for one epoch, from ``start`` batch on.

    ``tensor``: data already on the device, batches cut by index from the epoch's permutation.
    ``dataloader``: a torch DataLoader over a TensorDataset with the same sampler order.
    Under torchrun each rank takes every world-th sample of the global batch.
    """

    def __init__(self, data: Split, p: TrainParams, batch_size: int, device: torch.device,
                 dist: Dist = Dist()):
        self.p, self.batch_size, self.device = p, batch_size, device
        self.rank, self.world = dist.rank, dist.world
        self.n = len(data)
        self.per_epoch = batch_bounds(self.n, batch_size, p.drop_last)
        if self.per_epoch == 0:
            raise ValueError(f"train.batch_size={batch_size} with train.drop_last=true leaves no batch "
                             f"from {self.n} training samples (allowed: batch size <= {self.n})")
        if p.loader == "tensor":
            self.data = data.to(device)
        else:
            self.data = data
            self.sampler = EpochSampler(self.n, p.seed)
            self.loader = torch.utils.data.DataLoader(
                torch.utils.data.TensorDataset(data.x, data.y), batch_size=batch_size,
                sampler=self.sampler, drop_last=p.drop_last, num_workers=p.num_workers,
                pin_memory=p.pin_memory and device.type == "cuda",
                persistent_workers=p.persistent_workers and p.num_workers > 0)

    # Gathering a batch of at least this many values on the CPU is worth a helper thread
    # (measured: 784-wide rows, worth it at batch size 64, not at 8):
    # index_select releases the GIL, so the next batch is cut on the core the step leaves idle.
    PREFETCH_ELEMENTS = 1 << 15

    def _tensor_epoch(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = epoch_permutation(self.p.seed, epoch, self.n, self.device)
        x, y, bs = self.data.x, self.data.y, self.batch_size
        # Batches are gathered into reused buffers (a fresh multi-MB tensor per step costs page
        # faults), two of them so one can fill while the step uses the other. A step is done
        # with its batch before it asks for the one after next, which reuses that buffer.
        rows = -(-bs // self.world)
        bufs = [(x.new_empty((rows, *x.shape[1:])), y.new_empty((rows, *y.shape[1:]))) for _ in range(2)]

        def gather(b: int) -> tuple[torch.Tensor, torch.Tensor]:
            idx = perm[b * bs:(b + 1) * bs]
            if self.world > 1:
                idx = idx[self.rank::self.world]
            xb, yb = bufs[b % 2]
            n = idx.shape[0]
            return torch.index_select(x, 0, idx, out=xb[:n]), torch.index_select(y, 0, idx, out=yb[:n])

        if self.device.type != "cpu" or rows * x[0].numel() < self.PREFETCH_ELEMENTS:
            for b in range(start, self.per_epoch):
                yield gather(b)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1, thread_name_prefix="batch-prefetch") as pool:
            nxt = pool.submit(gather, start) if start < self.per_epoch else None
            for b in range(start, self.per_epoch):
                batch = nxt.result()
                nxt = pool.submit(gather, b + 1) if b + 1 < self.per_epoch else None
                yield batch

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.p.loader == "tensor":
            yield from self._tensor_epoch(epoch, start)
        else:
            self.sampler.set_epoch(epoch)
            for b, (xb, yb) in enumerate(self.loader):
                if b < start:
                    continue
                yield (xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True))

    def samples_in(self, b: int, xb: torch.Tensor) -> int:
        """Samples of the global batch ``b`` (all ranks together)."""
        if self.world == 1:
            return xb.shape[0]
        return min(self.batch_size, self.n - b * self.batch_size)
