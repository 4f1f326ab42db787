"""The training loop: set the learning rate, take a step, record it, then maybe validate,
checkpoint or stop.

The loop reports to a ``StepSink``; it does not know how figures are stored or buffered.
It syncs with the device only when it drains its pending figures (every ``flush_every``
steps), at validation points and at checkpoints; on a GPU the wait for the queued steps at those
points is counted as step time.
"""
from __future__ import annotations

import copy
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn

from .batches import Batches
from ..config import TrainParams
from .data import Split
from .dist import Dist, all_sum
from .noise import NoiseScale, squared_norm
from .records import History, StepChunk
from .signals import Interrupted, NonFiniteLoss, StopSignals
from .system import sync


class StepSink(Protocol):
    def steps(self, chunk: StepChunk) -> None: ...
    def point(self, key: str, value: float, samples: int) -> None: ...
    def resume_from(self, hist: History, resumed_step: int) -> None: ...
    def ready(self) -> None: ...


class NullSink:
    def ready(self) -> None:
        pass

    def resume_from(self, hist: History, resumed_step: int) -> None:
        pass

    def steps(self, chunk: StepChunk) -> None:
        pass

    def point(self, key: str, value: float, samples: int) -> None:
        pass


@dataclass
class LoopState:
    """Where the loop is: everything a resume needs besides model, optimizer and RNG."""
    step: int = 0             # optimizer steps taken
    samples: int = 0          # samples seen
    epoch: int = 0            # position of the next batch: epoch ...
    batch: int = 0            # ... and batch within it
    seconds: float = 0.0      # wall seconds in optimizer steps (validation excluded)
    target: dict | None = None  # first validation point that reached the target
    history: History = field(default_factory=History)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "samples": self.samples, "epoch": self.epoch, "batch": self.batch,
                "seconds": self.seconds, "target": self.target, "history": self.history.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.samples = int(state["step"]), int(state["samples"])
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self.seconds, self.target = float(state["seconds"]), state["target"]
        self.history.load_state_dict(state["history"])


@dataclass
class FitResult:
    history: History
    steps: int
    samples: int
    train_seconds: float      # wall seconds in optimizer steps (validation excluded)
    target: dict | None       # first validation point that reached the target, or None
    noise_scale: float | None
    resumed_from_step: int
    step_memory_bytes: int = 0  # what a step holds for its batch (``step_memory``)


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


def reached(metric: str, value: float, target: float) -> bool:
    return value >= target if metric == "val_acc" else value <= target


# ------------------------------------------------------------------ checkpoints

