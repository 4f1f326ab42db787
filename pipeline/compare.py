"""compare: one table, plots and an HTML report across the sweep, logged to the parent run."""
from __future__ import annotations

import base64
import csv
import html
import math
import statistics
from pathlib import Path
from typing import Any

from .context import Context, read_json, write_atomic, write_json
from .data import DataError, read_manifest

PLOTS = ("loss_vs_samples", "accuracy_vs_batch_size", "throughput_vs_batch_size",
         "time_to_target_vs_batch_size", "steps_to_target", "memory_vs_batch_size", "noise_scale")


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


def collect(ctx: Context) -> list[dict[str, Any]]:
    rows = []
    for bs in ctx.params.train.batch_sizes:
        summary = read_json(_need(ctx.train_dir(bs) / "summary.json", f"train@{bs}"))
        metrics = read_json(_need(ctx.eval_dir(bs) / "metrics.json", f"evaluate@{bs}"))
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
        "scaling_margin": margin,
    }


def run(ctx: Context) -> dict[str, Any]:
    p = ctx.params
    manifest = read_manifest(ctx.data_dir)
    rows = collect(ctx)
    task = manifest["task"]
    out = ctx.compare_dir
    columns = ["batch_size", "test_acc" if task == "classification" else "test_mse", "test_loss",
               "throughput", "train_seconds", "time_to_target_s", "steps_to_target",
               "samples_to_target", "peak_memory_bytes", "noise_scale", "lr_effective"]
    lines = [",".join(columns)]
    for r in rows:
        lines.append(",".join("" if r.get(c) is None else str(r[c]) for c in columns))
    write_atomic(out / "sweep.csv", "\n".join(lines) + "\n")
    concl = conclusions(rows, task, p.compare.scaling_margin)
    write_json(out / "metrics.json", _flat_conclusions(concl))
    images = _plots(ctx, rows, task, p.train.target_metric, p.train.target_value, p.compare.scaling_margin)
    report = _report(ctx, rows, columns, concl, images, manifest)
    write_atomic(out / "report.html", report)
    _log(ctx, manifest, concl, [out / "sweep.csv", out / "metrics.json", out / "report.html", *images])
    return {"rows": rows, "conclusions": concl}


