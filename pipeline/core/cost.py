"""What a training step and a validation cost, in floating-point operations counted from the
model: the stand-in for a timing wherever a choice must not depend on the machine's load.
Torch's threads and the spacing of validations are chosen from it, so they are functions of the
params, the model and the data's shape, and the same run repeats bit for bit on the same machine.
The constants are checked against measured steps in docs/performance.md ("A training's wall
time against its steps")."""
from __future__ import annotations

import math

import torch
from torch import nn

# What a pass over a batch costs besides its arithmetic (launching each operator, Python), in
# operations: a small MLP's step on a few rows takes as long as this many do on one core.
PASS_FLOPS = 3e6
# A validation's fixed cost: its pass, switching the model's mode there and back, reading back.
EVAL_FLOPS = 4.5e6
# A training step's passes: the forward, the backward (about twice the forward's work).
STEP_PASSES = 3
# Validation rows per forward pass: at most this many (a GPU's), and on a CPU about this much work
# (``eval_chunk``).
MAX_EVAL_CHUNK = 4096
EVAL_CHUNK_FLOPS = 2e9
# The share of a run's compute its validations may take (``eval_gap``).
EVAL_SHARE = 0.05


def forward_flops(model: nn.Module, x: torch.Tensor) -> float:
    """Operations of one example's forward pass, counted by torch's FlopCounterMode on two rows of
    ``x`` (in eval mode, without gradients: no parameter, buffer or random state changes)."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x[:2])
    finally:
        model.train(was)
    return counter.get_total_flops() / max(1, min(2, x.shape[0]))


def eval_chunk(per_example: float, device: str) -> int:
    """Validation rows per forward pass: on a GPU as many as fit comfortably; on a CPU about
    EVAL_CHUNK_FLOPS of work, so that a convolutional network's activations stay in cache, while
    a small network still validates in one pass."""
    if device == "cuda":
        return MAX_EVAL_CHUNK
    return max(1, min(MAX_EVAL_CHUNK, int(EVAL_CHUNK_FLOPS // max(per_example, 1.0))))


def step_flops(per_example: float, batch: int) -> float:
    return STEP_PASSES * (batch * per_example + PASS_FLOPS)


def eval_flops(per_example: float, n: int, chunk: int) -> float:
    return n * per_example + EVAL_FLOPS * math.ceil(n / chunk)


def eval_gap(per_example: float, batch: int, n_val: int, chunk: int) -> int:
    """The fewest steps between two validations for them to cost at most EVAL_SHARE of the steps."""
    ratio = eval_flops(per_example, n_val, chunk) / step_flops(per_example, batch)
    return max(1, math.ceil(ratio / EVAL_SHARE))
