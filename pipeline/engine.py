"""The training loop: batches cut by index, metrics kept on the device, checkpoints, signals.

The loop reports to a ``StepSink``; it does not know how figures are stored or buffered.
It syncs with the device only when it flushes (every ``flush_every`` steps), at validation
points and at checkpoints.
"""
from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

import torch
from torch import nn

from .config import TrainParams
from .data import Split
from .noise import NoiseScale, squared_norm


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the loop stopped at a step boundary after checkpointing."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class NonFiniteLoss(RuntimeError):
    pass


class StepSink(Protocol):
    def steps(self, chunk: "StepChunk") -> None: ...
    def point(self, key: str, value: float, samples: int) -> None: ...
    def resume_from(self, hist: "History", resumed_step: int) -> None: ...
    def ready(self) -> None: ...


class NullSink:
    def ready(self) -> None:
        pass

    def resume_from(self, hist: "History", resumed_step: int) -> None:
        pass

    def steps(self, chunk: "StepChunk") -> None:
        pass

    def point(self, key: str, value: float, samples: int) -> None:
        pass


@dataclass
class StepChunk:
    """Consecutive optimizer steps, read back from the device in one go."""
    step: list[int]          # 1-based optimizer step index
    samples: list[int]       # samples seen after the step
    loss: list[float]
    correct: list[int]       # correct predictions in the batch (classification; else empty)
    batch: list[int]         # samples in the batch
    lr: list[float]
    time: list[float]        # wall clock (time.time()) at the end of the step


@dataclass
class History:
    step: list[int] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    correct: list[int] = field(default_factory=list)
    batch: list[int] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    time: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    noise: list[tuple[int, float]] = field(default_factory=list)  # (samples, B_simple)

    def extend(self, chunk: StepChunk) -> None:
        for name in ("step", "samples", "loss", "correct", "batch", "lr", "time"):
            getattr(self, name).extend(getattr(chunk, name))


@dataclass
class FitResult:
    history: History
    steps: int
    samples: int
    train_seconds: float      # wall seconds in optimizer steps (validation excluded)
    target: dict | None       # first validation point that reached the target, or None
    noise_scale: float | None
    resumed_from_step: int


# ------------------------------------------------------------------ batching

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
    """

    def __init__(self, data: Split, p: TrainParams, batch_size: int, device: torch.device,
                 rank: int = 0, world: int = 1):
        self.p, self.batch_size, self.device = p, batch_size, device
        self.rank, self.world = rank, world
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


# ------------------------------------------------------------------ schedule

def scaled_lr(p: TrainParams, batch_size: int) -> float:
    ratio = batch_size / p.base_batch_size
    factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[p.lr_scaling]
    return p.lr * factor


def lr_at(p: TrainParams, batch_size: int, step: int, steps_per_epoch: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): scaled, with linear warm-up."""
    peak = scaled_lr(p, batch_size)
    warmup = p.warmup_epochs * steps_per_epoch
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / math.ceil(warmup)
    return peak


def eval_interval(p: TrainParams, steps_per_epoch: int) -> int:
    return p.eval_every_steps or max(1, math.ceil(steps_per_epoch / 10))