def _flat_conclusions(c: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in c.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                flat[f"{k}.{kk}"] = vv
        else:
            flat[k] = v
    return flat


def _plots(ctx, rows, task, target_metric, target_value, margin) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = ctx.compare_dir
    bss = [r["batch_size"] for r in rows]
    made: list[Path] = []

    def save(fig, name):
        fig.tight_layout()
        tmp = out / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=90)
        plt.close(fig)
        tmp.replace(out / f"{name}.png")
        made.append(out / f"{name}.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for bs in bss:
        steps = _read_csv(ctx.train_dir(bs) / "steps.csv")
        ax.plot(steps["samples"], _smooth(steps["loss"]), label=f"bs={bs}", lw=1)
    ax.set(xlabel="samples seen", ylabel="training loss (smoothed)", yscale="log",
           title="Training loss against samples seen")
    ax.legend()
    save(fig, "loss_vs_samples")

    def per_bs(name, key, ylabel, log_y=False):
        fig, ax = plt.subplots(figsize=(6, 4))
        pts = [(r["batch_size"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), "o-")
        ax.set(xscale="log", xlabel="batch size", ylabel=ylabel, title=ylabel + " vs batch size")
        if log_y:
            ax.set_yscale("log")
        ax.set_xticks(bss, [str(b) for b in bss])
        save(fig, name)

    per_bs("accuracy_vs_batch_size", "test_acc" if task == "classification" else "test_mse",
           "test accuracy" if task == "classification" else "test MSE")
    per_bs("throughput_vs_batch_size", "throughput", "samples/s", log_y=True)
    per_bs("time_to_target_vs_batch_size", "time_to_target_s", f"seconds to {target_metric} {target_value:g}")
    per_bs("memory_vs_batch_size", "peak_memory_bytes", "peak memory (bytes)")

    knee = scaling_knee(rows, margin)
    fig, ax = plt.subplots(figsize=(6, 4))
    pts = [(r["batch_size"], r["steps_to_target"]) for r in rows if r.get("steps_to_target")]
    if pts:
        ax.plot(*zip(*pts), "o-", label="measured")
        ideal = sorted(knee["ideal"].items())
        ax.plot(*zip(*ideal), "k--", label="perfect scaling")
        ax.plot([b for b, _ in ideal], [(1 + margin) * s for _, s in ideal], "k:", lw=0.8,
                label=f"perfect x {1 + margin:g}")
        if knee["knee"]:
            ax.axvline(knee["knee"], color="r", lw=0.8, label=f"leaves at bs={knee['knee']}")
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="optimizer steps to target",
           title="Steps to target (Shallue et al. 2018)")
    if ax.lines:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no batch size reached the target", ha="center", transform=ax.transAxes)
    save(fig, "steps_to_target")

    fig, ax = plt.subplots(figsize=(7, 4))
    for bs in bss:
        noise = _read_csv(ctx.train_dir(bs) / "noise.csv")
        if noise.get("samples"):
            ax.plot(noise["samples"], noise["b_simple"], label=f"bs={bs}", lw=1)
    ax.set(xlabel="samples seen", ylabel="B_simple", yscale="log",
           title="Gradient noise scale (McCandlish et al. 2018)")
    if ax.lines:
        ax.legend()
    save(fig, "noise_scale")
    return made


def _smooth(values: list[float], window: int = 0) -> list[float]:
    window = window or max(1, len(values) // 200)
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "—"
        return f"{v:.4g}"
    return html.escape(str(v))


def _report(ctx, rows, columns, concl, images, manifest) -> str:
    p = ctx.params
    target = f"{p.train.target_metric} {'≥' if p.train.target_metric == 'val_acc' else '≤'} {p.train.target_value:g}"
    fastest = concl["fastest_to_target"]
    acc = concl["most_accurate"]
    metric_name, metric_val = [(k, v) for k, v in acc.items() if k != "batch_size"][0]
    bullets = [
        f"Fastest to the target ({target}): "
        + (f"batch size <b>{fastest['batch_size']}</b>, {fastest['seconds']:.3g} s of training."
           if fastest else "<b>no batch size reached it</b> in the epochs given."),
        f"Most accurate on the test split: batch size <b>{acc['batch_size']}</b> ({metric_name} {metric_val:.4g}).",
        f"Highest throughput: batch size <b>{concl['highest_throughput']['batch_size']}</b>, "
        f"{concl['highest_throughput']['samples_per_s']:.4g} samples/s.",
        "Critical batch size from the gradient noise scale B_simple (median of the runs' final estimates): "
        + (f"<b>{concl['critical_batch_size_noise']:.4g}</b>." if concl['critical_batch_size_noise'] else "not measured."),
        f"Steps-to-target leaves perfect scaling by more than {p.compare.scaling_margin:.0%} at batch size: "
        + (f"<b>{concl['critical_batch_size_knee']}</b>." if concl['critical_batch_size_knee'] else
           "none in this sweep (or too few runs reached the target)."),
    ]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    figs = "".join(
        f'<figure><img alt="{img.stem}" src="data:image/png;base64,'
        f'{base64.b64encode(img.read_bytes()).decode()}"><figcaption>{img.stem.replace("_", " ")}</figcaption></figure>'
        for img in images)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>batchlab sweep report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}figure{{display:inline-block;margin:8px}}
img{{max-width:520px}}</style></head><body>
<h1>Batch-size sweep: {html.escape(p.data.name)} / {html.escape(p.model.name)} / {html.escape(p.train.optimizer)}</h1>
<p>Data hash {manifest['data_hash'][:12]}, {manifest['splits']['train']['n']} training samples;
{p.train.epochs} epochs, lr {p.train.lr:g} (scaling: {p.train.lr_scaling}, base batch {p.train.base_batch_size},
warm-up {p.train.warmup_epochs:g} epochs), seed {p.train.seed}.</p>
<h2>Conclusions</h2><ul>{''.join(f'<li>{b}</li>' for b in bullets)}</ul>
<h2>The sweep</h2><table><tr>{head}</tr>{body}</table>
<p>throughput: training samples per second of optimizer steps (validation excluded);
time/steps/samples to target: first validation point reaching {target};
peak memory: peak resident set (CPU) or peak allocated bytes (GPU) during training;
noise_scale: final B_simple = tr(Σ)/|G|².</p>
<h2>Plots</h2>{figs}
</body></html>
"""


def _log(ctx: Context, manifest, concl, files: list[Path]) -> None:
    tracker = ctx.tracker()
    key = ctx.params.sweep_key(manifest["data_hash"])
    parent = tracker.sweep_parent(key, ctx.params.flat(), manifest, ctx.run_tags(), ctx.parent_run_id)
    metrics = {f"sweep/{k}": v for k, v in _flat_conclusions(concl).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tracker.log_metrics(parent, metrics)
    tracker.set_tags(parent, {"batchlab.compare.scaling_margin": ctx.params.compare.scaling_margin,
                              "batchlab.batch_sizes": ctx.params.train.batch_sizes})
    tracker.log_artifacts(parent, files, "compare")
