"""bench: training samples/s per data path and batch size, measured side by side in one run.

Rows (MNIST-shaped synthetic data made in memory, the tutorial's 784-128-10 MLP with Adam):
  tutorial       a Dataset returning one PIL image at a time through ToTensor()+Normalize(),
                 in a DataLoader with shuffle=True (the tutorial's pattern), torch's default
                 thread count, as a user runs it;
  tensordataset  a TensorDataset in a DataLoader with shuffle=True, default threads;
  pipeline       the pipeline's own loop and data path (engine.fit) with its default settings:
                 MLflow logging on (off with --no-tracking), threads chosen per batch size
                 (system.set_threads); on a GPU the data set lives on the card;
  limit          the same optimizer steps on one batch already in memory, at every thread count
                 from 1 to the number of cores: the best (the compute limit; its thread count
                 is printed).
Every row computes subnormal floats as 0, as the pipeline does (train.flush_denormal): the
ratios compare data paths. A user's own script keeps them (torch's default), slower where they
occur.
Cells are interleaved and repeated; the median is reported. Under the table, stage-level
figures from real processes (stagebench): the fixed cost per stage and an MNIST-sized row.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import TrackingParams, TrainParams
from ..core.data import Split
from ..core.compute import make_optimizer
from ..core.engine import Hooks, NullSink, TrainSpec, fit
from ..core.cost import forward_flops
from ..core.memory import PeakMemory
from ..core.nets import MLP
from ..core.system import cpu_count, pick_device, processor, set_flush_denormal, set_threads, sync, threads_for
from ..tracking.live import SEND_SECONDS
from ..tracking.points import window_for
from .rates import compute_rate, fit_rate, loader_rate

LOADERS = ("tutorial", "tensordataset", "pipeline", "limit")
DEFAULT_THREADS = torch.get_num_threads()  # before anything sets it: what a user's script gets
N_SAMPLES, N_VAL = 60_000, 1_000
MEAN, STD = 0.1307, 0.3081


def synthetic(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(N_SAMPLES, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=N_SAMPLES).astype(np.int64)
    return images, labels


class TutorialDataset(torch.utils.data.Dataset):
    """What torchvision's MNIST does per item: a PIL image through the transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        from torchvision import transforms

        self.images, self.labels = images, labels
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i], mode="L")), int(self.labels[i])


# Noise-scale estimation is measured as a cost of its own (a line under the table), so that
# the rows compare data paths alone.
# The logging cells outlast the live logger's send interval, so that its sends fall inside them.
LOGGING_CELL_MIN = SEND_SECONDS + 1
PARAMS = TrainParams(max_steps=10**9, stop_at_target=False, lr=1e-3, optimizer="adam", noise_scale=False)


def _model(device) -> tuple[nn.Module, torch.optim.Optimizer]:
    # Every row uses the pipeline's optimizer, so the ratios isolate the data path.
    torch.manual_seed(0)
    model = MLP(784, (128,), 10).to(device)
    return model, make_optimizer(PARAMS, model, PARAMS.lr)


def _pipeline_rate(train: Split, val: Split, bs, device, seconds, sink, p=PARAMS) -> tuple[float, int]:
    model, _ = _model(device)
    if hasattr(sink, "windows"):
        # The window a default run gets (its budget of train.max_steps, tracking.max_points points
        # per metric): the points per step a user's run sends live.
        sink.windows.window = window_for(TrainParams().max_steps, TrackingParams().max_points, False)
    with PeakMemory(device) as mem:
        rate = fit_rate(model, train, val, p, bs, device, seconds, Hooks(sink))
    return rate, mem.peak_bytes


