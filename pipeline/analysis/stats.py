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
FIGURES = ("test_acc", "test_mse", "test_loss", "throughput", "loop_throughput", "overhead_share", "step_seconds",
           "overall_throughput",
           "train_seconds", "time_to_target_s", "wall_to_target_s", "stall_share", "steps_to_target", "samples_to_target",
           "step_memory_bytes",
           "bytes_per_sample", "peak_memory_bytes", "noise_scale", "final_val_acc",
           "final_val_loss", "loss_noise", "weight", "bias")
TO_TARGET = ("time_to_target_s", "wall_to_target_s", "stall_share", "steps_to_target", "samples_to_target")


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
        row: dict[str, Any] = {"batch_size": bs, "lr": mine[0].get("lr"), "lr_effective": mine[0].get("lr_effective"),
                               "n": len(mine), "seeds": [r["seed"] for r in mine],
                               "reached": sum(1 for r in mine if r.get("time_to_target_s") is not None)}
        for key in FIGURES:
            values = [r[key] for r in mine if isinstance(r.get(key), (int, float))]
            if not values or (key in TO_TARGET and len(values) < len(mine)):
                continue
            row[key], row[f"{key}_ci"] = interval([float(v) for v in values])
        rows.append(row)
    return rows


def separated(a: dict[str, Any], b: dict[str, Any], key: str) -> bool:
    """Do the 95 % intervals of ``key`` in rows a and b not overlap? Without an interval on either
    (one seed) nothing can be told apart: no difference is claimed, however large."""
    ha, hb = a.get(f"{key}_ci", math.nan), b.get(f"{key}_ci", math.nan)
    if math.isnan(ha) or math.isnan(hb):
        return False
    return abs(a[key] - b[key]) > ha + hb


def _by_size(runs: list[dict[str, Any]], key: str) -> dict[int, list[float]]:
    """Each batch size's values of ``key``, one per run."""
    out: dict[int, list[float]] = {}
    for r in runs:
        out.setdefault(r["batch_size"], []).append(r.get(key))
    return out


def _steps(run: dict[str, Any], target: str) -> float | None:
    """The run's steps to ``target`` (a key of its summary's ``targets``), or None if missed."""
    crossed = (run.get("targets") or {}).get(target)
    return crossed["step"] if crossed else None


def choose_lr(runs: list[dict[str, Any]], target: str) -> dict[int, dict[str, Any]]:
    """A grid's choice: each batch size's rate with the fewest mean steps to ``target`` on the
    validation split (a rate that missed it in any seed is not chosen; without any that reached
    it, the lowest final validation loss). The test split plays no part. Returns {batch size:
    {"lr": best, "by_lr": [rows]}}."""
    out = {}
    for bs in sorted({r["batch_size"] for r in runs}):
        by_lr = []
        for lr in sorted({r["lr"] for r in runs if r["batch_size"] == bs}):
            mine = [r for r in runs if r["batch_size"] == bs and r["lr"] == lr]
            steps = [_steps(r, target) for r in mine]
            losses = [r["final_val_loss"] for r in mine if isinstance(r.get("final_val_loss"), (int, float))
                      and math.isfinite(r["final_val_loss"])]
            mean, ci = interval(steps) if None not in steps else (math.nan, math.nan)
            by_lr.append({"lr": lr, "val": mean, "val_ci": ci, "n": len(mine), "reached": sum(x is not None for x in steps),
                          "val_loss": statistics.fmean(losses) if len(losses) == len(mine) else math.inf})
        reached = [x for x in by_lr if not math.isnan(x["val"])]
        best = (min(reached, key=lambda x: (x["val"], x["lr"])) if reached
                else min(by_lr, key=lambda x: (x["val_loss"], x["lr"])))["lr"]
        out[bs] = {"lr": best, "by_lr": by_lr, "metric": "steps to target"}
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


OVERHEAD = 0.2  # Zhang et al. (2024): critical where steps run 20 % over linear scaling


