"""The report's plots: each a PNG with a caption saying what to look for; every batch size in
the colour its runs have in the MLflow UI."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..context import Context
from ..mlflow_ui import sweep_colours
from .stats import read_csv


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _colour(rows, bs: int) -> str:
    """The batch size's colour, the same as its group's and runs' in the MLflow UI (palette.py)."""
    return sweep_colours(r["batch_size"] for r in rows)[bs]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=90)
    _pyplot().close(fig)
    tmp.replace(path)
    return path


def _smooth(values: np.ndarray, window: int = 0) -> np.ndarray:
    window = window or max(1, len(values) // 200)
    kernel = np.ones(window) / window
    head = np.cumsum(values[:window - 1]) / np.arange(1, window) if window > 1 else np.empty(0)
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])


def plot_loss_vs_samples(ctx: Context, rows, runs, task, concl=None) -> str:
    fig, ax = _pyplot().subplots(figsize=(7, 4.5))
    for r in rows:
        curves = [read_csv(ctx.train_dir(r["batch_size"], seed, r.get("lr")) / "steps.csv") for seed in r["seeds"]]
        # Runs stop at the target, each after its own number of steps: the band spans them while all run.
        n = min(len(c["loss"]) for c in curves)
        x = np.array(curves[0]["samples"][:n])
        smooth = np.array([_smooth(np.array(c["loss"][:n])) for c in curves])
        colour = _colour(rows, r["batch_size"])
        ax.plot(x, smooth.mean(0), label=f"bs={r['batch_size']}", lw=1.2, color=colour)
        if len(curves) > 1:
            ax.fill_between(x, smooth.min(0), smooth.max(0), color=colour, alpha=0.2, lw=0)
    ax.set(xlabel="samples seen", ylabel="training loss (smoothed)", yscale="log",
           title="Training loss against samples seen")
    ax.legend()
    _save(fig, ctx.compare_dir / "loss_vs_samples.png")
    return ("Each batch size's training loss against samples seen (the same data budget on the x axis): the "
            "line is the mean over seeds, the band spans the seeds. Small batches take more, noisier steps per "
            "sample; a curve that falls later needs more data to get there.")


def bounded_yerr(pts, key: str, hi: float = math.inf) -> list[list[float]]:
    """Error bars (below, above) of each point's 95 % interval, cut at what the quantity can be:
    with 3 seeds the t-interval of a mean of seconds or bytes can reach below 0 (and an accuracy's
    above 1), and a plot must not show a value that cannot occur."""
    half = [0.0 if math.isnan(r.get(f"{key}_ci", math.nan)) else r[f"{key}_ci"] for r in pts]
    return [[min(h, r[key]) for r, h in zip(pts, half)], [min(h, hi - r[key]) for r, h in zip(pts, half)]]


def _per_batch_size(ctx, rows, name, key, ylabel, log_y=False, hi: float = math.inf) -> None:
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    pts = [r for r in rows if r.get(key) is not None]
    yerr = bounded_yerr(pts, key, hi=hi)
    if pts:
        ax.errorbar([r["batch_size"] for r in pts], [r[key] for r in pts], yerr=yerr,
                    fmt="-", color="0.6", ecolor="0.3", capsize=4, zorder=1)
        for r in pts:
            ax.scatter([r["batch_size"]], [r[key]], color=_colour(rows, r["batch_size"]), zorder=2, s=40)
    ax.set(xscale="log", xlabel="batch size", ylabel=ylabel, title=ylabel + " vs batch size")
    if log_y:
        ax.set_yscale("log")
        below = yerr[0]
        if any(r[key] <= b for r, b in zip(pts, below)):  # a bar cut at 0 runs off the log axis' bottom
            ax.set_ylim(bottom=min([r[key] - b for r, b in zip(pts, below) if r[key] > b] + [r[key] for r in pts]) / 2)
    ax.set_xticks([r["batch_size"] for r in rows], [str(r["batch_size"]) for r in rows])
    _save(fig, ctx.compare_dir / f"{name}.png")


