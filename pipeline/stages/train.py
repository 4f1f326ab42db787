"""train: one batch size, once per seed (and learning rate of a grid), on this machine. Each
training writes its whole record into ``outputs/train/bs<B>/seed<S>`` (model, every step,
validations, noise scale, summary, params, and ``run.json``: the training's identity); its MLflow
run follows it live and is published from those files when it ends (``pipeline.tracking``).
``executor.name: ray`` runs the same trainings as Ray tasks (``remote``)."""
from __future__ import annotations

import io
import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from ..config import ParamsError
from ..context import Context, csv_text, param_text, replaced_dir, run_name, write_atomic, write_json
from ..core import dist
from ..core.batches import batch_bounds
from ..core.checkpoint import Checkpoint
from ..core.data import Prepared, load_prepared, streams
from ..core.engine import FitResult, Hooks, NullSink, TrainSpec, budget_steps, fit, scaled_lr
from ..core.memory import PeakMemory, out_of_memory
from ..core.models import build_model, check_forward, code_sha256
from ..core.signals import StopSignals
from ..core.cost import forward_flops
from ..core.system import device_name, pick_device, set_flush_denormal, set_threads, threads, threads_reason
from ..core.transforms import BatchAugment
from ..procs import Busy
from ..steplog import write_csv


@dataclass(frozen=True)
class Job:
    """One training run: what it trains on, where, and where its checkpoint lives."""
    ctx: Context
    batch_size: int
    seed: int
    data: Prepared
    device: torch.device
    dist: dist.Dist
    sweep_key: str
    checkpoint: Checkpoint
    lr: float | None = None  # the run's rate (from a grid or the search); None: train.lr
    flops: float | None = None  # one example's forward pass (``cost.forward_flops``): what chose the threads
    # Asked before the run's outputs are written and its checkpoint removed: raises where the
    # run must not end as done (a Ray task whose head node, and so whose driver, is gone).
    may_finish: Callable[[], None] | None = None

    @property
    def train(self):
        """The train params of this run (its seed and learning rate set)."""
        return self.ctx.params.train.for_run(self.seed, self.lr)

    @property
    def grid_lr(self) -> float | None:
        """The rate that names the run and its folder: a grid's runs differ in it, a searched one's not."""
        return self.lr if self.ctx.params.train.lr_grid else None

    @property
    def name(self) -> str:
        return run_name(self.batch_size, self.seed, self.grid_lr)

    @property
    def out(self) -> Path:
        return self.ctx.train_dir(self.batch_size, self.seed, self.grid_lr)

    @property
    def per_epoch(self) -> int:
        return batch_bounds(len(self.data.train), self.batch_size, self.ctx.params.train.drop_last)

    @property
    def total_steps(self) -> int:
        """The step budget (the run may stop sooner, at its target)."""
        return budget_steps(self.ctx.params.train, self.per_epoch)


