"""compare: one table, plots and an HTML report across the sweep, logged to the parent run."""
from __future__ import annotations

import base64
import csv
import html
import math
import statistics
from pathlib import Path
from string import Template
from typing import Any

from .context import Context, read_json, write_atomic, write_json
from .data import DataError, read_manifest

TEMPLATE = Path(__file__).with_name("templates") / "report.html"


def _read_csv(path: Path) -> dict[str, list[float]]:
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
    """One row per batch size of the sweep. With ``sweep_key``, every training output must
    belong to that sweep: a report never mixes runs of two sweeps."""
    rows = []
    for bs in ctx.params.train.batch_sizes:
        summary = read_json(_need(ctx.train_dir(bs) / "summary.json", f"train@{bs}"))
        metrics = read_json(_need(ctx.eval_dir(bs) / "metrics.json", f"evaluate@{bs}"))
        info = ctx.train_dir(bs) / "run.json"
        if sweep_key and info.is_file() and read_json(info).get("sweep_key") != sweep_key:
            raise DataError(f"{ctx.train_dir(bs)} was trained for another sweep than params.yaml describes; "
                            f"rerun train@{bs} (dvc repro)")
        rows.append({**summary, **{k: v for k, v in metrics.items() if k != "batch_size"},
                     "batch_size": bs})
    return sorted(rows, key=lambda r: r["batch_size"])


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


def conclusions(rows: list[dict[str, Any]], task: str, margin: float) -> dict[str, Any]:
    reached = [r for r in rows if r.get("time_to_target_s") is not None]
    if task == "classification":
        best = max(rows, key=lambda r: r["test_acc"])
        accuracy = {"batch_size": best["batch_size"], "test_acc": best["test_acc"]}
    else:
        best = min(rows, key=lambda r: r["test_mse"])
        accuracy = {"batch_size": best["batch_size"], "test_mse": best["test_mse"]}
    fastest = min(reached, key=lambda r: r["time_to_target_s"]) if reached else None
    quickest = max(rows, key=lambda r: r["throughput"])
    noise = [r["noise_scale"] for r in rows if r.get("noise_scale") is not None and r["noise_scale"] > 0]
    return {
        "most_accurate": accuracy,
        "fastest_to_target": ({"batch_size": fastest["batch_size"], "seconds": fastest["time_to_target_s"]}
                              if fastest else None),
        "highest_throughput": {"batch_size": quickest["batch_size"], "samples_per_s": quickest["throughput"]},
        "critical_batch_size_noise": statistics.median(noise) if noise else None,
        "critical_batch_size_knee": scaling_knee(rows, margin)["knee"],
        "missed_target": [r["batch_size"] for r in rows if r.get("time_to_target_s") is None],
        "scaling_margin": margin,
    }


def summary_metrics(c: dict[str, Any]) -> dict[str, Any]:
    """The conclusions under short names: DVC's `exp show` prints them as columns."""
    acc = c["most_accurate"]
    score = "test_acc" if "test_acc" in acc else "test_mse"
    fastest = c["fastest_to_target"] or {}
    return {"best_bs": acc["batch_size"], f"best_{score}": acc[score],
            "fastest_bs": fastest.get("batch_size"), "fastest_s": fastest.get("seconds"),
            "top_speed_bs": c["highest_throughput"]["batch_size"],
            "top_speed": c["highest_throughput"]["samples_per_s"],
            "cbs_noise": c["critical_batch_size_noise"], "cbs_knee": c["critical_batch_size_knee"],
            "n_missed": len(c["missed_target"])}


def run(ctx: Context) -> dict[str, Any]:
    p = ctx.params
    manifest = read_manifest(ctx.data_dir)
    rows = collect(ctx, p.sweep_key(manifest["data_hash"]))
    task = manifest["task"]
    out = ctx.compare_dir
    columns = ["batch_size", "test_acc" if task == "classification" else "test_mse", "test_loss",
               "throughput", "train_seconds", "time_to_target_s", "steps_to_target",
               "samples_to_target", "peak_memory_bytes", "noise_scale", "lr_effective"]
    if task != "classification":
        columns += ["weight", "bias"]
    concl = conclusions(rows, task, p.compare.scaling_margin)
    ctx.check_params_unchanged("compare")
    images = make_plots(ctx, rows, task)
    lines = [",".join(columns)] + [",".join("" if r.get(c) is None else str(r[c]) for c in columns) for r in rows]
    write_atomic(out / "sweep.csv", "\n".join(lines) + "\n")
    write_json(out / "metrics.json", summary_metrics(concl))
    write_atomic(out / "report.html", report(ctx, rows, columns, concl, images, manifest))
    _log(ctx, manifest, concl, [out / "sweep.csv", out / "metrics.json", out / "report.html",
                                *[img for img, _ in images]])
    return {"rows": rows, "conclusions": concl}