def make_optimizer(p: TrainParams, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The fused kernels: one call per step instead of several per parameter (on 2 CPU cores,
    Adam at batch size 64 ran 50k samples/s unfused, 66k fused, 784-128-10 MLP)."""
    if p.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=p.momentum, weight_decay=p.weight_decay,
                               fused=True)
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=p.weight_decay, fused=True)


@torch.no_grad()
def evaluate_split(model: nn.Module, data: Split, loss_fn: nn.Module, task: str,
                   batch_size: int = 4096) -> tuple[float, float]:
    """Mean loss and accuracy (nan for regression) over a split."""
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), device=data.x.device)
    correct = torch.zeros((), device=data.x.device, dtype=torch.int64)
    n = len(data)
    for i in range(0, n, batch_size):
        xb, yb = data.x[i:i + batch_size], data.y[i:i + batch_size]
        out = model(xb)
        total_loss += loss_fn(out, yb) * xb.shape[0]
        if task == "classification":
            correct += (out.argmax(1) == yb).sum()
    model.train(was_training)
    acc = correct.item() / n if task == "classification" else float("nan")
    return total_loss.item() / n, acc


def _reached(metric: str, value: float, target: float) -> bool:
    return value >= target if metric == "val_acc" else value <= target


# ------------------------------------------------------------------ signals

class StopSignals:
    """Turns SIGINT/SIGTERM into a request the loop honours at its next step boundary.

    Outside the loop (``deferred`` false) the signal raises Interrupted at once, so setup and
    teardown code can clean up through ordinary exception handling. A second SIGINT while
    deferred raises at once too.
    """

    def __init__(self):
        self.requested: int | None = None
        self.deferred = False
        self._old: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum, frame) -> None:
        if self.deferred and self.requested is None:
            self.requested = signum
            return
        raise Interrupted(signum)


# ------------------------------------------------------------------ checkpoints

def save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception:  # a checkpoint we cannot read is ignored, never trusted
        return None


# ------------------------------------------------------------------ the loop

def fit(model: nn.Module, train: Split, val: Split, p: TrainParams, batch_size: int, task: str,
        device: torch.device, sink: StepSink, *, flush_every: int = 500,
        checkpoint: Path | None = None, checkpoint_extra: dict | None = None,
        checkpoint_meta: dict | None = None,
        signals: StopSignals | None = None, progress=None, rank: int = 0, world: int = 1,
        max_seconds: float | None = None) -> FitResult:
    """Train ``model`` for ``p.epochs`` epochs at ``batch_size``; resume from ``checkpoint`` if it holds one.

    ``checkpoint_extra`` is stored in the checkpoint and must match on resume (it names the run
    configuration), so a checkpoint of other params is never resumed; ``checkpoint_meta`` is stored
    alongside and not compared. ``max_seconds`` stops after
    that much step time (the benchmark's cells).
    """
    torch.manual_seed(p.seed)
    model.to(device).train()
    criterion = _loss(task)
    net = model
    if world > 1:
        # Each rank's loss is its shard's sum over the global batch size, times the world size:
        # DDP averages gradients over ranks, so the result is the global batch's mean gradient
        # even when the last batch splits unevenly.
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(model)
        shard_loss = _loss(task, reduction="sum")
    batches = Batches(train, p, batch_size, device, rank, world)
    per_epoch = batches.per_epoch
    total_steps = per_epoch * p.epochs
    every_eval = eval_interval(p, per_epoch)
    optimizer = make_optimizer(p, model, lr_at(p, batch_size, 0, per_epoch))
    # Under DDP the half-batch trick would need gradients before their all-reduce: not measured.
    noise = NoiseScale(p.noise_scale_ema) if p.noise_scale and batch_size >= 2 and world == 1 else None
    params = [q for q in model.parameters() if q.requires_grad]
    val = val.to(device)
    _warm_up(model, p, criterion, batches)

    hist = History()
    step = samples = 0
    start_epoch = start_batch = 0
    train_seconds = 0.0
    target: dict | None = None
    resumed_from = 0
    state = load_checkpoint(checkpoint) if checkpoint and p.resume else None
    if state is not None and state.get("extra") == (checkpoint_extra or {}):
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for name in ("step", "samples", "loss", "correct", "batch", "lr", "time", "evals", "noise"):
            setattr(hist, name, list(state["history"][name]))
        hist.noise = [tuple(x) for x in hist.noise]
        step, samples = int(state["step"]), int(state["samples"])
        start_epoch, start_batch = int(state["epoch"]), int(state["batch"])
        train_seconds, target = float(state["train_seconds"]), state["target"]
        if noise is not None and state.get("noise_state"):
            noise.load_state_dict(state["noise_state"], device)
        torch.set_rng_state(state["rng"])
        resumed_from = step
        sink.resume_from(hist, step)

    if world > 1:
        # Every rank must resume from the same step (checkpoints/ shared between nodes), or the
        # ranks would wait on each other for ever: equal sum and sum of squares <=> all equal.
        from .dist import all_sum
        seen = all_sum(torch.tensor([float(step), float(step) ** 2], dtype=torch.float64), world)
        if seen.tolist() != [world * float(step), world * float(step) ** 2]:
            raise RuntimeError(f"rank {rank} would resume at step {step} but other ranks disagree: "
                               f"share the checkpoints/ folder between nodes or set train.resume=false")
    sink.ready()
    # Device-side buffers, read back at flush time only.
    pend_loss: list[torch.Tensor] = []
    pend_correct: list[torch.Tensor] = []
    pend_noise: list[tuple[int, torch.Tensor]] = []
    pend_step: list[int] = []
    pend_samples: list[int] = []
    pend_batch: list[int] = []
    pend_lr: list[float] = []
    pend_time: list[float] = []

    def flush() -> None:
        if not pend_step:
            return
        stacked = torch.stack(pend_loss).to(torch.float64)
        if pend_correct:
            stacked = torch.cat([stacked, torch.stack(pend_correct).to(torch.float64)])
        if world > 1:  # per-rank shares -> global figures, one collective per flush
            from .dist import all_sum
            stacked = all_sum(stacked, world)
        values = stacked.tolist()
        losses = values[:len(pend_loss)]
        correct = [int(round(c)) for c in values[len(pend_loss):]]
        if p.stop_on_nonfinite:
            bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
            if bad is not None:
                raise NonFiniteLoss(f"loss became {losses[bad]} at optimizer step {pend_step[bad]} "
                                    f"(batch size {batch_size}, lr {pend_lr[bad]:g}); "
                                    f"set train.stop_on_nonfinite=false to continue anyway")
        chunk = StepChunk(list(pend_step), list(pend_samples), losses, correct, list(pend_batch),
                          list(pend_lr), list(pend_time))
        hist.extend(chunk)
        sink.steps(chunk)
        if progress is not None:
            progress.update(len(chunk.step))
        for s, value in pend_noise:
            v = float(value)
            hist.noise.append((s, v))
            sink.point("noise/b_simple", v, s)
        for buf in (pend_loss, pend_correct, pend_noise, pend_step, pend_samples, pend_batch, pend_lr, pend_time):
            buf.clear()

    def snapshot(epoch: int, batch: int) -> None:
        if checkpoint is None:
            return
        flush()
        if rank != 0:
            return
        save_checkpoint(checkpoint, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "step": step, "samples": samples, "epoch": epoch, "batch": batch,
            "train_seconds": train_seconds, "target": target,
            "history": {k: getattr(hist, k) for k in
                        ("step", "samples", "loss", "correct", "batch", "lr", "time", "evals", "noise")},
            "noise_state": noise.state_dict() if noise is not None else None,
            "rng": torch.get_rng_state(), "extra": checkpoint_extra or {}, "meta": checkpoint_meta or {},
        })

    def validate(epoch_end: bool) -> None:
        nonlocal target
        flush()
        v_loss, v_acc = evaluate_split(model, val, criterion, task)
        point = {"step": step, "samples": samples, "val_loss": v_loss, "val_acc": v_acc,
                 "train_seconds": train_seconds, "epoch_end": epoch_end}
        hist.evals.append(point)
        sink.point("val/loss", v_loss, samples)
        if task == "classification":
            sink.point("val/acc", v_acc, samples)
        value = v_acc if p.target_metric == "val_acc" else v_loss
        if target is None and _reached(p.target_metric, value, p.target_value):
            target = {"step": step, "samples": samples, "seconds": train_seconds, "value": value}

    classify = task == "classification"
    peak_lr = scaled_lr(p, batch_size)
    warmup_steps = math.ceil(p.warmup_epochs * per_epoch)
    lr = lr_at(p, batch_size, step, per_epoch)
    clock_offset = time.time() - time.perf_counter()  # perf_counter -> wall clock, for timestamps
    if signals is not None:
        # Under torchrun each rank gets the signal at its own step; stopping at a step boundary
        # would need an agreement per step, so there the signal ends the process at once.
        signals.deferred = world == 1
    try:
        for epoch in range(start_epoch, p.epochs):
            epoch_t0 = time.perf_counter()
            first = start_batch if epoch == start_epoch else 0
            t_last = time.perf_counter()
            for b, (xb, yb) in enumerate(batches.epoch(epoch, first), start=first):
                if step < warmup_steps:
                    lr = lr_at(p, batch_size, step, per_epoch)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                elif lr != peak_lr:
                    lr = peak_lr
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                n_b = xb.shape[0] if world == 1 else min(batch_size, batches.n - b * batch_size)
                if noise is not None and n_b >= 2 and step % p.noise_scale_every == 0:
                    out, loss = _noise_step(model, criterion, xb, yb, params, noise, pend_noise, samples + n_b)
                elif world > 1:
                    optimizer.zero_grad(set_to_none=True)
                    out = net(xb)
                    (shard_loss(out, yb) * (world / n_b)).backward()
                    loss = shard_loss(out.detach(), yb) / n_b  # this rank's share of the mean
                else:
                    optimizer.zero_grad(set_to_none=True)
                    out = model(xb)
                    loss = criterion(out, yb)
                    loss.backward()
                optimizer.step()
                step += 1
                samples += n_b
                pend_loss.append(loss.detach())
                if classify:
                    pend_correct.append((out.argmax(1) == yb).sum())
                pend_step.append(step)
                pend_samples.append(samples)
                pend_batch.append(n_b)
                pend_lr.append(lr)
                now = time.perf_counter()
                train_seconds += now - t_last
                pend_time.append(now + clock_offset)
                if len(pend_step) >= flush_every:
                    flush()
                last_of_epoch = b == per_epoch - 1
                if step % every_eval == 0 or last_of_epoch:
                    validate(last_of_epoch)
                if p.checkpoint_every_steps and step % p.checkpoint_every_steps == 0 and not last_of_epoch:
                    snapshot(epoch, b + 1)
                if signals is not None and signals.requested is not None:
                    if last_of_epoch:
                        snapshot(epoch + 1, 0)
                    else:
                        snapshot(epoch, b + 1)
                    raise Interrupted(signals.requested)
                if max_seconds is not None and train_seconds >= max_seconds:
                    break
                t_last = time.perf_counter()
            flush()
            if max_seconds is not None and train_seconds >= max_seconds:
                break
            sink.point("epoch/wall_seconds", time.perf_counter() - epoch_t0, samples)
            if epoch + 1 < p.epochs:
                snapshot(epoch + 1, 0)
        flush()
    finally:
        if signals is not None:
            signals.deferred = False
    b_simple = hist.noise[-1][1] if hist.noise else None
    return FitResult(hist, step, samples, train_seconds, target, b_simple, resumed_from)


def _warm_up(model: nn.Module, p: TrainParams, criterion: nn.Module, batches: Batches) -> None:
    """One step on a throwaway copy: the first optimizer step imports and initialises library
    code (seconds on CPU) that would otherwise be counted in the first steps' time."""
    import copy

    clone = copy.deepcopy(model)
    opt = make_optimizer(p, clone, 1e-9)
    xb, yb = batches.data.x[:2], batches.data.y[:2]
    opt.zero_grad()
    criterion(clone(xb.to(batches.device)), yb.to(batches.device)).backward()
    opt.step()


def _loss(task: str, reduction: str = "mean") -> nn.Module:
    from .models import loss_fn
    return loss_fn(task, reduction)


def _noise_step(model, criterion, xb, yb, params, noise: NoiseScale, pending: list, samples: int):
    """One step's gradient from two half batches, so |G|^2 is seen at two batch sizes."""
    n = xb.shape[0]
    half = n // 2
    out_a = model(xb[:half])
    loss_a = criterion(out_a, yb[:half])
    grads_a = torch.autograd.grad(loss_a, params)
    out_b = model(xb[half:])
    loss_b = criterion(out_b, yb[half:])
    grads_b = torch.autograd.grad(loss_b, params)
    wa, wb = half / n, (n - half) / n
    for q, ga, gb in zip(params, grads_a, grads_b):
        q.grad = wa * ga + wb * gb
    small_sq = 0.5 * (squared_norm(list(grads_a)) + squared_norm(list(grads_b)))
    big_sq = squared_norm([q.grad for q in params])
    pending.append((samples, noise.update(small_sq, big_sq, n / 2, n)))
    out = torch.cat([out_a, out_b])
    loss = wa * loss_a + wb * loss_b
    return out, loss