@dataclass(frozen=True)
class Checkpoint:
    """Where a run's checkpoint lives. ``key`` names the run configuration and must match on
    resume, so a checkpoint of other params is never resumed; ``meta`` (the MLflow run id) is
    stored alongside and not compared."""
    path: Path
    key: dict
    meta: dict = field(default_factory=dict)

    def save(self, state: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        torch.save(state | {"key": self.key, "meta": self.meta}, tmp)
        os.replace(tmp, self.path)

    def read(self) -> dict | None:
        """The stored state, whatever its key. One that cannot be read is moved aside (and
        said so), never trusted and never silently dropped."""
        if not self.path.is_file():
            return None
        try:
            return torch.load(self.path, weights_only=True)
        except Exception as err:
            aside = self.path.with_name(self.path.name + ".unreadable")
            os.replace(self.path, aside)
            print(f"warning: checkpoint {self.path} cannot be read ({type(err).__name__}); "
                  f"moved to {aside.name}, training starts from step 0", file=sys.stderr)
            return None

    def load(self) -> dict | None:
        state = self.read()
        return state if state is not None and state.get("key") == self.key else None

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


# ------------------------------------------------------------------ pending figures

class Pending:
    """Figures of steps not yet read back from the device: losses and correct counts stay
    tensors until ``drain`` reads them all in one transfer (and one all-reduce under DDP)."""

    def __init__(self):
        self.loss: list[torch.Tensor] = []
        self.correct: list[torch.Tensor] = []
        self.noise: list[tuple[int, torch.Tensor]] = []  # (0-based index of the step, B_simple)
        self.host: list[tuple[int, int, int, float, float, float]] = []  # step, samples, batch, lr, time, seconds

    def __len__(self) -> int:
        return len(self.host)

    def add(self, step: int, samples: int, batch: int, lr: float, t: float, seconds: float,
            loss: torch.Tensor, correct: torch.Tensor | None) -> None:
        self.loss.append(loss.detach())
        if correct is not None:
            self.correct.append(correct)
        self.host.append((step, samples, batch, lr, t, seconds))

    def drain(self, world: int) -> tuple[StepChunk, list[tuple[int, float]]]:
        """The pending steps as a chunk, and the noise-scale values at the samples seen after
        their steps; empties the buffers."""
        stacked = torch.stack(self.loss).to(torch.float64)
        if self.correct:
            stacked = torch.cat([stacked, torch.stack(self.correct).to(torch.float64)])
        values = all_sum(stacked, world).tolist()  # per-rank shares -> global figures
        n, m = len(self.loss), len(self.correct)
        step, samples, batch, lr, t, seconds = (list(col) for col in zip(*self.host))
        chunk = StepChunk(step, samples, values[:n], [int(round(c)) for c in values[n:n + m]], batch, lr, t, seconds)
        # Noise values are one rank's (never all-reduced): read in one more transfer, not one each.
        ratios = torch.stack([v for _, v in self.noise]).double().tolist() if self.noise else []
        noise = [(samples[index + 1 - step[0]], v) for (index, _), v in zip(self.noise, ratios)]
        self.loss, self.correct, self.noise, self.host = [], [], [], []
        return chunk, noise


def check_finite(chunk: StepChunk, batch_size: int) -> None:
    bad = next((i for i, v in enumerate(chunk.loss) if not math.isfinite(v)), None)
    if bad is not None:
        raise NonFiniteLoss(f"loss became {chunk.loss[bad]} at optimizer step {chunk.step[bad]} "
                            f"(batch size {batch_size}, lr {chunk.lr[bad]:g}); "
                            f"set train.stop_on_nonfinite=false to continue anyway")


# ------------------------------------------------------------------ precision

class Precision:
    """``train.precision``: autocast around forward and loss; fp16 scales the loss so that small
    gradients survive (torch.amp.GradScaler), bf16 and fp32 need no scaling."""

    def __init__(self, p: TrainParams, device: torch.device):
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[p.precision]
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type) if p.precision == "fp16" else None

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None)

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()


def prepare_model(model: nn.Module, p: TrainParams, device: torch.device) -> nn.Module:
    """The module the steps call: the model on its device, in channels-last layout and compiled
    when asked. Its parameters are the model's own (the state dict is unchanged)."""
    model = model.to(device)
    if p.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if p.compile != "none":
        return torch.compile(model, mode=p.compile)
    return model


# ------------------------------------------------------------------ one optimizer step

StepFn = Callable[[torch.Tensor, torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]]


