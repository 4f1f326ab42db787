"""The sweep's statistics: per batch size means and 95 % intervals over seeds, and the conclusions
drawn from them. No torch, no MLflow: it reads the rows the compare stage collects."""
from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np


def read_csv(path: Path) -> dict[str, list[float]]:
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    cols: dict[str, list[float]] = {}
    for row in rows:
        for k, v in row.items():
            cols.setdefault(k, []).append(float(v))
    return cols


# Figures summarised per batch size as mean and 95 % interval over the seeds.
FIGURES = ("test_acc", "test_mse", "test_loss", "throughput", "step_seconds", "overall_throughput",
           "train_seconds", "time_to_target_s", "steps_to_target", "samples_to_target", "step_memory_bytes",
           "bytes_per_sample", "peak_memory_bytes", "noise_scale", "noise_at_target", "final_val_acc",
           "final_val_loss", "loss_noise", "weight", "bias")
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
        row: dict[str, Any] = {"batch_size": bs, "lr": mine[0].get("lr"), "n": len(mine), "seeds": [r["seed"] for r in mine],
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


def _by_size(runs: list[dict[str, Any]], key: str) -> dict[int, list[float]]:
    """Each batch size's values of ``key``, one per run."""
    out: dict[int, list[float]] = {}
    for r in runs:
        out.setdefault(r["batch_size"], []).append(r.get(key))
    return out


def choose_lr(runs: list[dict[str, Any]], target_metric: str) -> dict[int, dict[str, Any]]:
    """Each batch size's best learning rate, chosen on the validation split only (the final
    validation figure of the target metric, mean over seeds); the test split judges the choice
    afterwards and never makes it. Returns {batch size: {"lr": best, "by_lr": [rows]}}."""
    key, sign = ("final_val_acc", 1.0) if target_metric == "val_acc" else ("final_val_loss", -1.0)
    out = {}
    for bs in sorted({r["batch_size"] for r in runs}):
        by_lr = []
        for lr in sorted({r["lr"] for r in runs if r["batch_size"] == bs}):
            mine = [r for r in runs if r["batch_size"] == bs and r["lr"] == lr]
            values = [float(r[key]) for r in mine if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            mean, ci = interval(values) if len(values) == len(mine) else (math.nan, math.nan)
            by_lr.append({"lr": lr, "val": mean, "val_ci": ci, "n": len(mine),
                          "reached": sum(1 for r in mine if r.get("time_to_target_s") is not None)})
        scored = [x for x in by_lr if not math.isnan(x["val"])]  # a diverged rate is never chosen
        best = max(scored, key=lambda x: sign * x["val"])["lr"] if scored else by_lr[0]["lr"]
        out[bs] = {"lr": best, "by_lr": by_lr, "metric": key}
    return out


def fit_steps(batch: np.ndarray, steps: np.ndarray) -> tuple[float, float]:
    """Least squares of S = S_min (1 + B_crit / B) (McCandlish et al. 2018, eq. 2.11), written
    S = a + c / B with a = S_min, c = S_min * B_crit, in relative error (steps span orders of
    magnitude): minimise sum(((a + c/B) / S - 1)^2), which is linear in (a, c). Returns (a, c)."""
    design = np.stack([1.0 / steps, 1.0 / (batch * steps)], axis=1)
    (a, c), *_ = np.linalg.lstsq(design, np.ones_like(steps), rcond=None)
    return float(a), float(c)


def _b_crit(a: float, c: float) -> float:
    """inf: steps still halve at the largest batch size (S_min <= 0); 0: no batch size was worth
    its samples (c <= 0)."""
    return math.inf if a <= 0 else 0.0 if c <= 0 else c / a


def critical_batch_size(runs: list[dict[str, Any]], resamples: int = 2000) -> dict[str, Any]:
    """B_crit fitted to the mean steps-to-target of each batch size that reached the target in
    every seed, with a 95 % bootstrap interval (the seeds of each batch size resampled, the fit
    repeated). Needs three such batch sizes: two points fit two parameters exactly."""
    by_size = {bs: v for bs, v in _by_size(runs, "steps_to_target").items()
               if all(isinstance(x, (int, float)) for x in v)}
    sizes = sorted(by_size)
    out: dict[str, Any] = {"sizes": sizes, "value": None, "lo": None, "hi": None, "s_min": None}
    if len(sizes) < 3:
        out["status"] = "too few"
        return out
    batch = np.array(sizes, dtype=float)
    means = np.array([np.mean(by_size[b]) for b in sizes], dtype=float)
    a, c = fit_steps(batch, means)
    out |= {"value": _b_crit(a, c), "s_min": a, "c": c}
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(resamples):
        sample = np.array([np.mean(rng.choice(by_size[b], size=len(by_size[b]))) for b in sizes], dtype=float)
        draws.append(_b_crit(*fit_steps(batch, sample)))
    draws.sort()
    out["lo"], out["hi"] = draws[int(0.025 * resamples)], draws[int(math.ceil(0.975 * resamples)) - 1]
    # A value more than ten times beyond the sizes measured is the fit's extrapolation, not a finding.
    out["status"] = ("above" if out["value"] > 10 * sizes[-1] else "below" if out["value"] < sizes[0] / 10
                     else "fitted")
    return out


def largest_fit(rows: list[dict[str, Any]], budget_bytes: float, n_train: int) -> dict[str, Any] | None:
    """The largest batch whose step fits ``budget_bytes``, from a line through the measured step
    memory (a fixed part plus a part per sample), and never above the training split's size."""
    pts = [(r["batch_size"], r["step_memory_bytes"]) for r in rows if r.get("step_memory_bytes")]
    if not pts:
        return None
    if len(pts) == 1:
        fixed, per_sample = 0.0, pts[0][1] / pts[0][0]
    else:
        per_sample, fixed = np.polyfit([b for b, _ in pts], [m for _, m in pts], 1)
        fixed = max(float(fixed), 0.0)
    largest = n_train if per_sample <= 0 else min(n_train, math.floor((budget_bytes - fixed) / per_sample + 1e-9))
    if largest < 1:
        return None
    return {"batch_size": largest, "bytes": fixed + max(per_sample, 0.0) * largest, "whole_split": largest == n_train,
            "budget_bytes": budget_bytes, "measured_up_to": max(b for b, _ in pts)}


def _winner(rows, key: str, best) -> dict[str, Any] | None:
    """The best row for ``key`` and the batch sizes whose intervals overlap it (a tie)."""
    scored = [r for r in rows if r.get(key) is not None]
    if not scored:
        return None
    top = best(scored, key=lambda r: r[key])
    ties = [r["batch_size"] for r in scored if r is not top and not separated(top, r, key)]
    return {"batch_size": top["batch_size"], key: top[key], "ci": top.get(f"{key}_ci", math.nan), "ties": ties}


def recommend(rows: list[dict[str, Any]], task: str) -> dict[str, Any] | None:
    """The batch size that reaches the target in the least time among those whose test score is
    not worse than the best one's (their intervals overlap); without any that reached it, the
    fastest per sample among them."""
    score = "test_acc" if task == "classification" else "test_mse"
    best = _winner(rows, score, max if task == "classification" else min)
    if best is None:
        return None
    not_worse = [r for r in rows if r.get(score) is not None
                 and (r["batch_size"] == best["batch_size"] or r["batch_size"] in best["ties"])]
    reached = [r for r in not_worse if r.get("time_to_target_s") is not None]
    if reached:
        pick = min(reached, key=lambda r: r["time_to_target_s"])
        ties = [r["batch_size"] for r in reached if r is not pick and not separated(pick, r, "time_to_target_s")]
        basis = "time_to_target_s"
    else:
        pick = max(not_worse, key=lambda r: r.get("throughput") or 0.0)
        ties, basis = [], "throughput"
    return {"batch_size": pick["batch_size"], "basis": basis, "row": pick, "score": score,
            "not_worse": sorted(r["batch_size"] for r in not_worse), "ties": ties}


def conclusions(rows: list[dict[str, Any]], runs: list[dict[str, Any]], task: str, *,
                n_train: int, budget_bytes: float, lr_choice: dict[int, dict[str, Any]] | None = None) -> dict[str, Any]:
    """What the sweep says: ``rows`` are each batch size's figures at its chosen learning rate,
    ``runs`` the runs behind them, ``lr_choice`` the choice (``choose_lr``) of a sweep with a grid."""
    score = "test_acc" if task == "classification" else "test_mse"
    at_target = [r["noise_at_target"] for r in rows if (r.get("noise_at_target") or 0) > 0]
    quickest = _winner(rows, "throughput", max)
    return {
        "recommended": recommend(rows, task),
        "largest_fit": largest_fit(rows, budget_bytes, n_train),
        "most_accurate": _winner(rows, score, max if task == "classification" else min),
        "fastest_to_target": _winner(rows, "time_to_target_s", min),
        "highest_throughput": {"batch_size": quickest["batch_size"], "samples_per_s": quickest["throughput"],
                               "ci": quickest["ci"], "ties": quickest["ties"]} if quickest else None,
        "critical": critical_batch_size(runs),
        # B_simple where training reached the target: the noise scale McCandlish et al. relate to
        # B_crit for that target (its final value keeps growing as the loss falls).
        "noise_at_target": statistics.median(at_target) if at_target else None,
        "noise_at_target_range": [min(at_target), max(at_target)] if at_target else None,
        "missed_target": [r["batch_size"] for r in rows if r.get("time_to_target_s") is None],
        "lr_choice": lr_choice,
    }


def _best_lrs(c: dict[str, Any]) -> dict[int, float]:
    return {bs: choice["lr"] for bs, choice in (c.get("lr_choice") or {}).items()}


def _finite(v: Any) -> Any:
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def dvc_metrics(c: dict[str, Any]) -> dict[str, Any]:
    """The conclusions DVC records (metrics.json): few and short, since `dvc exp show` prints each
    as a column beside the changed params."""
    rec, crit, acc = c["recommended"] or {}, c["critical"], c["most_accurate"] or {}
    score = "acc" if "test_acc" in acc else "mse"
    out = {"rec_bs": rec.get("batch_size"), f"rec_{score}": (rec.get("row") or {}).get(f"test_{score}"),
           "rec_s": (rec.get("row") or {}).get("time_to_target_s"), "cbs": _finite(crit["value"])}
    if c.get("lr_choice"):
        out["best_lr"] = {str(bs): lr for bs, lr in _best_lrs(c).items()}
    return out


def summary_metrics(c: dict[str, Any]) -> dict[str, Any]:
    """Every conclusion, as the parent run's ``sweep/*`` metrics."""
    rec, crit, acc = c["recommended"] or {}, c["critical"], c["most_accurate"] or {}
    row = rec.get("row") or {}
    score = "test_acc" if "test_acc" in acc else "test_mse"
    fastest, top, fit = c["fastest_to_target"] or {}, c["highest_throughput"] or {}, c["largest_fit"] or {}
    out = {"recommended_bs": rec.get("batch_size"), f"recommended_{score}": row.get(score),
           "recommended_s_to_target": row.get("time_to_target_s"), "largest_fit_bs": fit.get("batch_size"),
           "cbs": _finite(crit["value"]), "cbs_lo": _finite(crit["lo"]), "cbs_hi": _finite(crit["hi"]),
           "noise_at_target": c["noise_at_target"],
           "best_bs": acc.get("batch_size"), f"best_{score}": acc.get(score), "n_tied": len(acc.get("ties", [])),
           "fastest_bs": fastest.get("batch_size"), "fastest_s": fastest.get("time_to_target_s"),
           "top_speed_bs": top.get("batch_size"), "top_speed": top.get("samples_per_s"),
           "n_missed": len(c["missed_target"])}
    for bs, lr in _best_lrs(c).items():
        out[f"best_lr_bs{bs}"] = lr
    return out
