"""Data-parallel training under torchrun: which rank this process is, and the collectives it needs.

``train.batch_size`` is the global batch: each rank takes every world-th sample of each batch of
the same seeded permutation, so the samples seen per step are those of a single process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0


def init(device_kind: str) -> Dist:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, ...); one process otherwise.
    gloo on CPU, nccl on GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not tdist.is_initialized():
        backend = "nccl" if device_kind == "cuda" and torch.cuda.is_available() else "gloo"
        tdist.init_process_group(backend=backend)
    return Dist(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                tdist.get_backend())


def all_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t
