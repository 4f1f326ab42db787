"""find-batch-size: the largest batch size whose training step fits in memory, never above the
training split's size, and where samples per second stop rising.

Doubles the batch size from a start value until a step runs out of memory, then bisects between
the last success and the failure (as Lightning's batch-size finder does). On a GPU, out of memory
is CUDA's own error (the cache is freed after it), or a step whose peak allocated bytes exceed a
budget; on a CPU it is a step whose tensors (batch, saved activations, outputs: the measure the
train stage reports) exceed the budget given as a parameter — or a size the last measurement
predicts over it, which is then not tried, so the machine itself never runs out. Each size that
fits also runs a few real optimizer steps (random inputs of the data's shape): their samples per
second show where a bigger batch stops buying speed, often long before memory runs out.
"""
from __future__ import annotations

import ctypes
import gc
import statistics
from dataclasses import dataclass, field

import torch

from ..config import Params, ParamsError
from ..core.memory import step_memory
from ..core.models import build_model, loss_fn


@dataclass
class Trial:
    batch_size: int
    fits: bool
    peak_bytes: int
    note: str = ""
    samples_per_s: float | None = None  # the median of ``rates``
    rates: list[float] = field(default_factory=list)  # each repeated measurement (REPEATS)


@dataclass
class Found:
    largest: int | None
    peak_bytes: int | None
    trials: list[Trial] = field(default_factory=list)
    capped_at: int | None = None   # the training split's size, when the search reached it

    def knee(self, within: float = 0.1, repeat: int | None = None) -> int | None:
        """The smallest size whose samples/s is within ``within`` of the best measured: where
        throughput stops rising. From the medians, or from one ``repeat``'s measurements."""
        rated = [t for t in self.trials if t.fits and t.samples_per_s]
        if not rated:
            return None
        rate = (lambda t: t.samples_per_s) if repeat is None else (lambda t: t.rates[repeat])
        best = max(rate(t) for t in rated)
        return min(t.batch_size for t in rated if rate(t) >= (1 - within) * best)

    def knees(self) -> list[int]:
        """The knee each repeated measurement gives: where they differ, the timings swing more than
        the margin that tells sizes apart, and the knee is uncertain."""
        rated = [t for t in self.trials if t.fits and t.samples_per_s]
        n = min((len(t.rates) for t in rated), default=0)
        return [k for i in range(n) if (k := self.knee(repeat=i)) is not None]


# Samples/s is measured this many times at each size: one short measurement swung 10x between runs
# on a busy machine, and the knee moved with it.
REPEATS = 3


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def _release() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def step_peak(p: Params, n_in: int, n_out: int, task: str, batch_size: int, device: torch.device) -> int:
    """Bytes a training step at ``batch_size`` holds for its batch: the same measure the train
    stage reports as step_memory_bytes (``memory.step_memory``)."""
    torch.manual_seed(0)
    model = build_model(p.model, n_in, n_out).to(device)
    shape = (n_in,) if isinstance(n_in, int) else tuple(n_in)  # one sample's shape
    try:
        x = torch.randn(batch_size, *shape, device=device)
        y = (torch.randint(0, n_out, (batch_size,), device=device) if task == "classification"
             else torch.randn(batch_size, 1, device=device))
        return step_memory(model, loss_fn(task), x, y)
    finally:
        del model
        _release()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def step_rate(p: Params, n_in, n_out: int, task: str, batch_size: int, device: torch.device,
              min_seconds: float = 0.2, max_steps: int = 20) -> float:
    """Samples per second of real optimizer steps at ``batch_size`` (after two warm-up steps)."""
    import time
    from ..core.compute import make_optimizer
    from ..core.system import sync
    torch.manual_seed(0)
    model = build_model(p.model, n_in, n_out).to(device)
    shape = (n_in,) if isinstance(n_in, int) else tuple(n_in)
    opt, criterion = make_optimizer(p.train, model, p.train.lr), loss_fn(task)
    try:
        x = torch.randn(batch_size, *shape, device=device)
        y = (torch.randint(0, n_out, (batch_size,), device=device) if task == "classification"
             else torch.randn(batch_size, 1, device=device))

        def step():
            opt.zero_grad(set_to_none=True)
            criterion(model(x), y).backward()
            opt.step()
        for _ in range(2):
            step()
        sync(device)
        t0, steps = time.perf_counter(), 0
        while steps < 3 or (steps < max_steps and time.perf_counter() - t0 < min_seconds):
            step()
            steps += 1
        sync(device)
        return batch_size * steps / (time.perf_counter() - t0)
    finally:
        del model, opt
        _release()