def make_step(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
              p: TrainParams, task: str, dist: Dist, noise: NoiseScale | None, pending: Pending,
              precision: Precision | None = None, net: nn.Module | None = None) -> StepFn:
    """The step for this run: ``step(xb, yb, n_b, step_index) -> (outputs, mean loss)``.

    Under DDP each rank's loss is its shard's sum over the global batch size, times the world
    size: DDP averages gradients over ranks, so the result is the global batch's mean gradient
    even when the last batch splits unevenly. The noise-scale step computes the gradient from
    two half batches every ``noise_scale_every`` steps (one rank only: under DDP it would need
    gradients before their all-reduce, not measured). ``net`` is the module to call (compiled,
    channels-last) when it is not ``model`` itself.
    """
    precision = precision or Precision(p, torch.device("cpu"))
    net = net if net is not None else model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel
        ddp = DistributedDataParallel(net)
        shard_loss = _loss(task, reduction="sum")

        def ddp_step(xb, yb, n_b, index):
            optimizer.zero_grad(set_to_none=True)
            with precision.autocast():
                out = ddp(xb)
                loss = shard_loss(out, yb) * (dist.world / n_b)
            precision.backward_step(loss, optimizer)
            return out, shard_loss(out.detach().float(), yb) / n_b  # this rank's share of the mean
        return ddp_step

    def plain_step(xb, yb, n_b, index):
        optimizer.zero_grad(set_to_none=True)
        if p.channels_last and xb.ndim == 4:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with precision.autocast():
            out = net(xb)
            loss = criterion(out, yb)
        precision.backward_step(loss, optimizer)
        return out, loss

    if noise is None:
        return plain_step
    params = [q for q in model.parameters() if q.requires_grad]

    def noise_step(xb, yb, n_b, index):
        if n_b < 2 or index % p.noise_scale_every or precision.scaler is not None:
            return plain_step(xb, yb, n_b, index)  # fp16: scaled gradients would need unscaling first
        with precision.autocast():
            out, loss, b_simple = _half_batch_gradients(net, criterion, xb, yb, params, noise)
        optimizer.step()
        pending.noise.append((index, b_simple))
        return out, loss
    return noise_step


def _half_batch_gradients(model, criterion, xb, yb, params, noise: NoiseScale):
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
    b_simple = noise.update(small_sq, big_sq, n / 2, n)
    return torch.cat([out_a, out_b]), wa * loss_a + wb * loss_b, b_simple


def _loss(task: str, reduction: str = "mean") -> nn.Module:
    from .models import loss_fn
    return loss_fn(task, reduction)


# ------------------------------------------------------------------ the loop