def run_bench(batch_sizes: list[int], seconds: float, repeats: int, device: torch.device,
              sink_factory=None, log=print) -> dict[str, Any]:
    # Before any parallel work: OpenMP's threads take the setting from the thread that starts them.
    flush = set_flush_denormal(PARAMS.flush_denormal) and PARAMS.flush_denormal
    images, labels = synthetic()
    x = ((torch.from_numpy(images).float() / 255 - MEAN) / STD).reshape(N_SAMPLES, -1)
    y = torch.from_numpy(labels)
    train = Split(x, y)
    val = Split(x[:N_VAL], y[:N_VAL])
    tutorial_ds = TutorialDataset(images, labels)
    tensor_ds = torch.utils.data.TensorDataset(x, y)
    def logged(name: str):
        # Each pipeline cell logs live into a run of its own, as a training run does; what is left
        # to send after its steps is sent before the next cell starts (not timed). No factory
        # (--no-tracking): the cells log nothing.
        return sink_factory(name) if sink_factory else nullcontext(NullSink())

    per = seconds / repeats
    flops = forward_flops(_model(device)[0], x[:2].to(device))

    def policy(bs: int) -> int:  # the pipeline's own thread choice (train.threads: 0)
        return set_threads(0, work=bs * flops, device=device.type)

    rates: dict[tuple[str, int], list[float]] = {}
    memory: dict[int, int] = {}
    cores = cpu_count() if device.type == "cpu" else 1
    for r in range(repeats):
        for bs in batch_sizes:
            torch.set_num_threads(DEFAULT_THREADS)
            rates.setdefault(("tutorial", bs), []).append(loader_rate(
                torch.utils.data.DataLoader(tutorial_ds, batch_size=bs, shuffle=True), device, per, _model))
            rates.setdefault(("tensordataset", bs), []).append(loader_rate(
                torch.utils.data.DataLoader(tensor_ds, batch_size=bs, shuffle=True), device, per, _model))
            policy(bs)
            with logged(f"bs{bs}-repeat{r + 1}") as sink:
                rate, peak = _pipeline_rate(train, val, bs, device, per, sink)
            rates.setdefault(("pipeline", bs), []).append(rate)
            memory[bs] = max(memory.get(bs, 0), peak)
            for t in range(1, cores + 1):
                torch.set_num_threads(t)
                rates.setdefault((f"compute{t}", bs), []).append(compute_rate(_model, x[:bs], y[:bs], device, per))
            log(f"  repeat {r + 1}/{repeats} batch size {bs}: " + ", ".join(
                f"{k[0]} {v[-1]:,.0f}" for k, v in rates.items() if k[1] == bs))
    overheads = _overheads(train, val, device, per, repeats, logged, policy, sink_factory is not None)
    rows = _rows(rates, memory, batch_sizes, cores, flops, device)
    return overheads | {"rows": rows, "device": processor(device), "cores": cores,
                        "default_threads": DEFAULT_THREADS, "flush_denormal": flush,
                        "seconds_per_cell": seconds, "repeats": repeats}


def _overheads(train, val, device, per: float, repeats: int, logged, policy, tracked: bool) -> dict[str, Any]:
    """What logging costs at batch size 8: the same loop with it on and off, interleaved."""
    # Logging overhead at batch size 8: the same loop with logging on and off, interleaved.
    on, off, drains = [], [], []
    policy(8)
    cell = max(per * 2, LOGGING_CELL_MIN)
    for r in range(repeats if tracked else 0):
        with logged(f"bs8-logging-on-repeat{r + 1}") as sink:
            on.append(_pipeline_rate(train, val, 8, device, cell, sink)[0])
            done = time.perf_counter()
        drains.append(time.perf_counter() - done)
        off.append(_pipeline_rate(train, val, 8, device, cell, NullSink())[0])
    logging = None if not on else {
        "batch_size": 8, "fraction": 1 - statistics.median(on) / statistics.median(off),
        "on_samples_per_s": statistics.median(on), "off_samples_per_s": statistics.median(off),
        "drain_seconds_after_training": statistics.median(drains)}
    return {"logging_overhead": logging}


def _rows(rates, memory, batch_sizes, cores: int, flops: float, device) -> list[dict[str, Any]]:
    rows = []
    for bs in batch_sizes:
        best = max(range(1, cores + 1), key=lambda t: statistics.median(rates[(f"compute{t}", bs)]))
        for loader in LOADERS:
            key = (f"compute{best}", bs) if loader == "limit" else (loader, bs)
            threads = {"limit": best, "pipeline": threads_for(0, bs * flops, device.type)}.get(loader, DEFAULT_THREADS)
            rows.append({"loader": loader, "batch_size": bs, "samples_per_s": statistics.median(rates[key]),
                         "threads": threads, "peak_memory_bytes": memory.get(bs, 0) if loader == "pipeline" else 0})
        for t in range(1, cores + 1):
            rows.append({"loader": f"compute{t}", "batch_size": bs, "threads": t,
                         "samples_per_s": statistics.median(rates[(f"compute{t}", bs)]), "peak_memory_bytes": 0})
    return rows


