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

from .stats import read_csv, scaling_knee, separated
from ..context import Context
from ..tracking.ui import sweep_colours

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


def plot_loss_vs_samples(ctx: Context, rows, runs, task) -> str:
    fig, ax = _pyplot().subplots(figsize=(7, 4.5))
    for r in rows:
        curves = [read_csv(ctx.train_dir(r["batch_size"], seed) / "steps.csv") for seed in r["seeds"]]
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


def plot_accuracy(ctx, rows, runs, task) -> str:
    if task == "classification":
        _per_batch_size(ctx, rows, "accuracy_vs_batch_size", "test_acc", "test accuracy", hi=1.0)
        return ("Test accuracy of each batch size's final models, mean and 95 % interval over the seeds: "
                "higher is better; overlapping bars are not a difference.")
    _per_batch_size(ctx, rows, "accuracy_vs_batch_size", "test_mse", "test MSE")
    return "Test mean squared error of each batch size's final models (mean, 95 % interval): lower is better."


def plot_throughput(ctx, rows, runs, task) -> str:
    _per_batch_size(ctx, rows, "throughput_vs_batch_size", "throughput", "samples/s", log_y=True)
    return ("Training samples per second of optimizer steps: the cost side. It flattens where the machine is "
            "saturated.")


def plot_time_to_target(ctx, rows, runs, task) -> str:
    t = ctx.params.train
    _per_batch_size(ctx, rows, "time_to_target_vs_batch_size", "time_to_target_s",
                    f"seconds to {t.target_metric} {t.target_value:g}")
    return ("Wall seconds of training until validation first reached the target (every seed); a batch size "
            "without a point missed it in at least one seed.")


def plot_memory(ctx, rows, runs, task) -> str:
    _per_batch_size(ctx, rows, "memory_vs_batch_size", "step_memory_bytes", "bytes a step holds", log_y=True)
    return ("What one training step holds for its batch: the batch, the activations kept for the backward "
            "pass and the outputs (on a GPU: peak allocated bytes above the step's start). It grows with the "
            "batch size; the rest of the process (libraries, data, model) does not.")


def plot_steps_to_target(ctx, rows, runs, task) -> str:
    margin = ctx.params.compare.scaling_margin
    knee = scaling_knee(rows, margin)
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    pts = [(r["batch_size"], r["steps_to_target"]) for r in rows if r.get("steps_to_target")]
    if pts:
        ax.plot(*zip(*pts), "o-", label="measured (mean over seeds)")
        ideal = sorted(knee["ideal"].items())
        ax.plot(*zip(*ideal), "k--", label="perfect scaling")
        ax.plot([b for b, _ in ideal], [(1 + margin) * s for _, s in ideal], "k:", lw=0.8,
                label=f"perfect x {1 + margin:g}")
        if knee["knee"]:
            ax.axvline(knee["knee"], color="r", lw=0.8, label=f"leaves at bs={knee['knee']}")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no batch size reached the target", ha="center", transform=ax.transAxes)
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="optimizer steps to target",
           title="Steps to target (Shallue et al. 2018)")
    _save(fig, ctx.compare_dir / "steps_to_target.png")
    return ("Optimizer steps to the target against batch size. On the dashed line, doubling the batch halves "
            "the steps (perfect scaling); where the measured curve leaves it, bigger batches stop paying.")


def plot_noise_scale(ctx, rows, runs, task) -> str:
    fig, ax = _pyplot().subplots(figsize=(7, 4))
    for r in rows:
        noise = read_csv(ctx.train_dir(r["batch_size"], r["seeds"][0]) / "noise.csv")
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
         "steps_to_target": plot_steps_to_target, "memory_vs_batch_size": plot_memory,
         "noise_scale": plot_noise_scale}


def make_plots(ctx: Context, rows, runs, task) -> list[tuple[Path, str]]:
    """Every plot as (file, caption: what to look for)."""
    ctx.compare_dir.mkdir(parents=True, exist_ok=True)
    return [(ctx.compare_dir / f"{name}.png", plot(ctx, rows, runs, task)) for name, plot in PLOTS.items()]


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

