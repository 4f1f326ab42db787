"""compare: one table, plots and an HTML report across the sweep, logged to the parent run."""
from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any

from .context import Context, read_json, write_atomic, write_json
from .data import DataError, read_manifest

def read_csv(path: Path) -> dict[str, list[float]]:
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    cols: dict[str, list[float]] = {}
    for row in rows:
        for k, v in row.items():
            cols.setdefault(k, []).append(float(v))
    return cols


def _need(path: Path, stage: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path} not found: run {stage} first (dvc repro)")
    return path


def collect(ctx: Context, sweep_key: str | None = None) -> list[dict[str, Any]]:
    """One row per run (batch size, seed) of the sweep. With ``sweep_key``, every training output
    must belong to that sweep: a report never mixes runs of two sweeps."""
    runs = []
    for bs in ctx.params.train.batch_sizes:
        for seed in ctx.params.train.seeds:
            summary = read_json(_need(ctx.train_dir(bs, seed) / "summary.json", f"train@{bs}"))
            metrics = read_json(_need(ctx.eval_dir(bs, seed) / "metrics.json", f"evaluate@{bs}"))
            info = ctx.train_dir(bs, seed) / "run.json"
            if sweep_key and info.is_file() and read_json(info).get("sweep_key") != sweep_key:
                raise DataError(f"{ctx.train_dir(bs, seed)} was trained for another sweep than params.yaml "
                                f"describes; rerun train@{bs} (dvc repro)")
            runs.append({**summary, **{k: v for k, v in metrics.items() if k not in ("batch_size", "seed")},
                         "batch_size": bs, "seed": seed})
    return runs


# Figures summarised per batch size as mean and 95 % interval over the seeds.
FIGURES = ("test_acc", "test_mse", "test_loss", "throughput", "train_seconds", "time_to_target_s",
           "steps_to_target", "samples_to_target", "step_memory_bytes", "bytes_per_sample",
           "peak_memory_bytes", "noise_scale", "final_val_loss", "loss_noise", "weight", "bias")
