"""What compare shows a person: plots with intervals, the tutorial's claims checked against the
sweep, one critical-batch-size story, and the HTML report (markup in templates/report.html)."""
from __future__ import annotations

import base64
import html as html_lib
import math
from pathlib import Path
from string import Template
from typing import Any

import numpy as np

from .stats import read_csv, separated
from ..context import Context
from ..mlflow_ui import sweep_colours

TEMPLATE = Path(__file__).with_name("templates") / "report.html"


# ------------------------------------------------------------------ plots

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
        x = np.array(curves[0]["samples"])
        smooth = np.array([_smooth(np.array(c["loss"])) for c in curves])
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


def plot_accuracy(ctx, rows, runs, task, concl=None) -> str:
    if task == "classification":
        _per_batch_size(ctx, rows, "accuracy_vs_batch_size", "test_acc", "test accuracy", hi=1.0)
        return ("Test accuracy of each batch size's final models, mean and 95 % interval over the seeds: "
                "higher is better; overlapping bars are not a difference.")
    _per_batch_size(ctx, rows, "accuracy_vs_batch_size", "test_mse", "test MSE")
    return "Test mean squared error of each batch size's final models (mean, 95 % interval): lower is better."


def plot_throughput(ctx, rows, runs, task, concl=None) -> str:
    _per_batch_size(ctx, rows, "throughput_vs_batch_size", "throughput", "samples/s", log_y=True)
    return ("Training samples per second of a steady optimizer step (the batch over the median step's seconds): "
            "the cost side. It flattens where the machine is saturated.")


def plot_time_to_target(ctx, rows, runs, task, concl=None) -> str:
    t = ctx.params.train
    _per_batch_size(ctx, rows, "time_to_target_vs_batch_size", "time_to_target_s",
                    f"seconds to {t.target_metric} {t.target_value:g}")
    return ("Wall seconds of training until validation first reached the target (every seed); a batch size "
            "without a point missed it in at least one seed.")


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
        noise = (concl or {}).get("noise_at_target")
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
    return ("Optimizer steps to the target against batch size, with the fit S = S_min (1 + B_crit / B) "
            "(McCandlish et al. 2018). Below B_crit doubling the batch nearly halves the steps (dashed line); "
            "above it the steps approach S_min and bigger batches stop paying. The band is B_crit's 95 % "
            "bootstrap interval over seeds; the red line is the gradient noise scale where training reached "
            "the target, the figure theory expects B_crit to be near.")


def plot_lr(ctx, rows, runs, task, concl=None) -> str:
    choice = (concl or {}).get("lr_choice")
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    pts = [(r["batch_size"], r["lr"]) for r in rows if r.get("lr")]
    if choice:
        for bs, c in choice.items():
            ax.scatter([bs] * len(c["by_lr"]), [x["lr"] for x in c["by_lr"]], marker="x", color="0.6", s=20, zorder=1)
        ax.scatter([], [], marker="x", color="0.6", label="tried (train.lr_grid)")
    if pts:
        ax.plot(*zip(*pts), "o-", color="0.2", label="chosen (best on validation)" if choice else "train.lr", zorder=2)
        b0, lr0 = pts[0]
        xs = np.array([b for b, _ in pts], dtype=float)
        ax.plot(xs, lr0 * xs / b0, "--", color="tab:orange", lw=0.9, label="linear rule (lr ∝ B)")
        ax.plot(xs, lr0 * np.sqrt(xs / b0), ":", color="tab:green", lw=1.2, label="square-root rule (lr ∝ √B)")
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="learning rate",
           title="Learning rate per batch size")
    ax.set_xticks([r["batch_size"] for r in rows], [str(r["batch_size"]) for r in rows])
    ax.legend(fontsize=8)
    _save(fig, ctx.compare_dir / "lr_vs_batch_size.png")
    if not choice:
        return ("Every batch size trained at train.lr: set train.lr_grid to compare each at its own best rate "
                "(the rules are drawn from the smallest batch size for reference).")
    return ("Each batch size's best learning rate (chosen on validation; crosses: every rate tried) against the "
            "linear and square-root scaling rules drawn from the smallest batch size. For Adam the best rate "
            "often rises with the batch size, then stops rising or falls (Li et al. 2024).")


