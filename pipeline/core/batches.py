"""Batches for one epoch: a seeded permutation of (seed, epoch), cut by index from tensors on the
device (no per-sample Python), or the same order through a torch DataLoader."""
from __future__ import annotations

import math
from typing import Iterator

import torch

from ..config import TrainParams
from .data import Split
from .dist import Dist


def epoch_permutation(seed: int, epoch: int, n: int, device: torch.device, shuffle: bool = True) -> torch.Tensor:
    """The order of epoch ``epoch``: a function of (seed, epoch) alone, so a resumed run
    continues the same order without replaying earlier epochs. Without ``shuffle`` (the
    control that measures what shuffling does) every epoch reads the split in its stored order."""
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    else:
        order = torch.arange(n)
    if device.type == "cuda":  # a copy from pinned memory does not wait for the queued steps
        return order.pin_memory().to(device, non_blocking=True)
    return order.to(device)


def batch_bounds(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)


class EpochSampler(torch.utils.data.Sampler[int]):
    """DataLoader sampler yielding the same order as the tensor path (``set_epoch`` per epoch)."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.epoch, self.shuffle = n, seed, 0, shuffle

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(epoch_permutation(self.seed, self.epoch, self.n, torch.device("cpu"), self.shuffle).tolist())

    def __len__(self) -> int:
        return self.n


class EpochBatchSampler(torch.utils.data.Sampler[list[int]]):
    """The global batches of one epoch, as index lists, from batch ``start`` on: the same order as
    the tensor path, so a streamed run trains on the same batches (and resumes mid-epoch
    without reading the batches before its checkpoint)."""

    def __init__(self, n: int, seed: int, batch_size: int, drop_last: bool, shuffle: bool = True):
        self.n, self.seed, self.batch_size, self.shuffle = n, seed, batch_size, shuffle
        self.per_epoch = batch_bounds(n, batch_size, drop_last)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_permutation(self.seed, self.epoch, self.n, torch.device("cpu"), self.shuffle)
        for b in range(self.start, self.per_epoch):
            yield order[b * self.batch_size:(b + 1) * self.batch_size].tolist()

    def __len__(self) -> int:
        return self.per_epoch - self.start


class StreamedRows(torch.utils.data.Dataset):
    """A batch of a streamed split per item: one gather from the memory-mapped file, normalised in
    the worker; under torchrun each rank keeps every world-th row of the global batch, as the
    tensor path does."""

    def __init__(self, data: Split, rank: int = 0, world: int = 1):
        self.data, self.rank, self.world = data, rank, world

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.rows(torch.tensor(index[self.rank::self.world]))


class Batches:
    """Yields (x, y) batches for one epoch, from ``start`` batch on.

    ``tensor``: data already on the device, gathered in the epoch's order a chunk at a time,
    batches sliced off the chunk.
    ``dataloader``: a torch DataLoader over a TensorDataset with the same sampler order.
    Under torchrun each rank takes every world-th sample of the global batch.
    """

    def __init__(self, data: Split, p: TrainParams, batch_size: int, device: torch.device,
                 dist: Dist = Dist(), augment=None):
        self.p, self.batch_size, self.device = p, batch_size, device
        self.augment = augment if augment else None  # core.transforms.BatchAugment, on the device
        self.rank, self.world = dist.rank, dist.world
        self.n = len(data)
        self.per_epoch = batch_bounds(self.n, batch_size, p.drop_last)
        if self.per_epoch == 0:
            raise ValueError(f"train.batch_size={batch_size} with train.drop_last=true leaves no batch "
                             f"from {self.n} training samples (allowed: batch size <= {self.n})")
        self.streamed = data.norm is not None
        if self.streamed:
            # Larger than train.memory_budget_mb: batches are read from the file by DataLoader
            # workers (train.num_workers), pinned for the copy to a GPU, workers kept across epochs.
            self.data = data
            self.sampler = EpochBatchSampler(self.n, p.seed, batch_size, p.drop_last, p.shuffle)
            self.loader = torch.utils.data.DataLoader(
                StreamedRows(data, dist.rank, dist.world), batch_size=None, sampler=self.sampler,
                num_workers=p.num_workers, pin_memory=p.pin_memory and device.type == "cuda",
                persistent_workers=p.persistent_workers and p.num_workers > 0)
        elif p.loader == "tensor":
            self.data = data.to(device)
            self._plan()
        else:
            self.data = data
            self.sampler = EpochSampler(self.n, p.seed, p.shuffle)
            self.loader = torch.utils.data.DataLoader(
                torch.utils.data.TensorDataset(data.x, data.y), batch_size=batch_size,
                sampler=self.sampler, drop_last=p.drop_last, num_workers=p.num_workers,
                pin_memory=p.pin_memory and device.type == "cuda",
                persistent_workers=p.persistent_workers and p.num_workers > 0)

    # Values gathered at a time on the CPU: about 4 MB of float32, a few batches' worth at small
    # batch sizes, one batch from 1,337 rows of 784 up. The steps then read it from cache, as slices.
    # On a GPU the epoch is gathered at once (one extra copy of the data set on the card): two
    # kernel launches an epoch instead of two a chunk, where launches are what a small step costs.
    CHUNK_ELEMENTS = 1 << 20

    def _plan(self) -> None:
        """Which rows of an epoch's permutation this rank trains on, where each batch's rows lie
        among them (the same every epoch), and the buffer their chunks are gathered into."""
        bs, world = self.batch_size, self.world
        used = min(self.n, self.per_epoch * bs)  # drop_last leaves the tail out
        self._take: torch.Tensor | slice = slice(0, used)
        counts = [min(bs, used - b * bs) for b in range(self.per_epoch)]
        if world > 1:  # each rank takes every world-th row of each global batch
            pos = torch.arange(used)
            mine = (pos % bs) % world == self.rank
            self._take = mine.nonzero().squeeze(1).to(self.device)
            counts = torch.bincount(pos[mine] // bs, minlength=self.per_epoch).tolist()
        ends = [0]
        for c in counts:
            ends.append(ends[-1] + c)
        self._bounds = list(zip(ends[:-1], ends[1:]))
        x, y = self.data.x, self.data.y
        if self.device.type == "cuda":
            self._per_chunk = self.per_epoch
        else:
            self._per_chunk = max(1, self.CHUNK_ELEMENTS // (max(counts) * max(1, x[0].numel())))
        rows = min(ends[-1], max(counts) * self._per_chunk)
        self._xs = x.new_empty((rows, *x.shape[1:]))

    def _tensor_epoch(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Chunks of the epoch's order gathered into one reused buffer, batches sliced off it:
        one gather per chunk instead of per step, no helper thread, no copy of the data set.
        A step is done with its batch before it asks for the next, so a chunk is refilled only
        when all of its batches are done. Chunks start at the same batches whatever ``start``,
        so a resumed epoch sees each batch at the same place as an uninterrupted one."""
        rows = epoch_permutation(self.p.seed, epoch, self.n, self.device, self.p.shuffle)[self._take]
        k = self._per_chunk
        for first in range(start - start % k, self.per_epoch, k):
            chunk = self._bounds[first:first + k]
            base, end = chunk[0][0], chunk[-1][1]
            xs = torch.index_select(self.data.x, 0, rows[base:end], out=self._xs[:end - base])
            # Labels in a tensor of the chunk's own: the loop holds a step's labels until it counts
            # its correct predictions (``pending``), after the reused buffer has moved on.
            ys = torch.index_select(self.data.y, 0, rows[base:end])
            for lo, hi in chunk[max(0, start - first):]:
                yield xs[lo - base:hi - base], ys[lo - base:hi - base]

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.augment is None:
            yield from self._epoch(epoch, start)
            return
        for b, (xb, yb) in enumerate(self._epoch(epoch, start), start=start):
            yield self.augment(xb, epoch, b), yb

    def _epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.streamed:
            self.sampler.set_epoch(epoch, start)
            for xb, yb in self.loader:
                yield xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)
        elif self.p.loader == "tensor":
            yield from self._tensor_epoch(epoch, start)
        else:
            self.sampler.set_epoch(epoch)
            for b, (xb, yb) in enumerate(self.loader):
                if b < start:
                    continue
                yield (xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True))

    def head(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` training rows, normalised, on the device (warm-up and memory probes)."""
        x, y = self.data.rows(slice(0, n))
        return x.to(self.device), y.to(self.device)

    def samples_in(self, b: int, xb: torch.Tensor) -> int:
        """Samples of the global batch ``b`` (all ranks together)."""
        if self.world == 1:
            return xb.shape[0]
        return min(self.batch_size, self.n - b * self.batch_size)