# ------------------------------------------------------------------ plots

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=90)
    _pyplot().close(fig)
    tmp.replace(path)
    return path


def plot_loss_vs_samples(ctx: Context, rows, task) -> str:
    fig, ax = _pyplot().subplots(figsize=(7, 4.5))
    for r in rows:
        steps = _read_csv(ctx.train_dir(r["batch_size"]) / "steps.csv")
        ax.plot(steps["samples"], _smooth(steps["loss"]), label=f"bs={r['batch_size']}", lw=1)
    ax.set(xlabel="samples seen", ylabel="training loss (smoothed)", yscale="log",
           title="Training loss against samples seen")
    ax.legend()
    _save(fig, ctx.compare_dir / "loss_vs_samples.png")
    return ("Each batch size's training loss against samples seen (the same data budget on the x axis). "
            "Small batches take more, noisier steps per sample; a curve that falls later needs more data.")


def _per_batch_size(ctx, rows, name, key, ylabel, log_y=False) -> None:
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    pts = [(r["batch_size"], r[key]) for r in rows if r.get(key) is not None]
    if pts:
        ax.plot(*zip(*pts), "o-")
    ax.set(xscale="log", xlabel="batch size", ylabel=ylabel, title=ylabel + " vs batch size")
    if log_y:
        ax.set_yscale("log")
    ax.set_xticks([r["batch_size"] for r in rows], [str(r["batch_size"]) for r in rows])
    _save(fig, ctx.compare_dir / f"{name}.png")


def plot_accuracy(ctx, rows, task) -> str:
    if task == "classification":
        _per_batch_size(ctx, rows, "accuracy_vs_batch_size", "test_acc", "test accuracy")
        return "Test accuracy of each batch size's final model: higher is better."
    _per_batch_size(ctx, rows, "accuracy_vs_batch_size", "test_mse", "test MSE")
    return "Test mean squared error of each batch size's final model: lower is better."


def plot_throughput(ctx, rows, task) -> str:
    _per_batch_size(ctx, rows, "throughput_vs_batch_size", "throughput", "samples/s", log_y=True)
    return "Training samples per second of optimizer steps: the cost side. It flattens where the machine is saturated."


def plot_time_to_target(ctx, rows, task) -> str:
    t = ctx.params.train
    _per_batch_size(ctx, rows, "time_to_target_vs_batch_size", "time_to_target_s",
                    f"seconds to {t.target_metric} {t.target_value:g}")
    return ("Wall seconds of training until validation first reached the target; a batch size "
            "without a point never reached it.")


def plot_memory(ctx, rows, task) -> str:
    _per_batch_size(ctx, rows, "memory_vs_batch_size", "peak_memory_bytes", "peak memory (bytes)")
    return "Peak resident memory (CPU) or peak allocated memory (GPU) while training."


def plot_steps_to_target(ctx, rows, task) -> str:
    margin = ctx.params.compare.scaling_margin
    knee = scaling_knee(rows, margin)
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    pts = [(r["batch_size"], r["steps_to_target"]) for r in rows if r.get("steps_to_target")]
    if pts:
        ax.plot(*zip(*pts), "o-", label="measured")
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
    return ("Optimizer steps to the target against batch size. On the dashed line, doubling the batch "
            "halves the steps (perfect scaling); where the measured curve leaves it, bigger batches stop paying.")


def plot_noise_scale(ctx, rows, task) -> str:
    fig, ax = _pyplot().subplots(figsize=(7, 4))
    for r in rows:
        noise = _read_csv(ctx.train_dir(r["batch_size"]) / "noise.csv")
        if noise.get("samples"):
            ax.plot(noise["samples"], noise["b_simple"], label=f"bs={r['batch_size']}", lw=1)
    ax.set(xlabel="samples seen", ylabel="B_simple", yscale="log",
           title="Gradient noise scale (McCandlish et al. 2018)")
    if ax.lines:
        ax.legend()
    _save(fig, ctx.compare_dir / "noise_scale.png")
    return ("The gradient noise scale B_simple during training: batch sizes well below it use each "
            "sample efficiently; it usually grows as the loss falls.")


PLOTS = {"loss_vs_samples": plot_loss_vs_samples, "accuracy_vs_batch_size": plot_accuracy,
         "throughput_vs_batch_size": plot_throughput, "time_to_target_vs_batch_size": plot_time_to_target,
         "steps_to_target": plot_steps_to_target, "memory_vs_batch_size": plot_memory,
         "noise_scale": plot_noise_scale}


def make_plots(ctx: Context, rows, task) -> list[tuple[Path, str]]:
    """Every plot as (file, caption: what to look for)."""
    ctx.compare_dir.mkdir(parents=True, exist_ok=True)
    return [(ctx.compare_dir / f"{name}.png", plot(ctx, rows, task)) for name, plot in PLOTS.items()]