class Trainer:
    """One training run's parts; ``fit`` below is the loop over them."""

    def __init__(self, model: nn.Module, train: Split, val: Split, p: TrainParams, batch_size: int,
                 task: str, device: torch.device, sink: StepSink, dist: Dist,
                 checkpoint: Checkpoint | None, progress, augment=None):
        self.model, self.p, self.batch_size, self.task = model.to(device).train(), p, batch_size, task
        self.sink, self.dist, self.checkpoint, self.progress = sink, dist, checkpoint, progress
        self.criterion = _loss(task)
        self.precision = Precision(p, device)
        self.net = prepare_model(self.model, p, device)
        self.batches = Batches(train, p, batch_size, device, dist, augment)
        self.per_epoch = self.batches.per_epoch
        self.every_eval = eval_interval(p, self.per_epoch)
        self.lr = lr_at(p, batch_size, 0, self.per_epoch)
        self.optimizer = make_optimizer(p, self.model, self.lr)
        self.noise = NoiseScale(p.noise_scale_ema) if p.noise_scale and batch_size >= 2 and dist.world == 1 else None
        self.pending = Pending()
        self.step = make_step(self.model, self.criterion, self.optimizer, p, task, dist, self.noise, self.pending,
                              self.precision, self.net)
        self.val = val.to(device)
        self.state = LoopState()
        self.resumed_from = 0
        _warm_up(self.model, p, self.criterion, self.batches)
        if p.compile != "none":
            _warm_up_compiled(self.net, self.model, self.criterion, self.batches, self.precision)

    def set_lr(self, lr: float) -> float:
        if lr != self.lr:
            self.lr = lr
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        return lr

    def record(self, b: int, n_b: int, seconds: float, t: float, out, yb, loss) -> None:
        s = self.state
        s.step, s.samples, s.seconds = s.step + 1, s.samples + n_b, s.seconds + seconds
        s.epoch, s.batch = (s.epoch + 1, 0) if b + 1 == self.per_epoch else (s.epoch, b + 1)
        correct = (out.argmax(1) == yb).sum() if self.task == "classification" else None
        self.pending.add(s.step, s.samples, n_b, self.lr, t, seconds, loss, correct)

    def flush(self) -> None:
        if not len(self.pending):
            return
        if self.batches.device.type == "cuda":
            # The steps were only queued: their time on the card ends here. Without this wait the
            # time would fall to validation (not counted) and the rate would read too high.
            t0 = time.perf_counter()
            sync(self.batches.device)
            self.state.seconds += time.perf_counter() - t0
        chunk, noise = self.pending.drain(self.dist.world)
        if self.p.stop_on_nonfinite:
            check_finite(chunk, self.batch_size)
        self.state.history.extend(chunk)
        self.sink.steps(chunk)
        if self.progress is not None:
            self.progress.update(len(chunk.step))
        for samples, value in noise:
            self.state.history.noise.append((samples, value))
            self.sink.point("train/noise_scale", value, samples)

    def validate(self, epoch_end: bool) -> None:
        self.flush()
        s, p = self.state, self.p
        v_loss, v_acc = evaluate_split(self.model, self.val, self.criterion, self.task)
        s.history.evals.append({"step": s.step, "samples": s.samples, "val_loss": v_loss, "val_acc": v_acc,
                                "train_seconds": s.seconds, "epoch_end": epoch_end})
        self.sink.point("val/loss", v_loss, s.samples)
        if self.task == "classification":
            self.sink.point("val/acc", v_acc, s.samples)
        value = v_acc if p.target_metric == "val_acc" else v_loss
        if s.target is None and reached(p.target_metric, value, p.target_value):
            s.target = {"step": s.step, "samples": s.samples, "seconds": s.seconds, "value": value}

    def save(self) -> None:
        if self.checkpoint is None:
            return
        self.flush()
        if self.dist.main:
            self.checkpoint.save({
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "loop": self.state.state_dict(), "rng": torch.get_rng_state(),
                "noise_state": self.noise.state_dict() if self.noise is not None else None,
                "scaler": self.precision.scaler.state_dict() if self.precision.scaler is not None else None})

    def resume(self) -> None:
        saved = self.checkpoint.load() if self.checkpoint and self.p.resume else None
        if saved is not None:
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.lr = self.optimizer.param_groups[0]["lr"]
            self.state.load_state_dict(saved["loop"])
            if self.noise is not None and saved.get("noise_state"):
                self.noise.load_state_dict(saved["noise_state"], self.val.x.device)
            torch.set_rng_state(saved["rng"])
            if self.precision.scaler is not None and saved.get("scaler"):
                self.precision.scaler.load_state_dict(saved["scaler"])
            self.resumed_from = self.state.step
            self.sink.resume_from(self.state.history, self.state.step)
        if self.dist.world > 1:
            # Every rank must resume from the same step (checkpoints/ shared between nodes), or
            # the ranks would wait on each other for ever: equal sum and sum of squares <=> all equal.
            step, world = float(self.state.step), self.dist.world
            seen = all_sum(torch.tensor([step, step ** 2], dtype=torch.float64), world)
            if seen.tolist() != [world * step, world * step ** 2]:
                raise RuntimeError(f"rank {self.dist.rank} would resume at step {self.state.step} but other "
                                   f"ranks disagree: share the checkpoints/ folder between nodes or set "
                                   f"train.resume=false")

    def step_bytes(self) -> int:
        """``step_memory`` of a full batch of this run's data."""
        x, y = self.batches.head(min(self.batch_size, self.batches.n))
        # Copies: a slice would share (and be counted as) the whole data set's storage.
        return step_memory(self.model, self.criterion, x.clone(), y.clone())

    def result(self) -> FitResult:
        s = self.state
        b_simple = s.history.noise[-1][1] if s.history.noise else None
        return FitResult(s.history, s.step, s.samples, s.seconds, s.target, b_simple, self.resumed_from,
                         self.step_bytes())