def table(result: dict[str, Any]) -> str:
    rows = {(r["loader"], r["batch_size"]): r for r in result["rows"]}
    sizes = sorted({r["batch_size"] for r in result["rows"]})
    head = (f"{'batch':>6} {'tutorial':>9} {'tensordataset':>13} {'pipeline':>13} {'limit':>13}"
            f" {'pipe/tut':>9} {'pipe/limit':>10} {'peak MB':>8}")
    where = (f"{result['device']} ({result['cores']} cores)" if not result["device"].startswith("cuda") else
             f"{result['device']} (the pipeline's data set and the limit's batch on the card; [threads]: CPU threads)")
    numerics = ("computes subnormal floats as 0 (train.flush_denormal)" if result.get("flush_denormal")
                else "computes subnormal floats (train.flush_denormal false)")
    lines = [f"training samples/s on {where}, median of {result['repeats']} cells "
             f"of {result['seconds_per_cell'] / result['repeats']:.1f} s; "
             f"[threads]: tutorial and tensordataset run with torch's default ({result['default_threads']}), "
             f"the limit is the best compute-only rate over 1..{result['cores']}; every row {numerics}", head]
    for bs in sizes:
        r = {name: rows[(name, bs)] for name in LOADERS}
        rate = {name: r[name]["samples_per_s"] for name in LOADERS}
        lines.append(f"{bs:>6} {rate['tutorial']:>9,.0f} {rate['tensordataset']:>13,.0f}"
                     f" {rate['pipeline']:>9,.0f} [{r['pipeline']['threads']}] {rate['limit']:>9,.0f} [{r['limit']['threads']}]"
                     f" {rate['pipeline'] / rate['tutorial']:>8.1f}x {rate['pipeline'] / rate['limit']:>10.2f}"
                     f" {r['pipeline']['peak_memory_bytes'] / 2**20:>8,.0f}")
    lo = result["logging_overhead"]
    if lo is None:
        lines.append("logging overhead: not measured (--no-tracking); the pipeline row logged nothing")
    else:
        lines.append(f"logging overhead at batch size 8: {lo['fraction']:+.1%} "
                     f"({lo['on_samples_per_s']:,.0f} samples/s on vs {lo['off_samples_per_s']:,.0f} off; "
                     f"{lo['drain_seconds_after_training']:.2f} s to send the rest afterwards)")
    for row in result.get("data_parallel", []):
        lines.append(f"{row['ranks']} ranks (torchrun, gloo, 1 thread each) at global batch {row['batch_size']}: "
                     f"{row['samples_per_s']:,.0f} samples/s vs {row['one_rank_samples_per_s']:,.0f} on one rank "
                     f"= {row['scaling_efficiency']:.0%} scaling efficiency")
    from .imagebench import lines as image_lines
    from .stagebench import lines as stage_lines
    lines += image_lines(result.get("images"))
    lines += stage_lines(result.get("fixed_cost"), result.get("mnist_sized", []))
    return "\n".join(lines)


def main(ctx, args) -> None:
    """Logs into an experiment of its own (``<experiment>-bench``): the sweep's holds sweeps only.
    With ``--no-tracking`` (a machine without the store or MLflow, such as a lent GPU box) nothing
    is logged and the stage lines, which run real stages against a store, are left out."""
    sizes = [int(s) for s in str(args.batch_sizes).split(",") if s.strip()]
    if not sizes or any(b < 1 for b in sizes):
        from ..config import ParamsError
        raise ParamsError(f"--batch-sizes {args.batch_sizes!r}: allowed: comma-separated positive integers")
    device = pick_device(ctx.params.train.device)
    if not args.tracking:
        result = measure(ctx, args, sizes, device, None)
        print(table(result))
        _write_json(args, result)
        return
    from ..tracking.toolrun import tool_run

    with tool_run(ctx, "bench") as rec:
        def cell_sink(name: str):
            # Each pipeline cell logs into a child run of its own, as a training run would.
            return rec.child(name, window_for(N_SAMPLES, TrackingParams().max_points, False))

        result = measure(ctx, args, sizes, device, cell_sink)
        text = table(result)
        print(text)
        _log_bench(rec, sizes, args, result, text)
    _write_json(args, result)