def _smooth(values: list[float], window: int = 0) -> list[float]:
    window = window or max(1, len(values) // 200)
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


# ------------------------------------------------------------------ report

def human(v: Any, key: str = "") -> str:
    """Numbers for people: 129,837 samples/s, 0.962, 3.1 s, 901 MB."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if key.endswith("_bytes"):
        return f"{v / 1e6:,.0f} MB"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.3g}" if abs(v) < 1 else f"{v:,.3g}" if abs(v) < 100 else f"{v:,.1f}"
    return html.escape(str(v))


GLOSSARY = {
    "throughput": "training samples per second of optimizer steps (validation excluded)",
    "time_to_target_s / steps_to_target / samples_to_target": "at the first validation point reaching the target",
    "peak_memory_bytes": "peak resident set (CPU) or peak allocated bytes (GPU) during training",
    "noise_scale": "final B_simple = tr(Σ)/|G|², the gradient noise scale",
}


def _bullets(ctx: Context, concl: dict[str, Any]) -> list[str]:
    t = ctx.params.train
    target = f"{t.target_metric} {'≥' if t.target_metric == 'val_acc' else '≤'} {t.target_value:g}"
    fastest, acc, top = concl["fastest_to_target"], concl["most_accurate"], concl["highest_throughput"]
    metric_name, metric_val = [(k, v) for k, v in acc.items() if k != "batch_size"][0]
    missed = concl["missed_target"]
    return [
        f"Fastest to the target ({target}): "
        + (f"batch size <b>{fastest['batch_size']}</b>, {human(fastest['seconds'])} s of training."
           if fastest else "<b>no batch size reached it</b> in the epochs given."),
        (f"<span class=missed>Missed the target within {t.epochs} epochs: batch size "
         f"{', '.join(str(b) for b in missed)}.</span>" if missed else "Every batch size reached the target."),
        f"Most accurate on the test split: batch size <b>{acc['batch_size']}</b> ({metric_name} {human(metric_val)}).",
        f"Highest throughput: batch size <b>{top['batch_size']}</b>, {human(top['samples_per_s'])} samples/s.",
        "Critical batch size from the gradient noise scale B_simple (median of the runs' final estimates): "
        + (f"<b>{human(concl['critical_batch_size_noise'])}</b>." if concl['critical_batch_size_noise'] else "not measured."),
        f"Steps-to-target leaves perfect scaling by more than {ctx.params.compare.scaling_margin:.0%} at batch size: "
        + (f"<b>{concl['critical_batch_size_knee']}</b>." if concl['critical_batch_size_knee'] else
           "none in this sweep (or too few runs reached the target)."),
    ]


def report(ctx: Context, rows, columns, concl, images: list[tuple[Path, str]], manifest) -> str:
    p = ctx.params
    setup = (f"Data hash {manifest['data_hash'][:12]}, {manifest['splits']['train']['n']:,} training samples; "
             f"{p.train.epochs} epochs, lr {p.train.lr:g} (scaling: {p.train.lr_scaling}, base batch "
             f"{p.train.base_batch_size}, warm-up {p.train.warmup_epochs:g} epochs), seed {p.train.seed}.")
    body = "\n".join("<tr>" + "".join(f"<td>{human(r.get(c), c)}</td>" for c in columns) + "</tr>" for r in rows)
    figures = "\n".join(
        f'<figure><img alt="{img.stem.replace("_", " ")}" src="data:image/png;base64,'
        f'{base64.b64encode(img.read_bytes()).decode()}"><figcaption>{html.escape(caption)}</figcaption></figure>'
        for img, caption in images)
    return Template(TEMPLATE.read_text()).substitute(
        title=html.escape(f"{p.data.name} / {p.model.name} / {p.train.optimizer}"), setup=html.escape(setup),
        conclusions="\n".join(f"<li>{b}</li>" for b in _bullets(ctx, concl)),
        table_head="".join(f"<th>{html.escape(c.replace('_', ' '))}</th>" for c in columns), table_body=body,
        glossary="\n".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in GLOSSARY.items()),
        figures=figures)


def _log(ctx: Context, manifest, concl, files: list[Path]) -> None:
    tracker = ctx.tracker("compare")
    parent = tracker.sweep_parent(manifest)
    metrics = {f"sweep/{k}": v for k, v in summary_metrics(concl).items() if v is not None}
    tracker.log_metrics(parent, metrics)
    tracker.set_tags(parent, {"batchlab.compare.scaling_margin": ctx.params.compare.scaling_margin,
                              "batchlab.batch_sizes": ctx.params.train.batch_sizes})
    tracker.log_artifacts(parent, files, "compare")
