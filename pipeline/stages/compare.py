"""compare: one table, plots and an HTML report across the sweep, shown on the parent run."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..analysis import report
from ..analysis.stats import FIGURES, aggregate, conclusions, dvc_metrics, summary_metrics
from ..config import DataError
from ..context import Context, read_json, read_manifest, write_atomic, write_json


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


RUN_COLUMNS = ("batch_size", "seed", "test_acc", "test_mse", "test_loss", "throughput", "train_seconds",
               "time_to_target_s", "steps_to_target", "step_memory_bytes", "peak_memory_bytes", "noise_scale",
               "loss_noise", "weight", "bias")


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = [",".join(columns)] + [",".join("" if r.get(c) is None else str(r[c]) for c in columns) for r in rows]
    return "\n".join(lines) + "\n"


def run(ctx: Context) -> dict[str, Any]:
    p = ctx.params
    manifest = read_manifest(ctx.data_dir)
    key = p.sweep_key(manifest["data_hash"])
    runs = collect(ctx, key)
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
    files = ["sweep.csv", "runs.csv", "metrics.json", "report.html", *[img.name for img, _ in images]]
    # What the sweep's parent run shows, as a record of its own (pipeline.tracking publishes it).
    write_json(out / "summary.json", {
        "sweep_key": key, "metrics": summary_metrics(concl), "rows": rows, "figures": list(FIGURES), "files": files,
        "tags": {"batchlab.compare.scaling_margin": p.compare.scaling_margin,
                 "batchlab.batch_sizes": list(p.train.batch_sizes), "batchlab.seeds": list(p.train.seeds)}})
    from ..tracking.sweep import publish_sweep
    publish_sweep(ctx)
    return {"rows": rows, "runs": runs, "conclusions": concl}