def _direction(rows, key: str) -> tuple[str, str]:
    """Does ``key`` rise with the batch size? ('rises' / 'falls' / 'mixed', how sure)."""
    pts = [r for r in rows if r.get(key) is not None]
    if len(pts) < 2:
        return "unknown", "too few batch sizes"
    steps = [(a, b) for a, b in zip(pts, pts[1:])]
    up = all(b[key] > a[key] for a, b in steps)
    down = all(b[key] < a[key] for a, b in steps)
    clear = separated(pts[0], pts[-1], key)
    return ("rises" if up else "falls" if down else "mixed"), ("intervals separate" if clear else "intervals overlap")


FASTER = "Batching is faster: a larger batch size generally leads to faster training."
MEMORY = "Bigger batches cost memory."
UNSTABLE = ("Too small is unstable: a smaller batch size might lead to less stable training and "
            "slower convergence.")
SHUFFLE = {
    "claim": "Shuffling matters: shuffled batches keep the model from learning the data's order.",
    "numbers": "every run here shuffles (a seeded permutation per epoch); the sweep has no shuffle-off "
               "control to compare with",
    "verdict": "inconclusive (not measured)"}


def claims(ctx: Context, rows, task) -> list[dict[str, str]]:
    """The tutorial's claims, each with the sweep's numbers and a verdict. Each compares batch
    sizes, so a sweep of one batch size measures none of them."""
    if len(rows) < 2:
        alone = (f"this sweep has one batch size ({rows[0]['batch_size']}): nothing to compare it with; "
                 "list two or more in train.batch_sizes")
        return [{"claim": c, "numbers": alone, "verdict": "not measured (one batch size)"}
                for c in (FASTER, MEMORY, UNSTABLE)] + [dict(SHUFFLE)]
    first, last = rows[0], rows[-1]
    out = []
    direction, sure = _direction(rows, "throughput")
    ratio = last["throughput"] / first["throughput"] if first.get("throughput") else math.nan
    out.append({
        "claim": FASTER,
        "numbers": f"throughput {human(first['throughput'])} samples/s at batch size {first['batch_size']}, "
                   f"{human(last['throughput'])} at {last['batch_size']} ({ratio:,.1f}x); "
                   + _to_target_words(rows),
        "verdict": "holds" if direction == "rises" and sure == "intervals separate" else
                   "inconclusive" if direction != "falls" else "does not hold here"})
    direction, sure = _direction(rows, "step_memory_bytes")
    out.append({
        "claim": MEMORY,
        "numbers": f"a step holds {human(first.get('step_memory_bytes'), 'step_memory_bytes')} at batch size "
                   f"{first['batch_size']}, {human(last.get('step_memory_bytes'), 'step_memory_bytes')} at "
                   f"{last['batch_size']} ({human(first.get('bytes_per_sample'))} bytes per sample)",
        "verdict": "holds" if direction == "rises" else "inconclusive" if direction == "mixed" else "does not hold here"})
    out.append(_stability_claim(rows, task))
    out.append(dict(SHUFFLE))
    return out


def _to_target_words(rows) -> str:
    reached = [r for r in rows if r.get("time_to_target_s") is not None]
    if not reached:
        return "no batch size reached the target in every seed"
    best = min(reached, key=lambda r: r["time_to_target_s"])
    missed = [str(r["batch_size"]) for r in rows if r.get("time_to_target_s") is None]
    return (f"fastest to the target: batch size {best['batch_size']} ({with_ci(best, 'time_to_target_s')} s)"
            + (f"; missed by batch size {', '.join(missed)}" if missed else ""))


def _to_target(row) -> str:
    if row.get("time_to_target_s") is not None:
        return with_ci(row, "time_to_target_s")
    return f"target reached in {row.get('reached', 0)}/{row.get('n', '?')} seeds"