def model_free(sizes: list[int], means: list[float]) -> float:
    """The batch size where steps to target first exceed linear scaling from the smallest size by
    ``OVERHEAD`` (samples to target 20 % above the smallest size's), interpolated in log batch
    size; inf where no size measured exceeds it."""
    over = [m * b / (means[0] * sizes[0]) - 1 for b, m in zip(sizes, means)]
    for (b0, o0), (b1, o1) in zip(zip(sizes, over), zip(sizes[1:], over[1:])):
        if o1 > OVERHEAD:
            w = (OVERHEAD - o0) / (o1 - o0) if o1 != o0 else 1.0
            return float(math.exp(math.log(b0) + max(0.0, min(1.0, w)) * (math.log(b1) - math.log(b0))))
    return math.inf


RESIDUAL_LIMIT = 0.25  # a fit that misses a batch size's mean steps by more does not describe them


def critical_batch_size(by_size: dict[int, list[float]], alternatives: dict[int, list[float]] | None = None,
                        resamples: int = 1000) -> dict[str, Any]:
    """B_crit, S_min and E_min fitted to each batch size's mean steps to one target (``by_size``:
    the steps of its seeds; sizes that missed it in any seed left out), each size's residual, the
    model-free 20 % figure, and a 95 % interval that covers the seeds (resampled), the choice of
    learning rate (each draw picks, per size, one of ``alternatives``: the factors by which its
    steps change at the rates its choice could as well have been) and leaving one batch size out
    (the interval is the widest over the full fit and each leave-one-out fit). ``status`` is
    "fitted", or "not determined" with ``why``."""
    sizes = sorted(by_size)
    out: dict[str, Any] = {"sizes": sizes, "value": None, "lo": None, "hi": None, "s_min": None, "e_min": None,
                           "residuals": {}, "model_free": None, "model_free_lo": None, "model_free_hi": None}
    if len(sizes) < 3:
        return out | {"status": "not determined",
                      "why": f"{len(sizes)} batch size{'s' if len(sizes) != 1 else ''} reached it in every seed; "
                             f"a fit of two parameters needs three"}
    batch = np.array(sizes, dtype=float)
    means = np.array([np.mean(by_size[b]) for b in sizes], dtype=float)
    a, c = fit_steps(batch, means)
    value = _b_crit(a, c)
    out |= {"value": value, "s_min": a, "e_min": a * value if math.isfinite(value) else None,
            "residuals": {b: float((a + c / b) / m - 1) for b, m in zip(sizes, means)},
            "model_free": model_free(sizes, list(means))}
    out |= _envelope(by_size, alternatives or {}, resamples)
    why = _undetermined(out)
    return out | ({"status": "fitted"} if why is None else {"status": "not determined", "why": why})


def _envelope(by_size: dict[int, list[float]], alternatives: dict[int, list[float]], resamples: int) -> dict[str, Any]:
    """The 95 % bootstrap interval of B_crit (seeds resampled, a learning-rate alternative drawn per
    size), widened over every leave-one-out fit; and the model-free figure's over the full set."""
    sizes = sorted(by_size)
    rng = np.random.default_rng(0)
    subsets = [sizes] + ([[b for b in sizes if b != left] for left in sizes] if len(sizes) >= 4 else [])
    los, his, free = [], [], []
    for subset in subsets:
        draws = []
        for _ in range(resamples):
            y = np.array([float(np.mean(rng.choice(by_size[b], size=len(by_size[b]))))
                          * float(rng.choice(alternatives.get(b) or [1.0])) for b in subset])
            draws.append(_b_crit(*fit_steps(np.array(subset, dtype=float), y)))
            if subset is sizes:
                free.append(model_free(subset, list(y)))
        draws.sort()
        los.append(draws[int(0.025 * resamples)])
        his.append(draws[int(math.ceil(0.975 * resamples)) - 1])
    free.sort()
    return {"lo": min(los), "hi": max(his), "leave_one_out": len(subsets) > 1,
            "model_free_lo": free[int(0.025 * resamples)], "model_free_hi": free[int(math.ceil(0.975 * resamples)) - 1]}