def check_batch_size(ctx: Context, batch_size: int, n_train: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ParamsError(f"batch size {batch_size!r}: must be a positive integer")
    if ctx.params.train.drop_last and batch_size > n_train:
        raise ParamsError(f"train.batch_size={batch_size} with train.drop_last=true leaves no batch "
                          f"(allowed: at most {n_train}, the training split's size)")


def prepare_jobs(ctx: Context, batch_size: int, seeds: tuple[int, ...] | None = None,
                 lr: float | None = None) -> list[Job]:
    """Everything checked and placed before any run is created: one job per (learning rate, seed),
    every seed at ``lr`` where the rate was searched."""
    # Before any parallel work: OpenMP's threads take the setting from the thread that starts them.
    set_flush_denormal(ctx.params.train.flush_denormal)
    data = load_prepared(ctx.data_dir, ("train", "val"),
                         stream_train=streams(ctx.data_dir, ctx.params.train.memory_budget_mb))
    check_batch_size(ctx, batch_size, len(data.train))
    device = pick_device(ctx.params.train.device)
    d = dist.init(device.type)
    if d.world > 1:
        if batch_size < d.world:
            raise ParamsError(f"batch size {batch_size} is smaller than the {d.world} ranks "
                              f"(allowed: at least one sample per rank)")
        if device.type == "cuda":
            device = torch.device("cuda", d.local_rank)
            torch.cuda.set_device(device)
    example = data.train.rows(slice(0, 2))[0]
    # The network takes the data's shape (a model param changed since prepare checked it?).
    flops = forward_flops(check_forward(ctx.params.model, data.sample_shape, data.n_outputs, data.task, example),
                          example)
    set_threads(ctx.params.train.threads, work=-(-batch_size // d.world) * flops, device=device.type)
    key = ctx.params.sweep_key(data.data_hash)
    trials = [(lr, s) for s in seeds or ctx.params.train.seeds] if lr is not None else ctx.params.train.trials(seeds)
    grid = bool(ctx.params.train.lr_grid)
    return [Job(ctx, batch_size, seed, data, device, d, key,
                Checkpoint(ctx.checkpoint(batch_size, seed, rate if grid else None),
                           {"sweep": key, "batch_size": batch_size, "seed": seed, "world": d.world}
                           | ({} if rate is None else {"lr": rate})), rate, flops)
            for rate, seed in trials]


def search(ctx: Context, batch_size: int) -> dict[str, Any] | None:
    """The learning-rate search of ``batch_size`` (``lr_search``), before its runs; None where its
    rate is not searched."""
    from . import lr_search
    return lr_search.run(ctx, batch_size)


def run(ctx: Context, batch_size: int, *, log_to_mlflow: bool = True,
        seeds: tuple[int, ...] | None = None, lr: float | None = None) -> list[dict[str, Any]]:
    """Every (learning rate, seed) of the sweep at ``batch_size`` (or of ``seeds``; every one at
    ``lr`` where the rate was searched), here, one after another; the summaries, in that order."""
    jobs = prepare_jobs(ctx, batch_size, seeds, lr)
    view = None
    if log_to_mlflow and jobs[0].dist.main:  # only rank 0 talks to MLflow and writes outputs
        from ..tracking.sweep import open_view
        view = open_view(ctx)
    return [run_one(job, view) for job in jobs]


def run_one(job: Job, view=None, tags: dict[str, str] | None = None) -> dict[str, Any]:
    """One training, its MLflow run live when ``view`` is given; ``tags`` are added to its identity."""
    with trainer_lock(job):
        saved = job.checkpoint.load() if job.ctx.params.train.resume else None
        identity = _identity(job, (saved or {}).get("meta", {}))
        identity["tags"] |= tags or {}
        with StopSignals() as signals, _tracking(view, job, identity, signals) as tracked:
            sink = tracked.sink if tracked is not None and tracked.sink is not None else NullSink()
            try:
                summary, model = _train(job, identity, sink, signals)
            except RuntimeError as err:  # torch.OutOfMemoryError is one
                oom = out_of_memory(err, job.batch_size, job.device)
                if oom is None:
                    raise
                job.checkpoint.remove()  # a resume would run out of memory at the same place
                raise oom from None
        if tracked is not None and job.dist.main:
            tracked.publish(job.out, model)
        return summary


def _tracking(view, job: Job, identity: dict[str, Any], signals: StopSignals):
    """The training's MLflow run where there is a store to talk to: MLflow is imported only then
    (not by torchrun's other ranks, nor by a training without tracking)."""
    if view is None:
        return nullcontext(None)
    from ..tracking.sweep import training_run
    return training_run(view, job.ctx, identity, job.data.manifest, signals.holding)


def _identity(job: Job, meta: dict[str, Any]) -> dict[str, Any]:
    """The identity of this training (kept in its checkpoint, so a resumed training is the same
    record and the same MLflow run), and what its run shows besides the files."""
    import uuid
    from ..tracking.points import window_for
    tracking = job.ctx.params.tracking
    window = meta.get("window") or window_for(job.total_steps, tracking.max_points, tracking.full_history)
    return {"record": meta.get("record") or uuid.uuid4().hex, "created": meta.get("created") or _now(),
            "name": job.name, "sweep_key": job.sweep_key, "batch_size": job.batch_size, "seed": job.seed,
            "lr": job.lr, "window": window, "n_in": job.data.n_features, "n_out": job.data.n_outputs,
            "sample_shape": list(job.data.sample_shape),
            "tags": job.ctx.run_tags(), "params": {k: param_text(v) for k, v in _run_params(job, window).items()}}


@contextmanager
def trainer_lock(job: Job):
    """One trainer per (sweep, batch size, seed) in a project: a second stops at once, naming the first."""
    import fcntl
    import socket
    import time

    if not job.dist.main:
        yield
        return
    path = job.checkpoint.path.with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            raise Busy(f"train {job.name} is already running in this project ({fh.read().strip() or 'owner unknown'}); "
                       f"wait for it or stop it (its checkpoint lets a rerun resume)") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _train(job: Job, identity: dict[str, Any], sink, signals: StopSignals) -> tuple[dict[str, Any], torch.nn.Module]:
    p = job.ctx.params
    torch.manual_seed(job.seed)
    model = build_model(p.model, job.data.sample_shape, job.data.n_outputs)
    augment = BatchAugment(p.train.augment, job.seed) if p.train.augment else None
    spec = TrainSpec(job.data.train, job.data.val, job.train, job.batch_size, job.data.task, job.device,
                     job.dist, augment)
    meta = {k: identity[k] for k in ("record", "created", "window")}
    checkpoint = Checkpoint(job.checkpoint.path, job.checkpoint.key, meta)
    with PeakMemory(job.device) as mem, tqdm(total=job.total_steps, desc=f"train {job.name}",
                                             unit="step", disable=None, leave=False) as bar:
        result = fit(model, spec, Hooks(sink, checkpoint, signals, bar if job.dist.main else None))
    noise = noise_scale(job, model, result)
    summary = _summary(job, model, result, mem.peak_bytes) | noise
    if job.dist.main:
        job.ctx.check_params_unchanged(f"train@{job.batch_size}")
        if job.may_finish is not None:
            job.may_finish()
        _write_outputs(job, model, result, summary, identity)
        job.checkpoint.remove()
    return summary, model


def noise_scale(job: Job, model: torch.nn.Module, result: FitResult) -> dict[str, Any]:
    """B_simple of the trained model (``noise.measure``), after the loop: where the run stopped at
    train.target_value that is the model where it reached the target, and the measurement is also
    put on that target's crossing. Its seconds are kept: the stage pays them, the loop does not.
    Not measured where not asked for, under torchrun, or where the training split streams."""
    from ..core.models import loss_fn
    from ..core.noise import measure
    train = job.data.train
    if not job.train.noise_scale or job.dist.world > 1 or train.norm is not None:
        return {"noise_scale": None}
    t0 = time.perf_counter()
    x, y = train.x.to(job.device), train.y.to(job.device)
    got = measure(model.train(), loss_fn(job.data.task), x, y, seed=job.seed)
    out = {"noise_scale": got.get("b_simple"), "noise_scale_seconds": time.perf_counter() - t0,
           "noise_scale_at_target": result.target is not None and job.train.stop_at_target}
    if out["noise_scale"] is not None:
        result.history.noise.append((result.samples, out["noise_scale"]))
        if out["noise_scale_at_target"]:
            result.target.update({k: got[k] for k in ("b_simple", "g2", "trace")})
    return out


def _run_params(job: Job, window: int) -> dict[str, Any]:
    """What shapes this run: the data, model and train sections (evaluate, compare and tracking
    params are the parent's), and what follows from them here."""
    t = job.train
    shaping = {k: v for k, v in job.ctx.params.described().items() if k.split(".")[0] in ("data", "model", "train")}
    return shaping | {
        "batch_size": job.batch_size, "seed": job.seed, "lr": t.lr, "data.hash": job.data.data_hash,
        "lr_effective": scaled_lr(t, job.batch_size), "steps_per_epoch": job.per_epoch,
        "budget_steps": job.total_steps,
        "log_window_steps": window, "device": device_name(job.device), "threads": threads(),
        "threads_reason": threads_reason(t.threads, job.flops and -(-job.batch_size // job.dist.world) * job.flops,
                                         job.device.type),
        "world_size": job.dist.world,
        "data_path": "stream" if job.data.train.norm is not None else t.loader, "model.code_sha256": code_sha256(job.ctx.params.model, job.ctx.workdir)}


def _summary(job: Job, model: torch.nn.Module, result: FitResult, peak_bytes: int) -> dict[str, Any]:
    hist, t = result.history, job.train
    last = hist.evals[-1] if hist.evals else {}
    full = [sec for sec, n in zip(hist.seconds, hist.batch) if n == job.batch_size and math.isfinite(sec)]
    # The steady step: the median of full batches' steps. Times to a target are steps times it, so
    # that stalls of a shared machine (which a median leaves out) do not decide a verdict; the
    # measured seconds stand beside them.
    step_s = float(np.median(full)) if full else None
    tail = hist.loss[-max(10, len(hist.loss) // 10):]
    summary: dict[str, Any] = {
        "batch_size": job.batch_size,
        "seed": job.seed,
        "lr": t.lr,
        "steps": result.steps,
        "samples": result.samples,
        "budget_steps": result.budget,
        "train_seconds": result.train_seconds,
        "step_seconds": step_s,
        "throughput": job.batch_size / step_s if step_s else result.samples / max(result.train_seconds, 1e-9),
        "overall_throughput": result.samples / max(result.train_seconds, 1e-9),
        "peak_memory_bytes": peak_bytes,
        "step_memory_bytes": result.step_memory_bytes,
        "bytes_per_sample": result.step_memory_bytes / job.batch_size,
        "final_train_loss": float(np.mean(tail)) if tail else None,
        # How noisy training is: the per-step loss's spread over its last tenth, relative to its mean.
        "loss_noise": float(np.std(tail) / max(np.mean(tail), 1e-12)) if tail else None,
        "final_val_loss": last.get("val_loss"),
        "lr_effective": scaled_lr(t, job.batch_size),
        "resumed_from_step": result.resumed_from_step,
        "world_size": job.dist.world,
        "device": job.device.type,
    } | _to_target(result, step_s) | _loop(job, result)
    if job.data.task == "classification":
        summary["final_val_acc"] = last.get("val_acc")
    else:
        w, b = model.weight.detach().cpu().flatten().tolist(), model.bias.detach().cpu().tolist()
        summary["weight"], summary["bias"] = (w[0] if len(w) == 1 else w), b[0]
    return summary


def _to_target(result: FitResult, step_s: float | None) -> dict[str, Any]:
    """Where the run reached its targets: steps, samples, steady and measured seconds to the
    headline one, and every crossing."""
    target = result.target
    out = {
        "target_reached": target is not None,
        # Stopped short of the target: censored at its budget, never silently a slow run.
        "censored": target is None,
        "steps_to_target": target["step"] if target else None,
        "samples_to_target": target["samples"] if target else None,
        "time_to_target_s": target["step"] * step_s if target and step_s else None,
        "wall_to_target_s": target["seconds"] if target else None,
        "targets": {k: {"step": c["step"], "samples": c["samples"], "seconds": c["seconds"],
                        "bracket": c.get("bracket"), "b_simple": c.get("b_simple"), "g2": c.get("g2"),
                        "trace": c.get("trace")}
                    for k, c in result.crossings.items()},
    }
    if out["time_to_target_s"] is not None and target["seconds"] > 0:
        out["stall_share"] = max(0.0, 1 - out["time_to_target_s"] / target["seconds"])
    return out


def _loop(job: Job, result: FitResult) -> dict[str, Any]:
    """What the user waited through besides the steps, in shares of this process's loop wall time."""
    loop = result.loop
    if not loop.get("loop_seconds"):
        return {}
    # Samples this process trained (a resumed run's loop started at its checkpoint), over its wall.
    done_here = result.samples if not result.resumed_from_step else \
        job.batch_size * (result.steps - result.resumed_from_step)
    return {"loop_seconds": loop["loop_seconds"], "loop_throughput": done_here / loop["loop_seconds"],
            "overhead_share": max(0.0, 1 - loop["step_seconds_total"] / loop["loop_seconds"]),
            "overheads": {k.removeprefix("share_"): v for k, v in loop.items() if k.startswith("share_")}}


def _now() -> float:
    return time.time()


def _write_outputs(job: Job, model, result: FitResult, summary, identity: dict[str, Any]) -> None:
    """Every output of the run into a new folder, swapped in whole: the folder holds one run's
    set or the previous set, never a mix."""
    with replaced_dir(job.out) as tmp:
        t0 = _write_files(tmp, model, result, summary, job.data.task)
        buf = io.BytesIO()
        torch.save(job.data.val.x[:2].detach().cpu().clone(), buf)  # the MLflow model's input example
        write_atomic(tmp / "input_example.pt", buf.getvalue())
        write_json(tmp / "params.json", job.ctx.params.model_dump(mode="json"))
        search = job.ctx.train_dir(job.batch_size) / "lr_search.json"
        if search.is_file() and job.ctx.params.train.searches():
            write_atomic(tmp / "lr_search.json", search.read_bytes())  # how its rate was chosen
        # The end never precedes the run's creation or its last step, whatever the clock did.
        last = result.history.time[-1] if result.history.time else 0.0
        end = max(_now(), identity["created"], last)
        write_json(tmp / "run.json", identity | {"steps_t0": t0, "end_time": end})


def _write_files(out: Path, model, result: FitResult, summary, task) -> float:
    """The run's files; returns the wall clock that ``steps.csv``'s wall_s counts from."""
    hist = result.history
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    write_atomic(out / "model.pt", buf.getvalue())
    t0 = hist.time[0] - 1e-9 if hist.time else 0.0
    write_csv(hist, out / "steps.csv", t0)
    evals = {k: [e[k] for e in hist.evals] for k in ("step", "samples", "val_loss", "val_acc", "train_seconds")}
    if task != "classification":
        evals.pop("val_acc")
    write_atomic(out / "evals.csv", csv_text(evals))
    write_atomic(out / "noise.csv", csv_text({"samples": [s for s, _ in hist.noise],
                                          "b_simple": [v for _, v in hist.noise]}))
    write_json(out / "summary.json", summary)
    return t0