def _stability_claim(rows, task) -> dict[str, str]:
    first, last = rows[0], rows[-1]
    score = "test_acc" if task == "classification" else "test_mse"
    noisier = first.get("loss_noise", 0) > last.get("loss_noise", 0) and separated(first, last, "loss_noise")
    wider = first.get(f"{score}_ci", math.nan) > last.get(f"{score}_ci", math.nan)
    slower = (first.get("samples_to_target") is None) or (
        last.get("samples_to_target") is not None and first["time_to_target_s"] > last["time_to_target_s"])
    numbers = (f"per-step loss spread (last epoch, relative) {with_ci(first, 'loss_noise')} at batch size "
               f"{first['batch_size']} vs {with_ci(last, 'loss_noise')} at {last['batch_size']}; "
               f"{score} {with_ci(first, score)} vs {with_ci(last, score)}; seconds to target "
               f"{_to_target(first)} vs {_to_target(last)}")
    verdict = ("holds" if noisier and slower else "partly: noisier, not slower to converge" if noisier
               else "does not hold here" if not wider else "inconclusive")
    return {"claim": UNSTABLE, "numbers": numbers, "verdict": verdict}


def critical_story(ctx: Context, rows, concl) -> str:
    """Both critical-batch-size estimates, how each is made, and why they differ."""
    knee, noise, span = concl["critical_batch_size_knee"], concl["critical_batch_size_noise"], concl["noise_range"]
    sizes = [r["batch_size"] for r in rows]
    knee_text = (f"Steps to target leave perfect scaling at batch size <b>{knee}</b>: the knee lies between "
                 f"{max([b for b in sizes if b < knee], default=knee)} and {knee} — the sweep's grid cannot place it closer."
                 if knee else "Steps to target never leave perfect scaling by the margin in this sweep (or too few "
                              "batch sizes reached the target): the knee is not located.")
    noise_text = (f"The gradient noise scale B_simple = tr(Σ)/|G|², measured during training from half-batch "
                  f"gradients, ends at <b>{human(noise)}</b> (median over batch sizes; range {human(span[0])} to "
                  f"{human(span[1])})." if noise else "The gradient noise scale was not measured.")
    return (f"{knee_text} {noise_text} The two differ by design: B_simple predicts the batch size where "
            f"steps stop halving <i>at the point of training it was measured</i>, and it grows as the loss "
            f"falls (see the noise-scale plot), so its final value is an upper end; the knee is measured on the "
            f"whole run to the target, and only at the batch sizes swept. Read them as a range: a critical batch "
            f"size between {human(min(filter(None, [knee, noise]), default=None))} and "
            f"{human(max(filter(None, [knee, noise]), default=None))}.")


# ------------------------------------------------------------------ the page

GLOSSARY = {
    "± (every figure)": "mean over the seeds and the half-width of its 95 % confidence interval (Student's t); "
                        "two batch sizes differ only where their intervals do not overlap; the plots cut an interval "
                        "at what the figure can be (0, and 1 for an accuracy)",
    "throughput": "training samples per second of optimizer steps (validation excluded)",
    "time / steps to target": "at the first validation point reaching the target; given only when every seed "
                              "reached it (reached: how many did)",
    "step memory": "what one training step holds for its batch (batch, saved activations, outputs)",
    "loss spread": "standard deviation of the per-step training loss over the last epoch, relative to its mean",
    "noise scale": "final B_simple = tr(Σ)/|G|², the gradient noise scale; near convergence the gradient "
                   "is small and its unbiased estimate |G|² can fall to zero or below, so a negative or huge "
                   "value (or interval) means the run ended where it is not measurable; the critical batch "
                   "size above uses the batch sizes whose value is positive",
}


def _columns(task: str) -> list[tuple[str, str]]:
    score = ("test_acc", "test accuracy") if task == "classification" else ("test_mse", "test MSE")
    cols = [score, ("throughput", "samples/s"), ("time_to_target_s", "seconds to target"),
            ("steps_to_target", "steps to target"), ("step_memory_bytes", "step memory"),
            ("loss_noise", "loss spread"), ("noise_scale", "noise scale")]
    return cols + ([("weight", "fitted w"), ("bias", "fitted b")] if task != "classification" else [])