def _with_test_interval(rows, concl, key: str) -> list[dict]:
    """Rows whose ``key`` interval is the comparison's (seeds and test examples resampled), drawn as
    a symmetric bar of half its width around the mean."""
    test = (concl or {}).get("test") or {}
    return [r | ({key: test[r["batch_size"]]["value"], f"{key}_ci": (test[r["batch_size"]]["hi"]
                                                                    - test[r["batch_size"]]["lo"]) / 2}
                 if r["batch_size"] in test else {}) for r in rows]


def plot_accuracy(ctx, rows, runs, task, concl=None) -> str:
    how = ("95 % interval over seeds and test examples" if (concl or {}).get("test")
           else "95 % interval over the seeds")
    if task == "classification":
        _per_batch_size(ctx, _with_test_interval(rows, concl, "test_acc"), "accuracy_vs_batch_size", "test_acc",
                        "test accuracy", hi=1.0)
        return (f"Test accuracy of each batch size's models (each where its run stopped), mean and {how}: "
                f"reported, not used to choose; overlapping bars are not a difference.")
    _per_batch_size(ctx, _with_test_interval(rows, concl, "test_mse"), "accuracy_vs_batch_size", "test_mse", "test MSE")
    return f"Test mean squared error of each batch size's models (mean, {how}): lower is better; reported only."


def plot_throughput(ctx, rows, runs, task, concl=None) -> str:
    _per_batch_size(ctx, rows, "throughput_vs_batch_size", "throughput", "samples/s", log_y=True)
    return ("Training samples per second of a steady optimizer step (the batch over the median step's seconds): "
            "the cost side. It flattens where the machine is saturated.")


def plot_time_to_target(ctx, rows, runs, task, concl=None) -> str:
    t = ctx.params.train
    _per_batch_size(ctx, rows, "time_to_target_vs_batch_size", "time_to_target_s",
                    f"seconds to {t.target_metric} {t.target_value:g}")
    return ("Seconds to the target: steps to target times the steady (median) step, so that a shared "
            "machine's stalls do not move it (the measured seconds are in the table); a batch size without a point "
            "missed the target in at least one seed.")


def plot_memory(ctx, rows, runs, task, concl=None) -> str:
    _per_batch_size(ctx, rows, "memory_vs_batch_size", "step_memory_bytes", "bytes a step holds", log_y=True)
    return ("What one training step holds for its batch: the batch, the activations kept for the backward "
            "pass and the outputs (on a GPU: peak allocated bytes above the step's start). It grows with the "
            "batch size; the rest of the process (libraries, data, model) does not.")


