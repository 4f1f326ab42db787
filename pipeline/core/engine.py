"""The training loop: set the learning rate, take a step, record it, then maybe validate,
checkpoint or stop. ``fit`` is the loop, read top to bottom; ``Trainer`` holds a run's parts.

The loop reports to a ``StepSink``; it does not know how figures are stored or buffered.
It syncs with the device only when it drains its pending figures (every ``flush_every`` steps
or ``FLUSH_SECONDS``), at validations and at checkpoints; on a GPU the wait for the queued steps
at those points is counted as step time.

What the loop does besides its steps is paced so that it costs a small share of the loop's wall
time (``Trainer.loop_figures`` measures it): validations are spaced by what they cost against a
step (``cost.eval_gap``), checkpoints are written every CHECKPOINT_SECONDS, figures drain in chunks.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ..config import TrainParams
from ..steplog import StepLog, Steps
from .batches import Batches
from .checkpoint import Checkpoint
from .compute import Precision, make_optimizer, prepare_model, warm_up, warm_up_compiled
from .cost import MAX_EVAL_CHUNK, eval_chunk, eval_gap, forward_flops
from .data import Split
from .dist import Dist, all_sum
from .memory import step_memory
from .pending import Pending
from .signals import Interrupted, NonFiniteLoss, StopSignals
from .system import sync
from .variants import DataParallelStep


# Figures drain at least this often, so that a run's live metrics trail its steps by seconds.
FLUSH_SECONDS = 2.0
# Where validations are spaced out for their cost, the training loss is read every 1/PROBES of the
# spacing; at most NEAR times the easiest target not yet reached, a validation comes early
# (``Trainer.probe``).
PROBES, NEAR = 16, 1.5
# A checkpoint (where train.checkpoint_every_steps is 0) after this many seconds of the loop: a
# stopped run loses at most this much; a signal saves at once whatever the interval.
CHECKPOINT_SECONDS = 60.0


class StepSink(Protocol):
    def steps(self, steps: Steps) -> None: ...
    def point(self, key: str, value: float, samples: int) -> None: ...
    def resume_from(self, log: StepLog, resumed_step: int) -> None: ...


class NullSink:
    def resume_from(self, log: StepLog, resumed_step: int) -> None:
        pass

    def steps(self, steps: Steps) -> None:
        pass

    def point(self, key: str, value: float, samples: int) -> None:
        pass


@dataclass(frozen=True)
class TrainSpec:
    """What one training is: its data, params and batch size, and where it computes."""
    train: Split
    val: Split
    params: TrainParams
    batch_size: int
    task: str                                   # classification | regression
    device: torch.device = torch.device("cpu")
    dist: Dist = Dist()
    augment: Any = None                         # a BatchAugment, applied to each batch


@dataclass
class Hooks:
    """Who hears from the loop, and what may stop or resume it."""
    sink: StepSink = field(default_factory=NullSink)
    checkpoint: Checkpoint | None = None
    signals: StopSignals | None = None
    progress: Any = None                        # a tqdm bar, advanced as steps drain


@dataclass
class LoopState:
    """Where the loop is: everything a resume needs besides model, optimizer and RNG."""
    step: int = 0             # optimizer steps taken
    samples: int = 0          # samples seen
    epoch: int = 0            # position of the next batch: epoch ...
    batch: int = 0            # ... and batch within it
    seconds: float = 0.0      # wall seconds in optimizer steps (validation excluded)
    crossings: dict = field(default_factory=dict)  # target (as text) -> where validation first reached it
    history: StepLog = field(default_factory=StepLog)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "samples": self.samples, "epoch": self.epoch, "batch": self.batch,
                "seconds": self.seconds, "crossings": self.crossings, "history": self.history.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.samples = int(state["step"]), int(state["samples"])
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self.seconds, self.crossings = float(state["seconds"]), dict(state["crossings"])
        self.history.load_state_dict(state["history"])


@dataclass
class FitResult:
    history: StepLog
    steps: int
    samples: int
    train_seconds: float      # wall seconds in optimizer steps (validation excluded)
    crossings: dict           # target (as text) -> its crossing (``Trainer.validate``); missed ones absent
    headline: str             # the key of train.target_value in ``crossings``
    resumed_from_step: int
    budget: int = 0           # the steps the run was allowed
    step_memory_bytes: int = 0  # what a step holds for its batch (``memory.step_memory``)
    loop: dict = field(default_factory=dict)  # this process's loop: wall seconds, step seconds, each extra's

    @property
    def target(self) -> dict | None:
        """Where the run reached train.target_value, or None."""
        return self.crossings.get(self.headline)



# ------------------------------------------------------------------ schedule and figures

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


def next_eval(p: TrainParams, step: int, gap: int = 1) -> int:
    """The step of the validation after ``step``: every ``eval_every_steps``, or by default 10 %
    further on (about 25 validations per tenfold of steps, so steps to a target are read to a few
    percent at any training length) but at least ``gap`` steps on (``cost.eval_gap``: validations
    that cost more than a small share of the steps are spaced further apart)."""
    if p.eval_every_steps:
        return (step // p.eval_every_steps + 1) * p.eval_every_steps
    return max(step + gap, math.ceil(step * 1.1))


def budget_steps(p: TrainParams, steps_per_epoch: int) -> int:
    """The steps a run may take: train.max_steps, capped by train.epochs where that is set."""
    return min(p.max_steps, p.epochs * steps_per_epoch) if p.epochs else p.max_steps


def target_key(value: float) -> str:
    return f"{value:g}"


def crossing(metric: str, target: float, before: dict | None, after: dict) -> dict[str, float]:
    """Where the validation curve crossed ``target`` between two validations: step, samples and
    step seconds interpolated (a loss in its logarithm, where it falls about evenly; an accuracy
    linearly). Without an earlier validation, the validation that reached it."""
    w = 1.0
    if before is not None and before["step"] != after["step"]:
        a, b = before[metric], after[metric]
        if metric == "val_loss" and a > 0 and b > 0 and target > 0:
            a, b, target = math.log(a), math.log(b), math.log(target)
        if a != b:
            w = min(1.0, max(0.0, (a - target) / (a - b)))

    def at(key: str) -> float:
        return float(after[key]) if w == 1.0 else float(before[key]) + w * (after[key] - before[key])
    return {"step": at("step"), "samples": at("samples"), "seconds": at("train_seconds"),
            "eval_step": after["step"], "value": after[metric],
            # How far apart the two validations were: the crossing is read to within this many steps.
            "bracket": after["step"] - (before["step"] if before is not None else 0)}


@torch.no_grad()
def evaluate_split(model: nn.Module, data: Split, loss_fn: nn.Module, task: str,
                   batch_size: int = MAX_EVAL_CHUNK) -> tuple[float, float]:
    """Mean loss and accuracy (nan for regression) over a split, read back from the device once."""
    was_training = model.training
    model.eval()
    sums = []
    n = len(data)
    for i in range(0, n, batch_size):
        xb, yb = data.x[i:i + batch_size], data.y[i:i + batch_size]
        out = model(xb)
        loss = loss_fn(out, yb).float() * xb.shape[0]
        sums.append(torch.stack([loss, (out.argmax(1) == yb).sum().float()]) if task == "classification" else loss)
    model.train(was_training)
    got = (sums[0] if len(sums) == 1 else torch.stack(sums).sum(0)).tolist()
    loss_sum, correct = got if task == "classification" else (got, float("nan"))
    return loss_sum / n, correct / n


def reached(metric: str, value: float, target: float) -> bool:
    return value >= target if metric == "val_acc" else value <= target


def check_finite(steps: Steps, batch_size: int) -> None:
    bad = next((i for i, v in enumerate(steps.loss) if not math.isfinite(v)), None)
    if bad is not None:
        raise NonFiniteLoss(f"loss became {steps.loss[bad]} at optimizer step {steps.step[bad]} "
                            f"(batch size {batch_size}, lr {steps.lr[bad]:g}); "
                            f"set train.stop_on_nonfinite=false to continue anyway")


def _loss(task: str, reduction: str = "mean") -> nn.Module:
    from .models import loss_fn
    return loss_fn(task, reduction)


# ------------------------------------------------------------------ the loop

def fit(model: nn.Module, spec: TrainSpec, hooks: Hooks | None = None, *, flush_every: int = 500,
        max_seconds: float | None = None) -> FitResult:
    """Train ``model`` at ``spec.batch_size`` until train.target_value (where stop_at_target) or
    the budget (``budget_steps``), resuming from a checkpoint of this configuration.
    ``max_seconds`` stops after that much step time (bench cells)."""
    p = spec.params
    torch.manual_seed(p.seed)
    t = Trainer(model, spec, hooks or Hooks())
    t.start()
    s, out_of_time = t.state, False
    # perf_counter -> wall clock, for timestamps; never before the last step's (a resume under a
    # clock set back, or another machine's): a run's stamps never run backwards.
    clock = max(time.time(), s.history.time[-1] if s.history.time else 0.0) - time.perf_counter()
    while not (t.done or out_of_time):
        epoch, t_last = s.epoch, time.perf_counter()
        for b, (xb, yb) in enumerate(t.batches.epoch(epoch, s.batch), start=s.batch):
            # -- set the learning rate
            t.set_lr(lr_at(p, spec.batch_size, s.step, t.per_epoch))
            n_b = t.batches.samples_in(b, xb)
            # -- forward, backward, update: the plain step, unless a variant takes this one
            if t.variant is not None and t.variant.takes(n_b, s.step):
                out, loss = t.variant(xb, yb, n_b, s.step)
            else:
                t.optimizer.zero_grad(set_to_none=True)
                if p.channels_last and xb.ndim == 4:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                with t.precision.autocast():
                    out = t.net(xb)
                    loss = t.criterion(out, yb)
                t.precision.backward_step(loss, t.optimizer)
            # -- record the step: its figures stay on the device until the buffer drains
            now = time.perf_counter()
            s.step, s.samples, s.seconds = s.step + 1, s.samples + n_b, s.seconds + (now - t_last)
            s.epoch, s.batch = (s.epoch + 1, 0) if b + 1 == t.per_epoch else (s.epoch, b + 1)
            t.pending.add(step=s.step, samples=s.samples, batch=n_b, loss=loss, lr=t.lr, time=now + clock,
                          seconds=now - t_last,
                          correct=(out, yb) if spec.task == "classification" else None)
            if t.pending.full(flush_every) or now - t.flushed >= FLUSH_SECONDS:
                t.flush()
            # -- validate, checkpoint, stop where a signal asks to
            t.after_step(s.epoch > epoch, loss)
            # -- termination: the target reached, the budget spent, or the bench's time up
            out_of_time = max_seconds is not None and s.seconds >= max_seconds
            if t.done or out_of_time:
                break
            t_last = time.perf_counter()
    t.flush()
    t.validate_last()
    # A signal after the last step is left recorded: the run's outputs are written whole.
    return t.result()


class Trainer:
    """One training run's parts, and what the loop does besides the step: drain the buffer,
    validate, checkpoint, resume."""

    def __init__(self, model: nn.Module, spec: TrainSpec, hooks: Hooks):
        p, device = spec.params, spec.device
        self.spec, self.p, self.hooks = spec, p, hooks
        self.model = model.to(device).train()
        self.criterion = _loss(spec.task)
        self.precision = Precision(p, device)
        self.net = prepare_model(self.model, p, device)
        self.batches = Batches(spec.train, p, spec.batch_size, device, spec.dist, spec.augment)
        self.per_epoch = self.batches.per_epoch
        self.budget = budget_steps(p, self.per_epoch)
        self.targets = p.targets()
        self.lr = lr_at(p, spec.batch_size, 0, self.per_epoch)
        self.optimizer = make_optimizer(p, self.model, self.lr)
        self.pending = Pending()
        self.variant = self._variant()
        self.val = spec.val.to(device)
        self.state = LoopState()
        self.resumed_from = 0
        # Where this process's loop spends its wall time besides the steps (``loop_figures``).
        self.spent = {"validation": 0.0, "checkpoint": 0.0}
        self._loop_start, self._seconds_at_start = 0.0, 0.0
        self.flushed = self.saved = 0.0  # when figures last drained, when the last checkpoint was written
        warm_up(self.model, p, self.criterion, self.batches)
        if p.compile != "none":
            warm_up_compiled(self.net, self.model, self.criterion, self.batches, self.precision)
        self.flops = forward_flops(self.model, self.batches.head(2)[0])
        self.eval_chunk = eval_chunk(self.flops, device.type)
        self.eval_gap = eval_gap(self.flops, -(-spec.batch_size // spec.dist.world), len(self.val), self.eval_chunk)
        self.next_eval = next_eval(p, 0, self.eval_gap)

    def _variant(self):
        """The step that replaces the plain one: data-parallel under torchrun."""
        spec = self.spec
        if spec.dist.world > 1:
            return DataParallelStep(self.net, self.optimizer, self.precision, _loss(spec.task, "sum"), spec.dist)
        return None

    @property
    def done(self) -> bool:
        """The budget is spent, or the headline target reached where the run stops there."""
        s = self.state
        return s.step >= self.budget or (self.p.stop_at_target and target_key(self.p.target_value) in s.crossings)

    def loop_figures(self) -> dict[str, float]:
        """This process's loop: its wall seconds, the optimizer steps' share of them, and each
        extra's (validation, checkpoints); ``other`` is the rest (reading
        back figures, the progress bar, the live log)."""
        wall = time.perf_counter() - self._loop_start
        steps = self.state.seconds - self._seconds_at_start
        out = {"loop_seconds": wall, "step_seconds_total": steps}
        if wall > 0:
            out |= {f"share_{k}": v / wall for k, v in self.spent.items()}
            out["share_other"] = max(0.0, 1 - steps / wall - sum(self.spent.values()) / wall)
        return out

    def set_lr(self, lr: float) -> float:
        if lr != self.lr:
            self.lr = lr
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        return lr

    def start(self) -> None:
        """Resume from the checkpoint; from here on a signal stops the loop at a step boundary."""
        self.resume()
        signals = self.hooks.signals
        if signals is not None:
            # Under torchrun each rank gets the signal at its own step; stopping at a step boundary
            # would need an agreement per step, so there the signal ends the process at once.
            signals.immediate = self.spec.dist.world > 1
            signals.check()  # a signal during set-up stops here: nothing trained since the checkpoint
        self._loop_start, self._seconds_at_start = time.perf_counter(), self.state.seconds
        self.flushed = self.saved = self._loop_start
        if not self.state.history.evals:
            self.validate()  # the untrained model: where the curve starts, so the first crossing is interpolated

    def after_step(self, epoch_end: bool, loss: torch.Tensor) -> None:
        """Validate on schedule, or early where the training loss says a target is near;
        checkpoint on schedule, or before stopping where a signal asked to."""
        s, p, signals = self.state, self.p, self.hooks.signals
        if s.step < self.next_eval and self.eval_gap >= PROBES and s.step % (self.eval_gap // PROBES) == 0:
            self.probe(loss)
        if s.step >= self.next_eval:
            self.validate(epoch_end)
        stop = signals is not None and signals.requested is not None
        due = (s.step % p.checkpoint_every_steps == 0 if p.checkpoint_every_steps else
               time.perf_counter() - self.saved >= CHECKPOINT_SECONDS)
        if stop or (due and not self.done):
            self.save()
        if stop:
            raise Interrupted(signals.requested)

    def probe(self, loss: torch.Tensor) -> None:
        """A validation spaced out for its cost could come long after a target was crossed: the
        run would train on past it, and the crossing be interpolated across the whole spacing.
        The step's own loss (a function of the params and the data alone, so the same run
        validates at the same steps) brings the next validation forward where it is near the
        easiest target not yet reached, no closer to the last than 10 % or a quarter spacing."""
        if self.p.target_metric != "val_loss" or self.spec.dist.world > 1:  # a rank's loss is its share
            return
        open_ = [v for v in self.targets if target_key(v) not in self.state.crossings]
        if open_ and float(loss.detach()) <= NEAR * max(open_):
            last = self.state.history.evals[-1]["step"] if self.state.history.evals else 0
            self.next_eval = min(self.next_eval, max(math.ceil(last * 1.1), last + self.eval_gap // 4))

    def settle(self) -> None:
        """On a GPU, wait for the queued steps: their time on the card ends here, and is counted
        as step time (without the wait it would fall to what comes next, and the rate read too high)."""
        if self.batches.device.type == "cuda":
            t0 = time.perf_counter()
            sync(self.batches.device)
            self.state.seconds += time.perf_counter() - t0

    def flush(self) -> None:
        self.flushed = time.perf_counter()
        if not len(self.pending):
            return
        self.settle()
        steps = self.pending.drain(self.spec.dist.world)
        if self.p.stop_on_nonfinite:
            check_finite(steps, self.spec.batch_size)
        self.state.history.extend(steps)
        self.hooks.sink.steps(steps)
        if self.hooks.progress is not None:
            self.hooks.progress.update(len(steps))

    def validate(self, epoch_end: bool = False) -> None:
        """Validate; a target reached for the first time gets its crossing (interpolated between
        this validation and the one before). A loss that is not finite drains the steps, which
        names the step where training diverged."""
        self.settle()
        s, p = self.state, self.p
        self.next_eval = next_eval(p, s.step, self.eval_gap)
        t0 = time.perf_counter()
        v_loss, v_acc = evaluate_split(self.model, self.val, self.criterion, self.spec.task, self.eval_chunk)
        if p.stop_on_nonfinite and not math.isfinite(v_loss):
            self.flush()
            raise NonFiniteLoss(f"validation loss became {v_loss} by optimizer step {s.step} "
                                f"(batch size {self.spec.batch_size}, lr {self.lr:g}); "
                                f"set train.stop_on_nonfinite=false to continue anyway")
        now = {"step": s.step, "samples": s.samples, "val_loss": v_loss, "val_acc": v_acc,
               "train_seconds": s.seconds, "epoch_end": epoch_end}
        before = s.history.evals[-1] if s.history.evals else None
        s.history.evals.append(now)
        self.hooks.sink.point("val/loss", v_loss, s.samples)
        if self.spec.task == "classification":
            self.hooks.sink.point("val/acc", v_acc, s.samples)
        self.spent["validation"] += time.perf_counter() - t0
        for value in self.targets:
            key = target_key(value)
            if key not in s.crossings and reached(p.target_metric, now[p.target_metric], value):
                s.crossings[key] = crossing(p.target_metric, value, before, now)

    def validate_last(self) -> None:
        """The run's last state validated (its final figures), unless it just was."""
        evals = self.state.history.evals
        if not evals or evals[-1]["step"] != self.state.step:
            self.validate()

    def save(self) -> None:
        if self.hooks.checkpoint is None:
            return
        self.flush()
        t0 = self.saved = time.perf_counter()
        if self.spec.dist.main:
            self.hooks.checkpoint.save({
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "loop": self.state.state_dict(), "rng": torch.get_rng_state(),
                "scaler": self.precision.scaler.state_dict() if self.precision.scaler is not None else None})
        self.spent["checkpoint"] += time.perf_counter() - t0

    def resume(self) -> None:
        saved = self.hooks.checkpoint.load() if self.hooks.checkpoint and self.p.resume else None
        if saved is not None:
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.lr = self.optimizer.param_groups[0]["lr"]
            self.state.load_state_dict(saved["loop"])
            # Where the uninterrupted run validates next: the schedule follows its last validation.
            evals = self.state.history.evals
            self.next_eval = next_eval(self.p, evals[-1]["step"] if evals else 0, self.eval_gap)
            torch.set_rng_state(saved["rng"])
            if self.precision.scaler is not None and saved.get("scaler"):
                self.precision.scaler.load_state_dict(saved["scaler"])
            self.resumed_from = self.state.step
            self.hooks.sink.resume_from(self.state.history, self.state.step)
        if self.spec.dist.world > 1:
            # Every rank must resume from the same step (checkpoints/ shared between nodes), or
            # the ranks would wait on each other for ever: equal sum and sum of squares <=> all equal.
            step, world = float(self.state.step), self.spec.dist.world
            seen = all_sum(torch.tensor([step, step ** 2], dtype=torch.float64), world)
            if seen.tolist() != [world * step, world * step ** 2]:
                raise RuntimeError(f"rank {self.spec.dist.rank} would resume at step {self.state.step} but other "
                                   f"ranks disagree: share the checkpoints/ folder between nodes or set "
                                   f"train.resume=false")

    def step_bytes(self) -> int:
        """``step_memory`` of a full batch of this run's data."""
        x, y = self.batches.head(min(self.spec.batch_size, self.batches.n))
        # Copies: a slice would share (and be counted as) the whole data set's storage.
        return step_memory(self.model, self.criterion, x.clone(), y.clone())

    def result(self) -> FitResult:
        s = self.state
        loop = self.loop_figures()  # before step_bytes, which is not the loop's
        return FitResult(s.history, s.step, s.samples, s.seconds, dict(s.crossings), target_key(self.p.target_value),
                         self.resumed_from, self.budget, self.step_bytes(), loop)