def _undetermined(fit: dict[str, Any]) -> str | None:
    """Why a fit does not determine B_crit, or None where it does."""
    sizes, value, residuals = fit["sizes"], fit["value"], fit["residuals"]
    worst = max(sizes, key=lambda b: abs(residuals[b]))
    if abs(residuals[worst]) > RESIDUAL_LIMIT:
        return f"the fit misses batch size {worst} by {residuals[worst]:+.0%}"
    if not math.isfinite(value) or value > sizes[-1]:
        return f"it lies above the largest batch size swept ({sizes[-1]}): add larger ones"
    if value < sizes[0]:
        return f"it lies below the smallest batch size swept ({sizes[0]}): add smaller ones"
    if not math.isfinite(fit["hi"]) or fit["lo"] <= 0:
        return "its interval is unbounded"
    return None


def lr_alternatives(runs: list[dict[str, Any]], searches: dict[int, dict[str, Any]], target: str,
                    grid: dict[int, dict[str, Any]] | None) -> dict[int, list[float]]:
    """Per batch size, the factors by which its steps to ``target`` would change at each rate its
    choice could as well have picked: rates whose steps (the search's first seed, or a grid's mean)
    are within the spread of the chosen rate's seeds (at least 5 %) of the chosen rate's."""
    out = {}
    for bs in sorted({r["batch_size"] for r in runs}):
        steps = [_steps(r, target) for r in runs if r["batch_size"] == bs]
        steps = [x for x in steps if x is not None]
        if not steps:
            continue
        spread = max(0.05, statistics.stdev(steps) / statistics.fmean(steps) if len(steps) > 1 else 0.0)
        if grid:
            tried = {x["lr"]: x["val"] for x in grid[bs]["by_lr"] if not math.isnan(x["val"])}
            chosen = grid[bs]["lr"]
        elif bs in searches:
            key = "headline" if target == f"{searches[bs]['targets'][-1]:g}" else target
            tried = {t["lr"]: t["steps_to"].get(key) for t in searches[bs]["trials"] if t["steps_to"].get(key)}
            chosen = searches[bs]["chosen"]
        else:
            continue
        if chosen not in tried:
            continue
        out[bs] = [v / tried[chosen] for v in tried.values() if v <= tried[chosen] * (1 + spread)]
    return out


def test_intervals(rows: list[dict[str, Any]], outcomes: dict[int, dict[int, np.ndarray]], task: str,
                   resamples: int = 2000) -> dict[int, dict[str, float]]:
    """Each batch size's test figure (accuracy, or MSE) with a 95 % interval over seeds and test
    examples: each draw resamples the seeds and the examples, the same ones for every batch size
    (paired: runs of a seed share its initialisation and order, and every run the test split), and
    the difference to every other batch size. ``outcomes``: {batch size: {seed: per-example
    outcome (1/0 correct, or squared error)}}."""
    rng = np.random.default_rng(0)
    sizes = [r["batch_size"] for r in rows if r["batch_size"] in outcomes]
    if not sizes:
        return {}
    seeds = sorted(set.intersection(*(set(outcomes[b]) for b in sizes)))
    if not seeds:
        return {}
    n = len(outcomes[sizes[0]][seeds[0]])
    table = {b: np.stack([outcomes[b][s] for s in seeds]) for b in sizes}  # seeds x examples
    draws = {b: [] for b in sizes}
    for _ in range(resamples):
        pick_s = rng.integers(0, len(seeds), len(seeds))
        pick_x = rng.integers(0, n, n)
        for b in sizes:
            draws[b].append(float(table[b][pick_s][:, pick_x].mean()))
    out = {}
    for b in sizes:
        d = np.sort(np.array(draws[b]))
        out[b] = {"value": float(table[b].mean()), "lo": float(d[int(0.025 * resamples)]),
                  "hi": float(d[int(math.ceil(0.975 * resamples)) - 1]), "seeds": len(seeds), "examples": n,
                  "diff": {o: _pct(np.array(draws[b]) - np.array(draws[o]), resamples) for o in sizes if o != b}}
    return out