def _bullets(ctx: Context, concl: dict[str, Any], n_sizes: int) -> list[str]:
    t = ctx.params.train
    target = f"{t.target_metric} {'≥' if t.target_metric == 'val_acc' else '≤'} {t.target_value:g}"
    fastest, acc, top = concl["fastest_to_target"], concl["most_accurate"], concl["highest_throughput"]
    score = "test_acc" if "test_acc" in acc else "test_mse"
    missed = concl["missed_target"]

    def tie(w):
        if n_sizes < 2:
            return " — the only batch size in this sweep"
        return (f" — not distinguishable from batch size {', '.join(map(str, w['ties']))} (intervals overlap)"
                if w["ties"] else " — its interval separates it from every other batch size")
    return [
        f"Fastest to the target ({target}): " + (
            f"batch size <b>{fastest['batch_size']}</b>, {human(fastest['time_to_target_s'])} s of training{tie(fastest)}."
            if fastest else "<b>no batch size reached it in every seed</b> within the epochs given."),
        (f"<span class=missed>Missed the target within {t.epochs} epochs in at least one seed: batch size "
         f"{', '.join(str(b) for b in missed)}.</span>" if missed else "Every batch size reached the target in every seed."),
        f"Most accurate on the test split: batch size <b>{acc['batch_size']}</b> "
        f"({score} {human(acc[score])}){tie(acc)}.",
        f"Highest throughput: batch size <b>{top['batch_size']}</b>, {human(top['samples_per_s'])} samples/s.",
    ]


def html(ctx: Context, rows, runs, concl, images: list[tuple[Path, str]], manifest) -> str:
    p, task = ctx.params, manifest["task"]
    setup = (f"Data hash {manifest['data_hash'][:12]}, {manifest['splits']['train']['n']:,} training samples; "
             f"{p.train.epochs} epochs, lr {p.train.lr:g} (scaling: {p.train.lr_scaling}, base batch "
             f"{p.train.base_batch_size}, warm-up {p.train.warmup_epochs:g} epochs); seeds "
             f"{', '.join(map(str, p.train.seeds))} ({len(runs)} runs).")
    cols = _columns(task)
    head = "<th>batch size</th><th>reached</th>" + "".join(f"<th>{html_lib.escape(label)}</th>" for _, label in cols)
    body = "\n".join(f"<tr><td>{r['batch_size']}</td><td>{r['reached']}/{r['n']}</td>"
                     + "".join(f"<td>{with_ci(r, key)}</td>" for key, _ in cols) + "</tr>" for r in rows)
    checked = "\n".join(f"<tr><td>{html_lib.escape(c['claim'])}</td><td>{html_lib.escape(c['numbers'])}</td>"
                        f"<td class=verdict>{html_lib.escape(c['verdict'])}</td></tr>" for c in claims(ctx, rows, task))
    figures = "\n".join(
        f'<figure><img alt="{img.stem.replace("_", " ")}" src="data:image/png;base64,'
        f'{base64.b64encode(img.read_bytes()).decode()}"><figcaption>{html_lib.escape(caption)}</figcaption></figure>'
        for img, caption in images)
    return Template(TEMPLATE.read_text()).substitute(
        title=html_lib.escape(f"{p.data.name} / {p.model.label} / {p.train.optimizer}"), setup=html_lib.escape(setup),
        conclusions="\n".join(f"<li>{b}</li>" for b in _bullets(ctx, concl, len(rows))),
        claims=checked, critical=critical_story(ctx, rows, concl),
        table_head=head, table_body=body,
        glossary="\n".join(f"<dt>{html_lib.escape(k)}</dt><dd>{html_lib.escape(v)}</dd>" for k, v in GLOSSARY.items()),
        figures=figures)