def fit(model: nn.Module, train: Split, val: Split, p: TrainParams, batch_size: int, task: str,
        device: torch.device, sink: StepSink, *, checkpoint: Checkpoint | None = None,
        signals: StopSignals | None = None, progress=None, dist: Dist = Dist(),
        flush_every: int = 500, max_seconds: float | None = None, augment=None) -> FitResult:
    """Train ``model`` for ``p.epochs`` epochs at ``batch_size``; resume from ``checkpoint`` if it
    holds this configuration. ``max_seconds`` stops after that much step time (bench cells)."""
    torch.manual_seed(p.seed)
    t = Trainer(model, train, val, p, batch_size, task, device, sink, dist, checkpoint, progress, augment)
    t.resume()
    s = t.state
    sink.ready()
    clock = time.time() - time.perf_counter()  # perf_counter -> wall clock, for timestamps
    out_of_time = False
    if signals is not None:
        # Under torchrun each rank gets the signal at its own step; stopping at a step boundary
        # would need an agreement per step, so there the signal ends the process at once.
        signals.immediate = dist.world > 1
        signals.check()  # a signal during set-up stops here: nothing trained since the checkpoint
    while s.epoch < p.epochs and not out_of_time:
        epoch, t_last = s.epoch, time.perf_counter()
        for b, (xb, yb) in enumerate(t.batches.epoch(epoch, s.batch), start=s.batch):
            t.set_lr(lr_at(p, batch_size, s.step, t.per_epoch))
            n_b = t.batches.samples_in(b, xb)
            out, loss = t.step(xb, yb, n_b, s.step)
            now = time.perf_counter()
            t.record(b, n_b, now - t_last, now + clock, out, yb, loss)
            if len(t.pending) >= flush_every:
                t.flush()
            epoch_end = s.epoch > epoch
            if s.step % t.every_eval == 0 or epoch_end:
                t.validate(epoch_end)
            if (p.checkpoint_every_steps and s.step % p.checkpoint_every_steps == 0 and not epoch_end) \
                    or (signals is not None and signals.requested is not None):
                t.save()
            if signals is not None and signals.requested is not None:
                raise Interrupted(signals.requested)
            out_of_time = max_seconds is not None and s.seconds >= max_seconds
            if out_of_time:
                break
            t_last = time.perf_counter()
        t.flush()
        if not out_of_time and s.epoch < p.epochs:
            t.save()
    # A signal after the last step is left recorded: the run's outputs are written whole.
    return t.result()


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


def _warm_up_compiled(net: nn.Module, model: nn.Module, criterion: nn.Module, batches: Batches,
                      precision: Precision) -> None:
    """Compile before the clock starts: a forward and backward pass through the compiled module
    at the run's batch size (compiling takes seconds to minutes, and would read as step time).
    The model's buffers (batch-norm statistics) and gradients are restored: the run trains as if
    this never happened."""
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    full = min(batches.batch_size, batches.n)
    for n in {full, batches.n % batches.batch_size or full}:  # the last batch may be smaller
        xb, yb = batches.head(n)
        with precision.autocast():
            loss = criterion(net(xb), yb)
        loss.backward()
        model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(buffers[k])
    sync(batches.device)


def _warm_up(model: nn.Module, p: TrainParams, criterion: nn.Module, batches: Batches) -> None:
    """One step on a throwaway copy: the first optimizer step imports and initialises library
    code (seconds on CPU) that would otherwise be counted in the first steps' time."""
    clone = copy.deepcopy(model)
    opt = make_optimizer(p, clone, 1e-9)
    xb, yb = batches.head(2)
    opt.zero_grad()
    criterion(clone(xb), yb).backward()
    opt.step()
    sync(batches.device)  # its kernels are not the first steps' time
