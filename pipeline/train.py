"""train: one model at one batch size, logged as a child run of the sweep's parent."""
from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .config import ParamsError
from .context import Context, write_atomic, write_json
from .data import load_prepared
from .engine import (NullSink, StopSignals, batch_bounds, eval_interval, fit, load_checkpoint,
                     scaled_lr)
from . import dist
from .models import build_model
from .system import PeakMemory, device_name, pick_device, set_threads, threads


def check_batch_size(ctx: Context, batch_size: int, n_train: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ParamsError(f"batch size {batch_size!r}: must be a positive integer")
    if ctx.params.train.drop_last and batch_size > n_train:
        raise ParamsError(f"train.batch_size={batch_size} with train.drop_last=true leaves no batch "
                          f"(allowed: at most {n_train}, the training split's size)")


def run(ctx: Context, batch_size: int, *, log_to_mlflow: bool = True) -> dict[str, Any]:
    p = ctx.params
    data = load_prepared(ctx.data_dir, ("train", "val"))
    check_batch_size(ctx, batch_size, len(data.train))
    device = pick_device(p.train.device)
    d = dist.init(device.type)
    if d.world > 1:
        if batch_size < d.world:
            raise ParamsError(f"batch size {batch_size} is smaller than the {d.world} ranks "
                              f"(allowed: at least one sample per rank)")
        if device.type == "cuda":
            device = torch.device("cuda", d.local_rank)
            torch.cuda.set_device(device)
    set_threads(p.train.threads)
    per_epoch = batch_bounds(len(data.train), batch_size, p.train.drop_last)
    total_steps = per_epoch * p.train.epochs
    key = p.sweep_key(data.data_hash)
    ckpt = ctx.checkpoint(batch_size)
    previous = load_checkpoint(ckpt) if p.train.resume else None
    resume_id = None
    if previous and previous["extra"] == _checkpoint_key(key, batch_size, d.world):
        resume_id = previous.get("meta", {}).get("run_id")

    # Only rank 0 talks to MLflow and writes outputs.
    tracker = ctx.tracker() if log_to_mlflow and d.main else None
    with StopSignals() as signals:
        if tracker is None:
            return _train(ctx, batch_size, data, device, per_epoch, total_steps, key, ckpt,
                          None, None, signals, d)
        parent = tracker.sweep_parent(key, p.flat(), data.manifest, ctx.run_tags(), ctx.parent_run_id)
        tags = ctx.run_tags() | {"batchlab.batch_size": str(batch_size), "batchlab.sweep_key": key,
                                 "batchlab.role": "train"}
        with tracker.run(name=f"bs{batch_size}", parent_id=parent, tags=tags, run_id=resume_id) as run_id:
            return _train(ctx, batch_size, data, device, per_epoch, total_steps, key, ckpt,
                          tracker, run_id, signals, d)


def _checkpoint_key(sweep: str, batch_size: int, world: int) -> dict[str, Any]:
    return {"sweep": sweep, "batch_size": batch_size, "world": world}


def _train(ctx, batch_size, data, device, per_epoch, total_steps, key, ckpt, tracker, run_id,
           signals, d) -> dict[str, Any]:
    from .tracking import MlflowSink

    p = ctx.params
    t = p.train
    sink: Any = NullSink()
    if tracker is not None:
        sink = MlflowSink(tracker.uri, run_id, total_steps, p.tracking.max_points,
                          p.tracking.full_history, start_time=_now())
        tracker.log_params(run_id, p.flat() | {
            "batch_size": batch_size, "seed": t.seed, "data.hash": data.data_hash,
            "lr_effective": scaled_lr(t, batch_size), "steps_per_epoch": per_epoch,
            "total_steps": total_steps, "eval_every_steps_effective": eval_interval(t, per_epoch),
            "log_window_steps": sink.window, "device": device_name(device), "threads": threads(),
            "world_size": d.world})
        tracker.client.log_dict(run_id, p.model_dump(mode="json"), "params.json")
    torch.manual_seed(t.seed)
    model = build_model(p.model, data.n_features, data.n_outputs)
    complete = False
    try:
        with PeakMemory(device) as mem, tqdm(total=total_steps, desc=f"train bs={batch_size}",
                                             unit="step", disable=None, leave=False) as bar:
            result = fit(model, data.train, data.val, t, batch_size, data.task, device, sink,
                         checkpoint=ckpt, checkpoint_extra=_checkpoint_key(key, batch_size, d.world),
                         checkpoint_meta={"run_id": run_id}, signals=signals,
                         progress=bar if d.main else None, rank=d.rank, world=d.world)
        complete = True
    finally:
        if tracker is not None:
            sink.close(complete)

    hist = result.history
    last = hist.evals[-1] if hist.evals else {}
    summary: dict[str, Any] = {
        "batch_size": batch_size,
        "steps": result.steps,
        "samples": result.samples,
        "epochs": t.epochs,
        "train_seconds": result.train_seconds,
        "throughput": result.samples / max(result.train_seconds, 1e-9),
        "peak_memory_bytes": mem.peak_bytes,
        "final_train_loss": float(np.mean(hist.loss[-per_epoch:])) if hist.loss else None,
        "final_val_loss": last.get("val_loss"),
        "target_reached": result.target is not None,
        "steps_to_target": result.target["step"] if result.target else None,
        "samples_to_target": result.target["samples"] if result.target else None,
        "time_to_target_s": result.target["seconds"] if result.target else None,
        "noise_scale": result.noise_scale,
        "lr_effective": scaled_lr(t, batch_size),
        "resumed_from_step": result.resumed_from_step,
    }
    if data.task == "classification":
        summary["final_val_acc"] = last.get("val_acc")
    else:
        w, b = model.weight.detach().cpu().flatten().tolist(), model.bias.detach().cpu().tolist()
        summary["weight"], summary["bias"] = (w[0] if len(w) == 1 else w), b[0]

    summary["world_size"] = d.world
    if not d.main:
        return summary
    out = ctx.train_dir(batch_size)
    files = _write_outputs(out, model, hist, summary, data.task)
    if tracker is not None:
        final = {f"final/{k}": float(v) for k, v in summary.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}
        final["final/target_reached"] = float(summary["target_reached"])
        tracker.log_metrics(run_id, final, step=result.samples)
        tracker.log_artifacts(run_id, files, "outputs")
        _log_model(model, data)
        write_json(out / "run.json", {"run_id": run_id, "experiment_id": tracker.experiment_id,
                                      "sweep_key": key})
    ckpt.unlink(missing_ok=True)
    return summary


def _now() -> float:
    import time
    return time.time()


def _write_outputs(out, model, hist, summary, task) -> list:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    write_atomic(out / "model.pt", buf.getvalue())
    t0 = hist.time[0] - 1e-9 if hist.time else 0.0
    cols = {"step": hist.step, "samples": hist.samples, "loss": hist.loss, "lr": hist.lr,
            "wall_s": [x - t0 for x in hist.time]}
    if task == "classification":
        cols["batch_acc"] = [c / b for c, b in zip(hist.correct, hist.batch)]
    write_atomic(out / "steps.csv", _csv(cols))
    evals = {k: [e[k] for e in hist.evals] for k in ("step", "samples", "val_loss", "val_acc", "train_seconds")}
    if task != "classification":
        evals.pop("val_acc")
    write_atomic(out / "evals.csv", _csv(evals))
    if hist.noise:
        write_atomic(out / "noise.csv", _csv({"samples": [s for s, _ in hist.noise],
                                              "b_simple": [v for _, v in hist.noise]}))
    else:
        write_atomic(out / "noise.csv", "samples,b_simple\n")
    write_json(out / "summary.json", summary)
    return [out / n for n in ("steps.csv", "evals.csv", "noise.csv", "summary.json", "model.pt")]


def _csv(cols: dict[str, list]) -> str:
    names = list(cols)
    lines = [",".join(names)]
    for row in zip(*cols.values()):
        lines.append(",".join(repr(v) if isinstance(v, float) else str(v) for v in row))
    return "\n".join(lines) + "\n"


def _log_model(model, data) -> None:
    """As a LoggedModel in the pt2 (torch.export) format: loading it runs no pickled code."""
    import mlflow
    from mlflow.models import infer_signature

    model = model.cpu().eval()
    example = data.val.x[:5].cpu()
    with torch.no_grad():
        output = model(example)
    mlflow.pytorch.log_model(
        model, name="model", signature=infer_signature(example.numpy(), output.numpy()),
        input_example=example.numpy(), serialization_format="pt2",
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