TO_TARGET = ("time_to_target_s", "steps_to_target", "samples_to_target")


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % confidence interval (Student's t; nan for one value)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, math.nan
    from scipy.stats import t
    return mean, float(t.ppf(0.975, n - 1)) * statistics.stdev(values) / math.sqrt(n)


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per batch size: each figure's mean (key) and interval half-width (key_ci). A
    to-target figure is given only when every seed reached the target (``reached`` counts them)."""
    rows = []
    for bs in sorted({r["batch_size"] for r in runs}):
        mine = [r for r in runs if r["batch_size"] == bs]
        row: dict[str, Any] = {"batch_size": bs, "n": len(mine), "seeds": [r["seed"] for r in mine],
                               "reached": sum(1 for r in mine if r.get("time_to_target_s") is not None)}
        for key in FIGURES:
            values = [r[key] for r in mine if isinstance(r.get(key), (int, float))]
            if not values or (key in TO_TARGET and len(values) < len(mine)):
                continue
            row[key], row[f"{key}_ci"] = interval([float(v) for v in values])
        rows.append(row)
    return rows


def separated(a: dict[str, Any], b: dict[str, Any], key: str) -> bool:
    """Do the 95 % intervals of ``key`` in rows a and b not overlap? (Without an interval: any
    difference counts.)"""
    ha, hb = a.get(f"{key}_ci", 0.0), b.get(f"{key}_ci", 0.0)
    ha, hb = (0.0 if math.isnan(ha) else ha), (0.0 if math.isnan(hb) else hb)
    return abs(a[key] - b[key]) > ha + hb


def scaling_knee(rows: list[dict[str, Any]], margin: float) -> dict[str, Any]:
    """Where steps-to-target leaves perfect scaling (steps halve when the batch doubles).

    The ideal line is anchored at the smallest batch size that reached the target. Returns
    the first batch size whose measured steps exceed (1 + margin) x ideal, or None.
    """
    reached = [r for r in rows if r.get("steps_to_target")]
    if not reached:
        return {"anchor": None, "knee": None, "ideal": {}}
    b0, s0 = reached[0]["batch_size"], reached[0]["steps_to_target"]
    ideal = {r["batch_size"]: s0 * b0 / r["batch_size"] for r in rows}
    knee = None
    for r in rows:
        if r["batch_size"] <= b0:
            continue
        steps = r.get("steps_to_target")
        if steps is None or steps > (1 + margin) * ideal[r["batch_size"]]:
            knee = r["batch_size"]
            break
    return {"anchor": b0, "knee": knee, "ideal": ideal}


def _winner(rows, key: str, best) -> dict[str, Any] | None:
    """The best row for ``key`` and the batch sizes whose intervals overlap it (a tie)."""
    scored = [r for r in rows if r.get(key) is not None]
    if not scored:
        return None
    top = best(scored, key=lambda r: r[key])
    ties = [r["batch_size"] for r in scored if r is not top and not separated(top, r, key)]
    return {"batch_size": top["batch_size"], key: top[key], "ci": top.get(f"{key}_ci", math.nan), "ties": ties}


def conclusions(rows: list[dict[str, Any]], task: str, margin: float) -> dict[str, Any]:
    score = "test_acc" if task == "classification" else "test_mse"
    noise = [r["noise_scale"] for r in rows if r.get("noise_scale") is not None and r["noise_scale"] > 0]
    quickest = _winner(rows, "throughput", max)
    return {
        "most_accurate": _winner(rows, score, max if task == "classification" else min),
        "fastest_to_target": _winner(rows, "time_to_target_s", min),
        "highest_throughput": {"batch_size": quickest["batch_size"], "samples_per_s": quickest["throughput"],
                               "ties": quickest["ties"]},
        "critical_batch_size_noise": statistics.median(noise) if noise else None,
        "noise_range": [min(noise), max(noise)] if noise else None,
        "critical_batch_size_knee": scaling_knee(rows, margin)["knee"],
        "missed_target": [r["batch_size"] for r in rows if r.get("time_to_target_s") is None],
        "scaling_margin": margin,
    }


def dvc_metrics(c: dict[str, Any]) -> dict[str, Any]:
    """The conclusions DVC records (metrics.json): few and short, since `dvc exp show` prints each
    as a column beside the changed params."""
    acc, fastest = c["most_accurate"], c["fastest_to_target"] or {}
    score = "acc" if "test_acc" in acc else "mse"
    return {"best_bs": acc["batch_size"], f"best_{score}": acc[f"test_{score}"],
            "fast_bs": fastest.get("batch_size"), "fast_s": fastest.get("time_to_target_s"),
            "cbs_knee": c["critical_batch_size_knee"], "cbs_noise": c["critical_batch_size_noise"]}


def summary_metrics(c: dict[str, Any]) -> dict[str, Any]:
    """Every conclusion, as the parent run's ``sweep/*`` metrics."""
    acc = c["most_accurate"]
    score = "test_acc" if "test_acc" in acc else "test_mse"
    fastest = c["fastest_to_target"] or {}
    return {"best_bs": acc["batch_size"], f"best_{score}": acc[score],
            f"best_{score}_ci": None if math.isnan(acc["ci"]) else acc["ci"], "n_tied": len(acc["ties"]),
            "fastest_bs": fastest.get("batch_size"), "fastest_s": fastest.get("time_to_target_s"),
            "top_speed_bs": c["highest_throughput"]["batch_size"],
            "top_speed": c["highest_throughput"]["samples_per_s"],
            "cbs_noise": c["critical_batch_size_noise"], "cbs_knee": c["critical_batch_size_knee"],
            "n_missed": len(c["missed_target"])}


RUN_COLUMNS = ("batch_size", "seed", "test_acc", "test_mse", "test_loss", "throughput", "train_seconds",
               "time_to_target_s", "steps_to_target", "step_memory_bytes", "peak_memory_bytes", "noise_scale",
               "loss_noise", "weight", "bias")


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = [",".join(columns)] + [",".join("" if r.get(c) is None else str(r[c]) for c in columns) for r in rows]
    return "\n".join(lines) + "\n"


def run(ctx: Context) -> dict[str, Any]:
    from . import report

    p = ctx.params
    manifest = read_manifest(ctx.data_dir)
    runs = collect(ctx, p.sweep_key(manifest["data_hash"]))
    rows = aggregate(runs)
    task = manifest["task"]
    out = ctx.compare_dir
    concl = conclusions(rows, task, p.compare.scaling_margin)
    ctx.check_params_unchanged("compare")
    images = report.make_plots(ctx, rows, runs, task)
    present = [k for k in FIGURES if any(k in r for r in rows)]
    write_atomic(out / "sweep.csv", _csv(rows, ["batch_size", "n", "reached"] +
                                         [c for k in present for c in (k, f"{k}_ci")]))
    write_atomic(out / "runs.csv", _csv(runs, [c for c in RUN_COLUMNS if any(c in r for r in runs)]))
    write_json(out / "metrics.json", dvc_metrics(concl))
    write_atomic(out / "report.html", report.html(ctx, rows, runs, concl, images, manifest))
    _log(ctx, manifest, rows, concl, [out / "sweep.csv", out / "runs.csv", out / "metrics.json",
                                      out / "report.html", *[img for img, _ in images]])
    return {"rows": rows, "runs": runs, "conclusions": concl}


def _log(ctx: Context, manifest, rows, concl, files: list[Path]) -> None:
    """The conclusions as the parent's metrics, and per-size means and intervals with
    step = batch size, so MLflow's charts draw them against the batch size. The intervals go
    under a prefix of their own: the run page charts each prefix as a section, and the means'
    section would otherwise alternate each figure with its interval."""
    tracker = ctx.tracker("compare")
    parent = tracker.sweep_parent(manifest)
    tracker.log_metrics(parent, {f"sweep/{k}": v for k, v in summary_metrics(concl).items() if v is not None})
    for row in rows:
        figures = {f"by_batch_size/{k}": v for k, v in row.items() if k in FIGURES}
        figures |= {f"by_batch_size_ci/{k[:-3]}": v for k, v in row.items() if k.endswith("_ci") and k[:-3] in FIGURES}
        tracker.log_metrics(parent, {k: v for k, v in figures.items() if not math.isnan(v)}, step=row["batch_size"])
    tracker.set_tags(parent, {"batchlab.compare.scaling_margin": ctx.params.compare.scaling_margin,
                              "batchlab.batch_sizes": ctx.params.train.batch_sizes,
                              "batchlab.seeds": ctx.params.train.seeds})
    tracker.log_artifacts(parent, files, "compare")
    if not ctx.parent_run_id:  # a parent of ours: its duration runs from the sweep's start to here
        tracker.finish(parent, "FINISHED")
