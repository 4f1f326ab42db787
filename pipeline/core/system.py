"""The machine a run computes on: its device, torch's threads, subnormal floats."""
from __future__ import annotations

import os
import platform

import torch


def pick_device(wanted: str) -> torch.device:
    if wanted == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device='cuda' but no CUDA device is available (allowed here: auto, cpu)")
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(wanted)


def processor(device: torch.device) -> str:
    """What computes: the card's name, or the CPU's architecture."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()}"


def device_name(device: torch.device) -> str:
    """``processor`` and, on the CPU, the torch threads in use now."""
    return processor(device) + (f"x{torch.get_num_threads()}threads" if device.type == "cpu" else "")


def sync(device: torch.device) -> None:
    """Wait for the work queued on a GPU; nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def threads() -> int:
    return torch.get_num_threads()


# Work per optimizer step (the batch's forward pass in floating-point operations, ``cost.forward_flops``
# times the batch) from which a step is worth every core. Below it a second thread does not pay:
# OpenMP's hand-offs cost as much as it saves, beside the metric logger's thread. Counted in
# operations rather than parameters, so that a convolutional network, whose work is in its
# activations, is judged by its work. Checked against measured steps of an MLP and a CNN at every
# thread count (``make bench``'s limit rows; docs/performance.md, "Threads").
PARALLEL_FLOPS = 1 << 21


def threads_for(wanted: int, work: float | None = None, device: str = "cpu") -> int:
    """``wanted`` torch threads; 0: chosen from ``work`` (all cores from PARALLEL_FLOPS up, else
    one), all cores when the work is not known. The choice is a function of the params, the
    model and the machine, never of a timing, so the same run on the same machine repeats bit for
    bit. On a GPU the CPU only launches kernels: one thread (docs/performance.md, "Threads")."""
    if wanted:
        return wanted
    if device == "cuda":
        return 1
    return cpu_count() if work is None or work >= PARALLEL_FLOPS else 1


def threads_reason(wanted: int, work: float | None = None, device: str = "cpu") -> str:
    """Why ``threads_for`` chose what it did, in words recorded on the run."""
    n = threads_for(wanted, work, device)
    if wanted:
        return f"{n}: train.threads"
    if device == "cuda":
        return "1: the GPU computes, the CPU launches kernels"
    if work is None:
        return f"{n}: the step's work is not known"
    cmp = ">=" if work >= PARALLEL_FLOPS else "<"
    return f"{n}: a step's forward pass is {work / 1e6:,.1f} MFLOP {cmp} {PARALLEL_FLOPS / 1e6:,.1f}"


def set_threads(wanted: int, work: float | None = None, device: str = "cpu") -> int:
    n = threads_for(wanted, work, device)
    torch.set_num_threads(n)
    return n


def set_flush_denormal(on: bool) -> bool:
    """Compute CPU floats below 2**-126 (subnormals) as 0, or not (torch's default); whether
    the CPU supports it. A GPU is not affected. It is a setting of the calling thread, which
    OpenMP's threads copy when they start: call it before the process's first parallel work.

    Adam's running mean of a weight whose gradient has become 0 decays by beta1 = 0.9 a step and
    soon turns subnormal, and x86 arithmetic on such values takes many times longer: a model that
    stops learning would slow down for that reason alone (docs/performance.md, "Subnormals")."""
    return bool(torch.set_flush_denormal(on))


def cpu_count() -> int:
    return os.cpu_count() or 1