def plot_steps_to_target(ctx, rows, runs, task, concl=None) -> str:
    crit = (concl or {}).get("critical") or {}
    fig, ax = _pyplot().subplots(figsize=(6.5, 4.2))
    reached = [r for r in rows if r.get("steps_to_target")]
    for r in reached:
        mine = [x["steps_to_target"] for x in runs if x["batch_size"] == r["batch_size"] and x.get("steps_to_target")]
        ax.scatter([r["batch_size"]] * len(mine), mine, color=_colour(rows, r["batch_size"]), s=14, alpha=0.6, zorder=2)
    if reached:
        ax.plot([r["batch_size"] for r in reached], [r["steps_to_target"] for r in reached], "o", color="0.2",
                label="measured: mean (dots: seeds)", zorder=3)
        sizes = [r["batch_size"] for r in rows]
        grid = np.geomspace(min(sizes) / 1.5, max(sizes) * 1.5, 200)
        if crit.get("status") == "fitted":
            s_min, b_crit = crit["s_min"], crit["value"]
            ax.plot(grid, s_min * (1 + b_crit / grid), "-", color="tab:blue",
                    label=f"fit S = S_min (1 + B_crit/B), B_crit = {b_crit:,.0f}")
            ax.plot(grid, s_min * b_crit / grid, "k--", lw=0.8, label="perfect scaling (steps halve)")
            ax.axhline(s_min, color="k", ls=":", lw=0.8, label=f"S_min = {s_min:,.0f} steps")
            lo, hi = crit["lo"], min(crit["hi"], grid[-1])
            ax.axvspan(max(lo, grid[0]), hi, color="tab:blue", alpha=0.12, lw=0, label="B_crit, 95 % interval")
        noise = (concl or {}).get("noise", {}).get((concl or {}).get("targets", [""])[-1], {}).get("median")
        if noise:
            ax.axvline(noise, color="tab:red", lw=0.8, ls="-.", label=f"noise scale at target = {noise:,.0f}")
        ax.legend(fontsize=8)
        low = min(crit.get("s_min") or math.inf, *(r["steps_to_target"] for r in reached))
        ax.set_ylim(bottom=low / 3)  # the perfect-scaling line would otherwise stretch the axis down
    else:
        ax.text(0.5, 0.5, "no batch size reached the target in every seed", ha="center", transform=ax.transAxes)
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="optimizer steps to target",
           title="Steps to target and the critical batch size")
    ax.set_xticks([r["batch_size"] for r in rows], [str(r["batch_size"]) for r in rows])
    _save(fig, ctx.compare_dir / "steps_to_target.png")
    return ("Optimizer steps to the headline target against batch size (each at its tuned rate), with the fit "
            "S = S_min (1 + B_crit / B) (McCandlish et al. 2018) where it is determined. Below B_crit doubling the "
            "batch nearly halves the steps (dashed line); above it the steps approach S_min and bigger batches stop "
            "paying. The band is B_crit's 95 % interval (seeds, learning-rate choice, one batch size left out); the "
            "red line is the gradient noise scale where runs reached the target (a reference under Adam).")


def plot_lr(ctx, rows, runs, task, concl=None) -> str:
    choice, found = (concl or {}).get("lr_choice"), (concl or {}).get("searches")
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    pts = [(r["batch_size"], r.get("lr_effective") or r["lr"]) for r in rows if r.get("lr")]
    if found:
        for bs, f in found.items():
            ax.scatter([bs] * len(f["trials"]), [t["lr_effective"] for t in f["trials"]], marker="x", color="0.6",
                       s=20, zorder=1)
        ax.scatter([], [], marker="x", color="0.6", label="tried (search, first seed)")
    elif choice:
        for bs, c in choice.items():
            ax.scatter([bs] * len(c["by_lr"]), [x["lr"] for x in c["by_lr"]], marker="x", color="0.6", s=20, zorder=1)
        ax.scatter([], [], marker="x", color="0.6", label="tried (train.lr_grid)")
    if pts:
        ax.plot(*zip(*pts), "o-", color="0.2", label="chosen (best on validation)" if choice or found else "train.lr",
                zorder=2)
        b0, lr0 = pts[0]
        xs = np.array([b for b, _ in pts], dtype=float)
        ax.plot(xs, lr0 * xs / b0, "--", color="tab:orange", lw=0.9, label="linear rule (lr ∝ B)")
        ax.plot(xs, lr0 * np.sqrt(xs / b0), ":", color="tab:green", lw=1.2, label="square-root rule (lr ∝ √B)")
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="learning rate",
           title="Learning rate per batch size")
    ax.set_xticks([r["batch_size"] for r in rows], [str(r["batch_size"]) for r in rows])
    ax.legend(fontsize=8)
    _save(fig, ctx.compare_dir / "lr_vs_batch_size.png")
    if not (choice or found):
        return ("Every batch size trained at train.lr: set train.lr_search to compare each at its own best rate "
                "(the rules are drawn from the smallest batch size for reference).")
    return ("Each batch size's best learning rate (chosen on validation; crosses: every rate tried) against the "
            "linear and square-root scaling rules drawn from the smallest batch size. For Adam the best rate "
            "often rises with the batch size, then stops rising or falls (Li et al. 2024).")