def measure(ctx, args, sizes: list[int], device: torch.device, cell_sink) -> dict[str, Any]:
    result = run_bench(sizes, args.seconds, args.repeats, device, cell_sink,
                       log=lambda m: print(m, file=sys.stderr))
    if args.ranks > 1:
        big = [b for b in sizes if b >= 64] or sizes[-1:]
        print(f"  data-parallel: 1 process vs {args.ranks} ranks (torchrun, gloo) at batch sizes {big}",
              file=sys.stderr)
        result["data_parallel"] = ddp_rows(big, ranks=args.ranks)
    if args.images:
        from .imagebench import image_rows
        print("  CNN: an ImageFolder of 28x28 PNGs, torchvision's DataLoader vs the pipeline vs the compute limit",
              file=sys.stderr)
        result["images"] = image_rows([64, 256], args.seconds, args.repeats, device)
    if args.stages and cell_sink is not None:
        from . import stagebench
        print("  stages: fixed cost (train, evaluate on digits), MNIST-sized train stage", file=sys.stderr)
        shipped = ctx.params.model_dump(mode="json")
        result["fixed_cost"] = stagebench.fixed_cost({k: shipped[k] for k in ("model", "train")})
        result["mnist_sized"] = stagebench.mnist_sized()
    return result


def _write_json(args, result: dict[str, Any]) -> None:
    if args.json_path:
        from ..context import write_json
        write_json(Path(args.json_path), result)


def _log_bench(rec, sizes, args, result: dict[str, Any], text: str) -> None:
    rec.log_params({"batch_sizes": sizes, "seconds": args.seconds, "repeats": args.repeats,
                    "device": result["device"], "cores": result["cores"]})
    for r in result["rows"]:
        rec.log_metrics({f"{r['loader']}/samples_per_s": r["samples_per_s"]}, step=r["batch_size"])
        if r["loader"] == "pipeline":
            rec.log_metrics({"pipeline/peak_memory_bytes": r["peak_memory_bytes"]}, step=r["batch_size"])
    if result["logging_overhead"] is not None:
        rec.log_metrics({"logging_overhead_bs8": result["logging_overhead"]["fraction"]})
    for r in (result.get("images") or {}).get("rows", []):
        rec.log_metrics({f"cnn/{k}/samples_per_s": r[k] for k in ("torchvision", "steps", "loop", "limit")},
                        step=r["batch_size"])
    if result.get("fixed_cost"):
        fc = result["fixed_cost"]
        rec.log_metrics({"fixed_cost/train_seconds": fc["train_fixed_seconds"],
                         "fixed_cost/evaluate_seconds": fc["evaluate_wall_seconds"]})
    rec.log_dict(result, "bench.json")
    rec.log_text(text, "bench.txt")


# ---------------------------------------------------------------- data-parallel rows

def ddp_worker(batch_size: int, steps: int) -> None:
    """One rank's share of a fixed number of steps (ranks must agree on when to stop, so no
    time budget here); rank 0 prints samples/s as JSON."""
    from ..core import dist as dist_mod

    device = torch.device("cpu")
    d = dist_mod.init(device.type)
    set_threads(1)
    set_flush_denormal(PARAMS.flush_denormal)
    images, labels = synthetic()
    steps = max(1, min(steps, N_SAMPLES // batch_size))
    n = batch_size * steps
    x = ((torch.from_numpy(images[:n]).float() / 255 - MEAN) / STD).reshape(n, -1)
    y = torch.from_numpy(labels[:n])
    model, _ = _model(device)
    p = PARAMS.model_copy(update={"epochs": 1, "eval_every_steps": steps})
    result = fit(model, TrainSpec(Split(x, y), Split(x[:N_VAL], y[:N_VAL]), p, batch_size, "classification",
                                  device, d))
    if d.main:
        print(json.dumps({"world": d.world, "samples_per_s": result.samples / result.train_seconds}))


def ddp_rows(batch_sizes: list[int], steps: int = 40, ranks: int = 2) -> list[dict[str, Any]]:
    """Throughput at the same global batch with 1 process and with ``ranks`` under torchrun (gloo)."""
    import subprocess

    bin_dir = Path(sys.executable).parent
    rows = []
    for bs in batch_sizes:
        one = [sys.executable, "-m", "pipeline.tools.bench", str(bs), str(steps)]
        many = [str(bin_dir / "torchrun"), "--standalone", f"--nproc_per_node={ranks}",
                "-m", "pipeline.tools.bench", str(bs), str(steps)]
        rates = {}
        for world, cmd in ((1, one), (ranks, many)):
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                                  cwd=str(Path(__file__).resolve().parents[2]))  # the folder holding pipeline/
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-1000:]}")
            rates[world] = json.loads(proc.stdout.strip().splitlines()[-1])["samples_per_s"]
        rows.append({"batch_size": bs, "ranks": ranks, "one_rank_samples_per_s": rates[1],
                     "samples_per_s": rates[ranks], "scaling_efficiency": rates[ranks] / (ranks * rates[1])})
    return rows


if __name__ == "__main__":
    ddp_worker(int(sys.argv[1]), int(sys.argv[2]))