def plot_noise_scale(ctx, rows, runs, task, concl=None) -> str:
    fig, ax = _pyplot().subplots(figsize=(7, 4))
    for r in rows:
        noise = read_csv(ctx.train_dir(r["batch_size"], r["seeds"][0], r.get("lr")) / "noise.csv")
        if noise.get("samples"):
            # A value <= 0 (the unbiased |G|² estimate fell below 0) is not measurable: a gap in
            # the line, where a log axis would otherwise draw it as a plunge to the bottom.
            values = [v if v > 0 else math.nan for v in noise["b_simple"]]
            ax.plot(noise["samples"], values, label=f"bs={r['batch_size']}", lw=1,
                    color=_colour(rows, r["batch_size"]))
    ax.set(xlabel="samples seen", ylabel="B_simple", yscale="log",
           title="Gradient noise scale (McCandlish et al. 2018)")
    if ax.lines:
        ax.legend()
    _save(fig, ctx.compare_dir / "noise_scale.png")
    return ("The gradient noise scale B_simple during training (first seed of each batch size): batch sizes "
            "well below it use each sample efficiently; it grows as the loss falls. A gap in a line is where "
            "the estimate was 0 or below (the gradient's signal lost in its noise: not measurable there), "
            "frequent at small batch sizes.")


PLOTS = {"loss_vs_samples": plot_loss_vs_samples, "accuracy_vs_batch_size": plot_accuracy,
         "throughput_vs_batch_size": plot_throughput, "time_to_target_vs_batch_size": plot_time_to_target,
         "steps_to_target": plot_steps_to_target, "lr_vs_batch_size": plot_lr, "memory_vs_batch_size": plot_memory,
         "noise_scale": plot_noise_scale}


def make_plots(ctx: Context, rows, runs, task, concl=None) -> list[tuple[Path, str]]:
    """Every plot as (file, caption: what to look for)."""
    ctx.compare_dir.mkdir(parents=True, exist_ok=True)
    return [(ctx.compare_dir / f"{name}.png", plot(ctx, rows, runs, task, concl)) for name, plot in PLOTS.items()]


# ------------------------------------------------------------------ numbers for people