def plot_noise_scale(ctx, rows, runs, task, concl=None) -> str:
    fig, ax = _pyplot().subplots(figsize=(7, 4))
    for r in rows:
        mine = [x for x in runs if x["batch_size"] == r["batch_size"]]
        pts = sorted((x["samples"], x["noise_scale"]) for x in mine if x.get("noise_scale"))
        if pts:
            ax.plot(*zip(*pts), "o", label=f"bs={r['batch_size']}", ms=4, color=_colour(rows, r["batch_size"]))
    ax.set(xlabel="samples seen", ylabel="B_simple", xscale="log", yscale="log",
           title="Gradient noise scale where each run stopped")
    if ax.lines:
        ax.legend()
    _save(fig, ctx.compare_dir / "noise_scale.png")
    return ("The gradient noise scale B_simple of each run's trained model (every seed; where runs stop at the "
            "target, at the target), measured from micro-batches at fixed parameters, against the samples the run "
            "took. Raw gradients: under Adam a reference for B_crit, not an estimate of it.")


def plot_critical_curve(ctx, rows, runs, task, concl=None) -> str:
    """B_crit (with its interval) and B_simple at every target, from the easiest to the headline."""
    concl = concl or {}
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    keys = concl.get("targets") or []
    crit = concl.get("critical_by_target") or {}
    fitted = [(i, crit[k]) for i, k in enumerate(keys) if crit.get(k, {}).get("status") == "fitted"]
    if fitted:
        ax.errorbar([i for i, _ in fitted], [c["value"] for _, c in fitted],
                    yerr=[[c["value"] - c["lo"] for _, c in fitted], [c["hi"] - c["value"] for _, c in fitted]],
                    fmt="o-", color="tab:blue", capsize=4, label="B_crit (fit), 95 % interval")
    noise = [(i, concl["noise"][k]["median"]) for i, k in enumerate(keys) if (concl.get("noise") or {}).get(k, {}).get("median")]
    if noise:
        ax.plot(*zip(*noise), "s--", color="tab:red", lw=0.8, label="B_simple (median over runs)")
    missing = [i for i, k in enumerate(keys) if crit.get(k, {}).get("status") != "fitted"]
    for i in missing:
        ax.annotate("not determined", (i, 0.5), xycoords=("data", "axes fraction"), ha="center", rotation=90,
                    color="0.4", fontsize=8)
    ax.set_xticks(range(len(keys)), [f"{ctx.params.train.target_metric}\n{'≥' if ctx.params.train.target_metric == 'val_acc' else '≤'} {k}"
                                     for k in keys], fontsize=8)
    ax.set(yscale="log", ylabel="batch size", title="Critical batch size at each target (easiest first)")
    from matplotlib.ticker import ScalarFormatter
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    if fitted or noise:
        ax.legend(fontsize=8)
    _save(fig, ctx.compare_dir / "critical_vs_target.png")
    return ("The critical batch size fitted at every target, from the easiest to the headline, with its 95 % "
            "interval (seeds, learning-rate choice, one batch size left out), and the gradient noise scale where "
            "runs stopped at the headline target. B_crit tends to grow as the target gets harder (McCandlish et al. 2018).")


PLOTS = {"loss_vs_samples": plot_loss_vs_samples, "accuracy_vs_batch_size": plot_accuracy,
         "throughput_vs_batch_size": plot_throughput, "time_to_target_vs_batch_size": plot_time_to_target,
         "steps_to_target": plot_steps_to_target, "critical_vs_target": plot_critical_curve,
         "lr_vs_batch_size": plot_lr, "memory_vs_batch_size": plot_memory,
         "noise_scale": plot_noise_scale}


def make_plots(ctx: Context, rows, runs, task, concl=None) -> list[tuple[Path, str]]:
    """Every plot as (file, caption: what to look for)."""
    ctx.compare_dir.mkdir(parents=True, exist_ok=True)
    return [(ctx.compare_dir / f"{name}.png", plot(ctx, rows, runs, task, concl)) for name, plot in PLOTS.items()]
