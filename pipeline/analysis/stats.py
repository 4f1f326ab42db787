"""The sweep's statistics: per batch size means and 95 % intervals over seeds, and the conclusions
drawn from them. No torch, no MLflow: it reads the rows the compare stage collects."""
from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any


def read_csv(path: Path) -> dict[str, list[float]]:
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    cols: dict[str, list[float]] = {}
    for row in rows:
        for k, v in row.items():
            cols.setdefault(k, []).append(float(v))
    return cols


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