def human(v: Any, key: str = "") -> str:
    """Numbers for people: 129,837 samples/s, 0.962, 3.1 s, 38 kB."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if key.endswith("_bytes"):
        for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
            if abs(v) >= size:
                return f"{v / size:,.1f} {unit}"
        return f"{v:,.0f} B"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.3g}" if abs(v) < 1 else f"{v:,.3g}" if abs(v) < 100 else f"{v:,.1f}"
    return html_lib.escape(str(v))


def with_ci(row: dict[str, Any], key: str) -> str:
    """``0.962 ± 0.008`` (the 95 % interval's half-width, in the mean's own precision)."""
    if row.get(key) is None:
        return "—"
    ci = row.get(f"{key}_ci", math.nan)
    if math.isnan(ci) or ci == 0:  # one seed, or every seed gave the same figure
        return human(row[key], key)
    if key.endswith("_bytes"):
        return f"{human(row[key], key)} ± {human(ci, key)}"
    if abs(row[key]) >= 1000:
        return f"{row[key]:,.0f} ± {ci:,.0f}"
    digits = max(0, min(6, -math.floor(math.log10(ci)))) if ci > 0 else 3  # one significant digit of the interval
    return f"{row[key]:.{digits}f} ± {ci:.{digits}f}"


# ------------------------------------------------------------------ what the sweep says

def _target(ctx: Context) -> str:
    t = ctx.params.train
    return f"{t.target_metric} {'≥' if t.target_metric == 'val_acc' else '≤'} {t.target_value:g}"


def _sizes(sizes) -> str:
    sizes = [str(b) for b in sizes]
    return sizes[0] if len(sizes) == 1 else f"{', '.join(sizes[:-1])} and {sizes[-1]}"


def recommendation_text(ctx: Context, concl: dict[str, Any], task: str, markup: bool = False) -> str:
    """The sweep's answer in one sentence: which batch size, why, and what it and the largest
    batch that fits the memory cost."""
    rec, fit = concl["recommended"], concl["largest_fit"]
    if rec is None:
        return "No recommendation: no batch size has a test score."
    row, score = rec["row"], rec["score"]
    b = (lambda x: f"<b>{x}</b>") if markup else str
    label = "test accuracy" if score == "test_acc" else "test MSE"
    others = [x for x in rec["not_worse"] if x != rec["batch_size"]]
    pool = (f"the least among the batch sizes whose {label} is not worse ({_sizes(rec['not_worse'])}: intervals overlap)"
            if others else f"the only batch size with the best {label}")
    if rec["basis"] == "time_to_target_s":
        why = (f"it reaches {_target(ctx)} in {with_ci(row, 'time_to_target_s')} s of training, {pool}"
               + (f"; tied on time with {_sizes(rec['ties'])}" if rec["ties"] else ""))
    else:
        why = (f"no batch size with the best {label} reached {_target(ctx)} in every seed; of those, it runs the "
               f"most samples per second ({with_ci(row, 'throughput')})")
    cost = (f"{label} {with_ci(row, score)}, {human(row.get('step_memory_bytes'), 'step_memory_bytes')} a step")
    if fit is None:
        big = ""
    elif fit["whole_split"]:
        big = (f"; the largest batch that fits {fit['budget_bytes'] / 2**20:,.0f} MiB is the whole training split "
               f"({fit['batch_size']:,} samples, about {human(fit['bytes'], 'step_memory_bytes')} a step)")
    else:
        big = (f"; the largest batch that fits {fit['budget_bytes'] / 2**20:,.0f} MiB is about {fit['batch_size']:,} "
               f"({human(fit['bytes'], 'step_memory_bytes')} a step" + (", extrapolated from the sizes measured)"
                                                                if fit["batch_size"] > fit["measured_up_to"] else ")"))
    lr = f" at lr {row['lr']:g}" if ctx.params.train.lr_grid and row.get("lr") else ""
    edge = next((side for side, (_, sizes) in grid_edges(ctx, concl).items() if rec["batch_size"] in sizes), None)
    if edge:
        lr += f" (the grid's {edge} rate: a wider train.lr_grid may change this answer)"
    return f"Use batch size {b(rec['batch_size'])}{lr}: {why} ({cost}){big}."


def _steps_up(rows, key: str) -> list[tuple[dict, dict]]:
    pts = [r for r in rows if r.get(key) is not None]
    return list(zip(pts, pts[1:]))


def _monotone(rows, key: str, up: bool) -> bool:
    pairs = _steps_up(rows, key)
    return bool(pairs) and all((b[key] > a[key]) if up else (b[key] < a[key]) for a, b in pairs)


def _ends_separate(rows, key: str) -> bool:
    pts = [r for r in rows if r.get(key) is not None]
    return len(pts) >= 2 and separated(pts[0], pts[-1], key)


THROUGHPUT = "Batching is faster (per sample): a larger batch size processes more samples per second."
TO_TARGET = "Batching is faster (to a result): a larger batch size reaches the target accuracy in less time."
MEMORY = "Bigger batches cost memory."
UNSTABLE = ("Too small is unstable: a smaller batch size might lead to less stable training and "
            "slower convergence.")
SHUFFLE = "Shuffling matters: shuffled batches keep the model from learning the data's order."
RULES = {
    THROUGHPUT: "holds where samples/s rises at every step up in batch size and the smallest and largest "
                "intervals separate; does not hold where it falls (intervals separate); else inconclusive",
    TO_TARGET: "holds where seconds to target fall at every step up, the smallest and largest intervals separate "
               "and no larger batch size misses a target a smaller one reached; does not hold where a larger "
               "one takes longer (intervals separate) or misses it; else inconclusive",
    MEMORY: "holds where a step's memory rises at every step up in batch size; does not hold where it falls",
    UNSTABLE: "holds where the smallest batch size's per-step loss spread is above the largest's and its seconds "
              "to target too (intervals separate, or only the smallest missed the target); partly where only "
              "the spread is; does not hold where the spread is not above (intervals separate); else inconclusive",
    SHUFFLE: "holds where the shuffled sweep's test score beats the shuffle-off control's (intervals separate) "
             "at the same batch size; measured by two sweeps that differ in train.shuffle alone",
}


def claims(ctx: Context, rows, task) -> list[dict[str, str]]:
    """The tutorial's claims, each with its rule, the sweep's numbers and the verdict the rule
    gives. Each compares batch sizes, so a sweep of one batch size measures none of them."""
    if len(rows) < 2:
        alone = (f"this sweep has one batch size ({rows[0]['batch_size']}): nothing to compare it with; "
                 "list two or more in train.batch_sizes")
        return [{"claim": c, "rule": RULES[c], "numbers": alone, "verdict": "not measured (one batch size)"}
                for c in (THROUGHPUT, TO_TARGET, MEMORY, UNSTABLE)] + [_shuffle_claim(ctx, rows, task)]
    first, last = rows[0], rows[-1]
    out = []
    ratio = last["throughput"] / first["throughput"] if first.get("throughput") else math.nan
    rises, falls = _monotone(rows, "throughput", True), _monotone(rows, "throughput", False)
    sep = _ends_separate(rows, "throughput")
    out.append({"claim": THROUGHPUT, "numbers": f"{with_ci(first, 'throughput')} samples/s at batch size "
                f"{first['batch_size']}, {with_ci(last, 'throughput')} at {last['batch_size']} ({ratio:,.1f}x)",
                "verdict": "holds" if rises and sep else "does not hold here" if falls and sep else "inconclusive"})
    out.append(_to_target_claim(rows))
    direction_up, direction_down = _monotone(rows, "step_memory_bytes", True), _monotone(rows, "step_memory_bytes", False)
    out.append({
        "claim": MEMORY,
        "numbers": f"a step holds {with_ci(first, 'step_memory_bytes')} at batch size {first['batch_size']}, "
                   f"{with_ci(last, 'step_memory_bytes')} at {last['batch_size']} "
                   f"({human(first.get('bytes_per_sample'))} bytes per sample)",
        "verdict": "holds" if direction_up else "does not hold here" if direction_down else "inconclusive"})
    out.append(_stability_claim(rows, task))
    out.append(_shuffle_claim(ctx, rows, task))
    return [c | {"rule": RULES[c["claim"]]} for c in out]


def _to_target_claim(rows) -> dict[str, str]:
    reached = [r for r in rows if r.get("time_to_target_s") is not None]
    missed_after = [r["batch_size"] for r in rows if r.get("time_to_target_s") is None
                    and any(x["batch_size"] < r["batch_size"] for x in reached)]
    numbers = "; ".join(f"{_to_target(r)} s at {r['batch_size']}" if r.get("time_to_target_s") is not None
                        else f"{_to_target(r)} at {r['batch_size']}" for r in rows)
    slower = any(separated(a, b, "time_to_target_s") and b["time_to_target_s"] > a["time_to_target_s"]
                 for a, b in zip(reached, reached[1:]))
    if len(reached) < 2 and not missed_after:
        verdict = "inconclusive"
    elif missed_after or slower:
        verdict = "does not hold here"
    elif _monotone(reached, "time_to_target_s", False) and _ends_separate(reached, "time_to_target_s"):
        verdict = "holds"
    else:
        verdict = "inconclusive"
    return {"claim": TO_TARGET, "numbers": "seconds to target: " + numbers, "verdict": verdict}


def _to_target(row) -> str:
    if row.get("time_to_target_s") is not None:
        return with_ci(row, "time_to_target_s")
    return f"target reached in {row.get('reached', 0)}/{row.get('n', '?')} seeds"


def _stability_claim(rows, task) -> dict[str, str]:
    first, last = rows[0], rows[-1]
    score = "test_acc" if task == "classification" else "test_mse"
    has_spread = first.get("loss_noise") is not None and last.get("loss_noise") is not None
    sep = has_spread and separated(first, last, "loss_noise")
    noisier = sep and first["loss_noise"] > last["loss_noise"]
    calmer = sep and first["loss_noise"] < last["loss_noise"]
    if first.get("time_to_target_s") is None:
        slower = last.get("time_to_target_s") is not None
    else:
        slower = (last.get("time_to_target_s") is not None and first["time_to_target_s"] > last["time_to_target_s"]
                  and separated(first, last, "time_to_target_s"))
    numbers = (f"per-step loss spread (last epoch, relative) {with_ci(first, 'loss_noise')} at batch size "
               f"{first['batch_size']} vs {with_ci(last, 'loss_noise')} at {last['batch_size']}; "
               f"{score} {with_ci(first, score)} vs {with_ci(last, score)}; seconds to target "
               f"{_to_target(first)} vs {_to_target(last)}")
    verdict = ("holds" if noisier and slower else "partly: noisier, not slower to the target" if noisier
               else "does not hold here" if calmer else "inconclusive")
    return {"claim": UNSTABLE, "numbers": numbers, "verdict": verdict}


def _shuffle_claim(ctx: Context, rows, task) -> dict[str, str]:
    score = "test_acc" if task == "classification" else "test_mse"
    accs = "; ".join(f"{with_ci(r, score)} at {r['batch_size']}" for r in rows)
    if ctx.params.train.shuffle:
        return {"claim": SHUFFLE, "rule": RULES[SHUFFLE],
                "numbers": f"this sweep shuffles ({score} {accs}); its control is "
                           f"`dvc exp run -S train.shuffle=false`, read beside it in `dvc exp show`",
                "verdict": "measured against the control sweep"}
    return {"claim": SHUFFLE, "rule": RULES[SHUFFLE],
            "numbers": f"this sweep is the shuffle-off control: every epoch reads the split in its stored order "
                       f"({score} {accs}); compare with the shuffled sweep in `dvc exp show`",
            "verdict": "this is the control"}


def critical_story(ctx: Context, rows, concl) -> str:
    """One critical batch size, with its interval and the evidence."""
    crit, noise, span = concl["critical"], concl["noise_at_target"], concl["noise_at_target_range"]
    used = _sizes(crit["sizes"]) if crit["sizes"] else "none"
    if crit["status"] == "fitted":
        hi = "∞" if math.isinf(crit["hi"]) else f"{crit['hi']:,.0f}"
        fit = (f"Critical batch size <b>{crit['value']:,.0f}</b> (95 % bootstrap interval over seeds "
               f"{crit['lo']:,.0f} to {hi}): the fit S = S_min (1 + B_crit / B) (McCandlish et al. 2018) to the "
               f"steps to target of batch sizes {used} gives S_min = {crit['s_min']:,.0f} steps. Well below "
               f"B_crit, doubling the batch nearly halves the steps; well above it, the steps stay near S_min "
               f"and the extra samples are wasted.")
    elif crit["status"] == "above":
        fit = (f"Steps to target still halve with the batch size up to {max(crit['sizes'])}: the critical batch "
               f"size lies above the sweep (batch sizes used: {used}); add larger batch sizes to place it.")
    elif crit["status"] == "below":
        fit = (f"Larger batches never saved steps here: the critical batch size lies below {min(crit['sizes'])}, "
               f"the smallest batch size swept (used: {used}).")
    else:
        fit = (f"No critical batch size fitted: the fit needs three batch sizes that reached {_target(ctx)} in "
               f"every seed, and this sweep has {len(crit['sizes'])} ({used}).")
    if noise:
        fit += (f" The check from another measurement: the gradient noise scale B_simple where training reached "
                f"the target is {noise:,.0f} (median over batch sizes; {span[0]:,.0f} to {span[1]:,.0f}), the "
                f"figure theory expects B_crit to be near")
        if crit["status"] == "fitted" and crit["lo"] <= noise <= crit["hi"]:
            fit += ": it lies within the fit's interval, and the two agree."
        elif crit["status"] == "fitted" and crit["value"] > 0:
            ratio = max(noise, crit["value"]) / min(noise, crit["value"])
            fit += (f"; it differs from the fit by a factor of {ratio:,.1f}. B_simple stands for the noise scale only "
                    f"where the loss's curvature is alike in every direction (McCandlish et al. 2018, section 2.2) "
                    f"and is itself noisy at small batches; the fit is made from the outcome that matters (steps "
                    f"to the target), so the recommendation rests on it.")
        else:
            fit += "."
    return fit


# ------------------------------------------------------------------ the page

GLOSSARY = {
    "± (every figure)": "mean over the seeds and the half-width of its 95 % confidence interval (Student's t); "
                        "two batch sizes differ only where their intervals do not overlap; the plots cut an interval "
                        "at what the figure can be (0, and 1 for an accuracy)",
    "samples/s": "the batch size over the median optimizer step's seconds: the steady rate (validation, start-up "
                 "and checkpoints excluded); overall_throughput in runs.csv is all samples over all step time",
    "time / steps to target": "at the first validation point reaching the target; given only when every seed "
                              "reached it (reached: how many did)",
    "step memory": "what one training step holds for its batch (batch, saved activations, outputs)",
    "loss spread": "standard deviation of the per-step training loss over the last epoch, relative to its mean",
    "noise scale": "final B_simple = tr(Σ)/|G|², the gradient noise scale; near convergence the gradient "
                   "is small and its unbiased estimate |G|² can fall to zero or below, so a negative or huge "
                   "value (or interval) means the run ended where it is not measurable; the critical-batch-size "
                   "check uses its value where the target was reached (noise at target), not the final one",
}


def _columns(task: str) -> list[tuple[str, str]]:
    """The table's columns: the answer's figures first (a regression's fitted w and b beside its
    score, where the tutorial's example is checked), so that the page reads at 1,000 px."""
    if task == "classification":
        head = [("test_acc", "test accuracy")]
        tail = [("loss_noise", "loss spread"), ("noise_at_target", "noise scale at target")]
    else:
        head = [("test_mse", "test MSE"), ("weight", "fitted w"), ("bias", "fitted b")]
        tail = []  # the loss spread is in the claims and sweep.csv
    return head + [("throughput", "samples/s"), ("time_to_target_s", "seconds to target"),
                   ("steps_to_target", "steps to target"), ("step_memory_bytes", "step memory")] + tail


def _bullets(ctx: Context, concl: dict[str, Any], rows) -> list[str]:
    acc, top, missed = concl["most_accurate"], concl["highest_throughput"], concl["missed_target"]
    score = "test_acc" if "test_acc" in acc else "test_mse"
    by = {r["batch_size"]: r for r in rows}
    if len(rows) < 2:
        best = f"{score} {with_ci(by[acc['batch_size']], score)} — the only batch size in this sweep"
    elif acc["ties"]:
        tied = sorted([acc["batch_size"], *acc["ties"]])
        best = (f"tied between batch sizes <b>{_sizes(tied)}</b> (intervals overlap; best mean "
                f"{with_ci(by[acc['batch_size']], score)} at {acc['batch_size']})")
    else:
        best = (f"batch size <b>{acc['batch_size']}</b>, {with_ci(by[acc['batch_size']], score)} — its interval "
                f"separates it from every other batch size")
    fastest = concl["fastest_to_target"]
    if fastest is None:
        fast = f"Fastest to the target ({_target(ctx)}): <b>no batch size reached it in every seed</b>."
    else:
        tied = sorted([fastest["batch_size"], *fastest["ties"]])
        fast = (f"Fastest to the target ({_target(ctx)}): " + (
            f"tied between batch sizes {_sizes(tied)} (intervals overlap)" if fastest["ties"] else
            f"batch size {fastest['batch_size']}") + f", {with_ci(by[fastest['batch_size']], 'time_to_target_s')} s "
            f"at {fastest['batch_size']}.")
    return [
        f"Test score: {best}.",
        fast,
        (f"<span class=missed>Missed the target within {ctx.params.train.epochs} epochs in at least one seed: batch "
         f"size {_sizes(missed)}.</span>" if missed else "Every batch size reached the target in every seed."),
        f"Samples per second (steady steps): highest at batch size {top['batch_size']}, "
        f"{with_ci(by[top['batch_size']], 'throughput')}" + (f" (tied with {_sizes(top['ties'])})" if top["ties"] else "")
        + ".",
    ]


def _lr_section(ctx: Context, concl) -> str:
    choice = concl.get("lr_choice")
    if not choice:
        return (f"<p>Every batch size trained at lr {ctx.params.train.lr:g}. A rate tuned for one batch size "
                f"favours it: set <code>train.lr_grid</code> (e.g. <code>dvc exp run -S "
                f"'train.lr_grid=[0.0005,0.001,0.002]'</code>) to judge each at its own best rate.</p>")
    metric = next(iter(choice.values()))["metric"].replace("final_", "final ")
    head = "<th>batch size</th>" + "".join(f"<th>lr {x['lr']:g}</th>" for x in next(iter(choice.values()))["by_lr"]) \
        + "<th>chosen</th>"
    body = []
    for bs, c in choice.items():
        cells = "".join(
            f"<td{' class=chosen' if x['lr'] == c['lr'] else ''}>"
            f"{with_ci({'v': x['val'], 'v_ci': x['val_ci']}, 'v')} ({x['reached']}/{x['n']})</td>" for x in c["by_lr"])
        body.append(f"<tr><td>{bs}</td>{cells}<td>{c['lr']:g}</td></tr>")
    edges = grid_edges(ctx, concl)
    warn = "".join(f"<p class=missed>The best rate of batch size {_sizes(sizes)} is the grid's {side} "
                   f"({rate:g}): a {side} rate may be better still; widen train.lr_grid before trusting the "
                   f"comparison there.</p>" for side, (rate, sizes) in edges.items())
    return (f"<p>Each batch size at its own best learning rate, chosen on the validation split ({metric}, mean "
            f"over seeds; in brackets: seeds that reached the target). The test split only judges the choice.</p>"
            f"<div class=table-wrap><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
            + warn)


def grid_edges(ctx: Context, concl) -> dict[str, tuple[float, list[int]]]:
    """Batch sizes whose chosen rate is the grid's lowest or highest: the optimum may lie outside."""
    choice, grid = concl.get("lr_choice"), ctx.params.train.lr_grid
    if not choice or len(grid) < 2:
        return {}
    out = {}
    for side, rate in (("lowest", min(grid)), ("highest", max(grid))):
        sizes = [bs for bs, c in choice.items() if c["lr"] == rate]
        if sizes:
            out[side] = (rate, sizes)
    return out


def html(ctx: Context, rows, runs, concl, images: list[tuple[Path, str]], manifest, key: str = "",
         parent_url: str | None = None) -> str:
    p, task = ctx.params, manifest["task"]
    tags = ctx.run_tags()
    commit = tags.get("batchlab.code_commit", "none")[:12] + (" with uncommitted changes"
                                                             if tags.get("batchlab.git_dirty") == "true" else "")
    where = (f'MLflow: <a href="{html_lib.escape(parent_url)}">the parent run sweep-{key[:8]}</a>' if parent_url
             else f"MLflow: the parent run sweep-{key[:8]} (the store did not answer; "
                  f"<code>python -m pipeline ui-url</code> prints its view)")
    ident = f"Sweep key {key[:16]}, code commit {html_lib.escape(commit)}; {where}."
    lr = (f"lr per batch size from the grid {', '.join(f'{x:g}' for x in p.train.lr_grid)}" if p.train.lr_grid
          else f"lr {p.train.lr:g}")
    setup = (f"Data hash {manifest['data_hash'][:12]}, {manifest['splits']['train']['n']:,} training samples; "
             f"{p.train.epochs} epochs, {lr} (scaling: {p.train.lr_scaling}, base batch "
             f"{p.train.base_batch_size}, warm-up {p.train.warmup_epochs:g} epochs); "
             f"{'shuffled' if p.train.shuffle else 'not shuffled (control)'}; seeds "
             f"{', '.join(map(str, p.train.seeds))} ({len(runs)} runs shown"
             + (f", of {len(runs) * len(p.train.lr_grid)} trained" if p.train.lr_grid else "") + ").")
    cols = _columns(task)
    head = "<th>batch size</th>" + ("<th>lr</th>" if p.train.lr_grid else "") + "<th>reached</th>" \
        + "".join(f"<th>{html_lib.escape(label)}</th>" for _, label in cols)
    body = "\n".join(f"<tr><td>{r['batch_size']}</td>" + (f"<td>{r['lr']:g}</td>" if p.train.lr_grid else "")
                     + f"<td>{r['reached']}/{r['n']}</td>"
                     + "".join(f"<td>{with_ci(r, key)}</td>" for key, _ in cols) + "</tr>" for r in rows)
    checked = "\n".join(f"<tr><td>{html_lib.escape(c['claim'])}<div class=rule>rule: {html_lib.escape(c['rule'])}"
                        f"</div></td><td>{html_lib.escape(c['numbers'])}</td>"
                        f"<td class=verdict>{html_lib.escape(c['verdict'])}</td></tr>" for c in claims(ctx, rows, task))
    figures = "\n".join(
        f'<figure><img alt="{img.stem.replace("_", " ")}" src="data:image/png;base64,'
        f'{base64.b64encode(img.read_bytes()).decode()}"><figcaption>{html_lib.escape(caption)}</figcaption></figure>'
        for img, caption in images)
    return Template(TEMPLATE.read_text()).substitute(
        title=html_lib.escape(f"{p.data.name} / {p.model.label} / {p.train.optimizer}"), setup=html_lib.escape(setup),
        ident=ident,
        recommendation=recommendation_text(ctx, concl, task, markup=True),
        conclusions="\n".join(f"<li>{b}</li>" for b in _bullets(ctx, concl, rows)),
        claims=checked, critical=critical_story(ctx, rows, concl), learning_rates=_lr_section(ctx, concl),
        table_head=head, table_body=body,
        glossary="\n".join(f"<dt>{html_lib.escape(k)}</dt><dd>{html_lib.escape(v)}</dd>" for k, v in GLOSSARY.items()),
        figures=figures)
