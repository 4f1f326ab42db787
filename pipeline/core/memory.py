"""What a training's memory costs: the peak over a block of code, and what one step holds for
its batch."""
from __future__ import annotations

import copy
import re
import resource
from pathlib import Path

import torch
from torch import nn


class PeakMemory:
    """Peak resident set (CPU) or peak allocated bytes (GPU) over a block of code.

    On Linux the process's RSS high-water mark is reset through /proc/self/clear_refs, so
    the figure covers the block, not the imports before it.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0
        self._reset_ok = False

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self._reset_ok = True
            except OSError:
                self._reset_ok = False
        return self

    def read(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        if self._reset_ok:
            peak = proc_status_bytes("VmHWM")
            if peak is not None:
                return peak
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def __exit__(self, *exc) -> None:
        self.peak_bytes = self.read()


def proc_status_bytes(field: str) -> int | None:
    """A kB figure of /proc/self/status (VmRSS, VmHWM, ...) in bytes; None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def step_memory(model: nn.Module, criterion: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> int:
    """Bytes one training step holds for its batch, above what the model needs anyway.

    GPU: peak allocated bytes of a step on a copy, above what was allocated before it. CPU (no
    allocator statistics; resident memory moves by whole MBs of library code): the bytes of the
    tensors the step holds — the batch, the activations autograd saves for the backward pass, the
    outputs — each storage counted once, parameters excluded.
    """
    clone = copy.deepcopy(model)
    if xb.device.type == "cuda":
        torch.cuda.synchronize(xb.device)
        base = torch.cuda.memory_allocated(xb.device)
        torch.cuda.reset_peak_memory_stats(xb.device)
        criterion(clone(xb), yb).backward()
        torch.cuda.synchronize(xb.device)
        return int(torch.cuda.max_memory_allocated(xb.device) - base)
    own = {q.untyped_storage().data_ptr() for q in clone.parameters()}
    held: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            held[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = clone(xb)
        loss = criterion(out, yb)
    loss.backward()
    for t in (xb, yb, out):
        held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return int(sum(held.values()))


class OutOfMemory(RuntimeError):
    """A training step, validation or measurement asked for more memory than the machine (or the
    process's limit) gives: what to do about it, in one line."""


# CPU: "DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes";
# CUDA: "CUDA out of memory. Tried to allocate 2.00 GiB".
_ASKED = re.compile(r"(?:tried to allocate|Tried to allocate) ([0-9.]+) ?(bytes|[KMGT]iB)")
_UNITS = {"bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def out_of_memory(err: BaseException, batch_size: int, device: torch.device) -> OutOfMemory | None:
    """``err`` as an OutOfMemory naming the batch size, the memory asked for and the tool that
    finds a batch size that fits; None where ``err`` is not torch running out of memory."""
    text = str(err)
    if not (isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in text
            or "out of memory" in text.lower()):
        return None
    asked = _ASKED.search(text)
    amount = f" (it asked for {float(asked.group(1)) * _UNITS[asked.group(2)] / 2**20:,.1f} MiB more)" if asked else ""
    budget = "" if device.type == "cuda" else " --memory-budget-mb MB"
    return OutOfMemory(f"batch size {batch_size} does not fit in {device.type.upper()} memory{amount}; its "
                       f"checkpoint was removed. The largest that fits: python -m pipeline find-batch-size{budget}")