def find(p: Params, n_in: int, n_out: int, task: str, device: torch.device, start: int, limit: int,
         budget_bytes: int | None, log=print, n_train: int | None = None, rate: bool = True) -> Found:
    """``n_train``: the training split's size, above which a batch is never needed (the search
    stops there); ``rate``: measure samples/s at each size that fits."""
    check_arguments(device, start, limit, budget_bytes)
    found = Found(None, None)
    if n_train is not None and limit > n_train:
        limit, found.capped_at = max(n_train, start), n_train
    per_sample: float | None = None

    def attempt(bs: int) -> bool:
        nonlocal per_sample
        if budget_bytes and per_sample is not None and per_sample * bs > budget_bytes * 1.5:
            found.trials.append(Trial(bs, False, int(per_sample * bs), "predicted over budget, not run"))
            log(f"  batch size {bs}: predicted {per_sample * bs / 2**20:,.0f} MiB, over budget: not run")
            return False
        peak, failure = _peak(p, n_in, n_out, task, bs, device)
        if peak is None:
            found.trials.append(Trial(bs, False, 0, failure))
            log(f"  batch size {bs}: {failure}")
            return False
        if found.largest is None or bs > found.largest:
            per_sample = peak / bs  # the largest measured step predicts best
        fits = budget_bytes is None or peak <= budget_bytes
        speed, rates = None, []
        if fits and rate:
            try:
                rates = [step_rate(p, n_in, n_out, task, bs, device) for _ in range(REPEATS)]
                speed = statistics.median(rates)
            except torch.cuda.OutOfMemoryError:  # the optimizer's state on top of the step: no rate
                torch.cuda.empty_cache()
        found.trials.append(Trial(bs, fits, peak, samples_per_s=speed, rates=rates))
        log(f"  batch size {bs}: peak {mib(peak)} {'fits' if fits else 'over budget'}"
            + (f", {speed:,.0f} samples/s" if speed else ""))
        if fits and (found.largest is None or bs > found.largest):
            found.largest, found.peak_bytes = bs, peak
        return fits

    step_peak(p, n_in, n_out, task, 2, device)  # the first step loads library code: not a measurement
    if start == 1 and limit > 1:
        try:
            step_peak(p, n_in, n_out, task, 1, device)
        except ValueError as err:  # batch norm: "Expected more than 1 value per channel when training"
            note = f"the model cannot train on one sample ({' '.join(str(err).split())[:120]})"
            found.trials.append(Trial(1, False, 0, note))
            log(f"  batch size 1: {note}; the search starts at 2")
            start = 2
    return _search(attempt, found, start, limit)


def _peak(p: Params, n_in, n_out: int, task: str, bs: int, device: torch.device) -> tuple[int | None, str]:
    """``step_peak`` at ``bs``, or None and why the memory ran out."""
    try:
        return step_peak(p, n_in, n_out, task, bs, device), ""
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, "CUDA out of memory"
    except RuntimeError as err:  # the CPU allocator's own failure
        if "memory" not in str(err).lower():
            raise
        return None, "allocation failed"


def _search(attempt, found: Found, start: int, limit: int) -> Found:
    """Double from ``start`` until a size does not fit, then bisect between the last two."""
    bs, low, high = start, None, None
    while True:
        if attempt(bs):
            low = bs
            if bs >= limit:
                return found
            bs = min(bs * 2, limit)
        else:
            high = bs
            break
    if low is None:
        return found
    # Bisect to within 1/64 of the answer: a few trials, and closer than a memory budget is meant.
    while high - low > max(1, low // 64):
        mid = (low + high) // 2
        if attempt(mid):
            low = mid
        else:
            high = mid
    return found


def check_arguments(device: torch.device, start: int, limit: int, budget_bytes: int | None) -> None:
    if start < 1 or limit < start:
        raise ParamsError(f"--start {start} / --max {limit}: allowed: 1 <= start <= max")
    if device.type == "cpu" and not budget_bytes:
        raise ParamsError("on a CPU --memory-budget-mb is required (allowed: a positive number of MiB)")


def run(ctx, start: int, limit: int, budget_mb: float | None) -> Found:
    """Searches and logs into an experiment of its own (``<experiment>-find-batch-size``): the
    sweep's experiment holds sweeps only. Bad arguments stop before any run is made."""
    from ..context import read_manifest
    from ..core.system import pick_device

    p = ctx.params
    manifest = read_manifest(ctx.data_dir)
    device = pick_device(p.train.device)
    task = manifest["task"]
    n_out = manifest["n_classes"] if task == "classification" else 1
    budget = int(budget_mb * 2**20) if budget_mb else None
    check_arguments(device, start, limit, budget)
    from ..tracking.toolrun import tool_run
    with tool_run(ctx, "find-batch-size", p.flat() | {"start": start, "max": limit, "memory_budget_mb": budget_mb,
                                                      "device": str(device)}) as rec:
        found = find(p, tuple(manifest.get("sample_shape") or [manifest["n_features"]]), n_out, task, device,
                     start, limit, budget, n_train=manifest["splits"]["train"]["n"])
        for t in found.trials:
            if t.peak_bytes:
                rec.log_metrics({"trial/peak_bytes": t.peak_bytes}, step=t.batch_size)
            if t.samples_per_s:
                rec.log_metrics({"trial/samples_per_s": t.samples_per_s}, step=t.batch_size)
        if found.largest is not None:
            rec.log_metrics({"largest_batch_size": found.largest, "largest_peak_bytes": found.peak_bytes})
        rec.log_dict({"trials": [t.__dict__ for t in found.trials],
                      "largest": found.largest, "peak_bytes": found.peak_bytes, "knee": found.knee(),
                      "knees": found.knees(),
                      "capped_at": found.capped_at}, "find_batch_size.json")
    return found