def _pct(d: np.ndarray, resamples: int) -> tuple[float, float]:
    d = np.sort(d)
    return float(d[int(0.025 * resamples)]), float(d[int(math.ceil(0.975 * resamples)) - 1])


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


NEAR = 0.10  # steady times this close to the quickest count as equal: more than a machine's timing noise


def recommend(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The batch size to use: among those that reached the headline target on the validation split
    in every seed, the ones whose steady time to it (steps times the steady step) is within ``NEAR``
    of the quickest mean, and of those the smallest (the fewest samples and the least memory for
    the same time: a margin that keeps timing noise from changing the answer, so that the same
    trainings give the same words). ``ties``: the other sizes whose intervals overlap its. Test
    figures play no part. Without any size that reached the target: not determined."""
    reached = [r for r in rows if r.get("time_to_target_s") is not None]
    if not reached:
        return {"batch_size": None, "why": "no batch size reached the target in every seed within its budget"}
    quickest = min(r["time_to_target_s"] for r in reached)
    near = [r for r in reached if r["time_to_target_s"] <= quickest * (1 + NEAR)]
    pick = min(near, key=lambda r: r["batch_size"])
    ties = [r["batch_size"] for r in reached if r is not pick and not separated(pick, r, "time_to_target_s")]
    return {"batch_size": pick["batch_size"], "basis": "time_to_target_s", "row": pick, "ties": ties,
            "near": sorted(r["batch_size"] for r in near)}


def noise_by_target(runs: list[dict[str, Any]], targets: list[str]) -> dict[str, dict[str, Any]]:
    """B_simple measured at each target (where runs stop at the headline target, at that one): the
    median over the runs where it was determined, and how many were."""
    out = {}
    for key in targets:
        values = [(r.get("targets") or {}).get(key, {}).get("b_simple") for r in runs]
        got = [v for v in values if v]
        out[key] = {"median": statistics.median(got) if got else None, "range": [min(got), max(got)] if got else None,
                    "n": len(got), "of": sum(1 for r in runs if key in (r.get("targets") or {}))}
    return out


def conclusions(rows: list[dict[str, Any]], runs: list[dict[str, Any]], task: str, *,
                n_train: int, budget_bytes: float, targets: list[str], lr_choice: dict[int, dict[str, Any]] | None = None,
                searches: dict[int, dict[str, Any]] | None = None,
                outcomes: dict[int, dict[int, np.ndarray]] | None = None) -> dict[str, Any]:
    """What the sweep says: ``rows`` are each batch size's figures at its chosen learning rate,
    ``runs`` the runs behind them, ``targets`` the target keys from the easiest to the headline,
    ``lr_choice`` a grid's choice (``choose_lr``), ``searches`` each size's learning-rate search,
    ``outcomes`` the per-example test outcomes (``test_intervals``)."""
    score = "test_acc" if task == "classification" else "test_mse"
    quickest = _winner(rows, "throughput", max)
    critical = {}
    for key in targets:
        by_size = {bs: v for bs, v in ((bs, [_steps(r, key) for r in runs if r["batch_size"] == bs])
                                       for bs in sorted({r["batch_size"] for r in runs})) if None not in v}
        critical[key] = critical_batch_size(by_size, lr_alternatives(runs, searches or {}, key, lr_choice))
    return {
        "recommended": recommend(rows),
        "largest_fit": largest_fit(rows, budget_bytes, n_train),
        "most_accurate": _winner(rows, score, max if task == "classification" else min),
        "test": test_intervals(rows, outcomes or {}, task),
        "fastest_to_target": _winner(rows, "time_to_target_s", min),
        "highest_throughput": {"batch_size": quickest["batch_size"], "samples_per_s": quickest["throughput"],
                               "ci": quickest["ci"], "ties": quickest["ties"]} if quickest else None,
        "targets": targets,
        "critical_by_target": critical,
        "critical": critical[targets[-1]],
        "noise": noise_by_target(runs, targets),
        "missed_target": [r["batch_size"] for r in rows if r.get("time_to_target_s") is None],
        "censored": sorted({(r["batch_size"], r["seed"], r.get("budget_steps")) for r in runs if r.get("censored")}),
        "lr_choice": lr_choice,
        "searches": searches or {},
        "gpu": any(r.get("device") == "cuda" for r in runs),  # where memory is measured, not computed
    }


def _best_lrs(c: dict[str, Any]) -> dict[int, float]:
    return {bs: choice["lr"] for bs, choice in (c.get("lr_choice") or {}).items()}


def _finite(v: Any) -> Any:
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def _determined(crit: dict[str, Any], key: str = "value") -> Any:
    return _finite(crit[key]) if crit["status"] == "fitted" else None


def dvc_metrics(c: dict[str, Any]) -> dict[str, Any]:
    """The conclusions DVC records (metrics.json): few and short, since `dvc exp show` prints each
    as a column beside the changed params. A figure the data cannot determine is null."""
    rec, crit, acc = c["recommended"] or {}, c["critical"], c["most_accurate"] or {}
    row = rec.get("row") or {}
    score = "acc" if "test_acc" in acc else "mse"
    out = {"rec_bs": rec.get("batch_size"), "rec_lr": row.get("lr_effective"), f"rec_test_{score}": row.get(f"test_{score}"),
           "rec_s": row.get("time_to_target_s"), "cbs": _determined(crit),
           "cbs_20pct": _finite(crit["model_free"]) if crit.get("model_free") is not None else None}
    if c.get("lr_choice"):
        out["best_lr"] = {str(bs): lr for bs, lr in _best_lrs(c).items()}
    return out


def summary_metrics(c: dict[str, Any]) -> dict[str, Any]:
    """Every conclusion, as the parent run's ``sweep/*`` metrics."""
    rec, crit, acc = c["recommended"] or {}, c["critical"], c["most_accurate"] or {}
    row = rec.get("row") or {}
    score = "test_acc" if "test_acc" in acc else "test_mse"
    fastest, top, fit = c["fastest_to_target"] or {}, c["highest_throughput"] or {}, c["largest_fit"] or {}
    out = {"recommended_bs": rec.get("batch_size"), "recommended_lr": row.get("lr_effective"), f"recommended_{score}": row.get(score),
           "recommended_s_to_target": row.get("time_to_target_s"), "largest_fit_bs": fit.get("batch_size"),
           "cbs": _determined(crit), "cbs_lo": _determined(crit, "lo"), "cbs_hi": _determined(crit, "hi"),
           "s_min": _determined(crit, "s_min"), "e_min": _determined(crit, "e_min"),
           "cbs_20pct": _finite(crit.get("model_free")),
           "noise_at_target": c["noise"][c["targets"][-1]]["median"],
           "best_bs": acc.get("batch_size"), f"best_{score}": acc.get(score), "n_tied": len(acc.get("ties", [])),
           "fastest_bs": fastest.get("batch_size"), "fastest_s": fastest.get("time_to_target_s"),
           "top_speed_bs": top.get("batch_size"), "top_speed": top.get("samples_per_s"),
           "n_missed": len(c["missed_target"]), "n_censored": len(c["censored"])}
    for key, cr in c["critical_by_target"].items():
        out[f"cbs_at_{key}"] = _determined(cr)
    for bs, lr in _best_lrs(c).items():
        out[f"best_lr_bs{bs}"] = lr
    for bs, found in c["searches"].items():
        out[f"lr_bs{bs}"] = found["chosen"]
    return out
