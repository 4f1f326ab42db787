"""compare: one table, plots and an HTML report across the sweep, shown on the parent run."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..analysis import claims, plots, report
from ..analysis.stats import FIGURES, aggregate, choose_lr, conclusions, dvc_metrics, read_csv, summary_metrics
from ..config import DataError
from ..context import OUT_DIR, Context, read_json, read_manifest, write_atomic, write_json


def _need(path: Path, stage: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path} not found: run {stage} first (dvc repro)")
    return path


def collect(ctx: Context, sweep_key: str | None = None) -> list[dict[str, Any]]:
    """One row per run (batch size, learning rate, seed) of the sweep. With ``sweep_key``, every
    training output must belong to that sweep: a report never mixes runs of two sweeps."""
    runs = []
    for bs in ctx.params.train.batch_sizes:
        for lr, seed in ctx.params.train.trials():
            folder = ctx.train_dir(bs, seed, lr)
            summary = read_json(_need(folder / "summary.json", f"train@{bs}"))
            metrics = read_json(_need(ctx.eval_dir(bs, seed, lr) / "metrics.json", f"evaluate@{bs}"))
            info = folder / "run.json"
            if sweep_key and info.is_file() and read_json(info).get("sweep_key") != sweep_key:
                raise DataError(f"{folder} was trained for another sweep than params.yaml "
                                f"describes; rerun train@{bs} (dvc repro)")
            runs.append({**summary, **{k: v for k, v in metrics.items() if k not in ("batch_size", "seed", "lr")},
                         "batch_size": bs, "seed": seed, "lr": summary.get("lr", ctx.params.train.lr)})
    return runs


def searches(ctx: Context) -> dict[int, dict[str, Any]]:
    """Each batch size's learning-rate search (``lr_search.json``), where its rate was searched."""
    if not ctx.params.train.searches():
        return {}
    return {bs: read_json(_need(ctx.train_dir(bs) / "lr_search.json", f"train@{bs}"))
            for bs in ctx.params.train.batch_sizes}


def outcomes(ctx: Context, runs: list[dict[str, Any]]) -> dict[int, dict[int, Any]]:
    """{batch size: {seed: each test example's outcome}} of the chosen runs."""
    import numpy as np
    out: dict[int, dict[int, Any]] = {}
    for r in runs:
        path = ctx.eval_dir(r["batch_size"], r["seed"], r["lr"]) / "per_example.csv"
        if path.is_file():
            cols = read_csv(path)
            out.setdefault(r["batch_size"], {})[r["seed"]] = np.array(next(iter(cols.values())), dtype=float)
    return out


RUN_COLUMNS = ("batch_size", "lr", "seed", "final_val_acc", "final_val_loss", "test_acc", "test_mse", "test_loss",
               "throughput", "train_seconds", "steps_to_target", "time_to_target_s", "wall_to_target_s", "stall_share",
               "censored", "budget_steps", "step_memory_bytes", "peak_memory_bytes", "noise_scale", "loss_noise",
               "weight", "bias")


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = [",".join(columns)] + [",".join("" if r.get(c) is None else str(r[c]) for c in columns) for r in rows]
    return "\n".join(lines) + "\n"


def prune_stale(ctx: Context) -> list[Path]:
    """Remove the batch-size folders of outputs/train and outputs/evaluate that no stage of this
    sweep makes: left by a sweep of another list, they would enter this stage's deps (the whole
    folders; DVC's templating cannot list one dep per batch size) and dvc.lock. They are outputs
    of stages no longer in the pipeline, kept in DVC's cache; DVC hashes the deps after the stage
    ran, so dvc.lock records the folders as the sweep made them."""
    import re
    import shutil
    keep = {f"bs{bs}" for bs in ctx.params.train.batch_sizes}
    gone = []
    for stage in ("train", "evaluate"):
        folder = ctx.workdir / OUT_DIR / stage
        for sub in sorted(folder.iterdir()) if folder.is_dir() else []:
            if sub.is_dir() and re.fullmatch(r"bs\d+", sub.name) and sub.name not in keep:
                shutil.rmtree(sub)
                gone.append(sub)
    return gone


def critical_csv(concl: dict[str, Any]) -> str:
    """The critical batch size at every target: the curve, with its fit and interval."""
    cols = ["target", "status", "b_crit", "lo", "hi", "s_min", "e_min", "b_crit_20pct", "b_simple", "sizes", "why"]
    rows = []
    for key, c in concl["critical_by_target"].items():
        fitted = c["status"] == "fitted"
        rows.append({"target": key, "status": c["status"], "b_crit": c["value"] if fitted else None,
                     "lo": c["lo"] if fitted else None, "hi": c["hi"] if fitted else None,
                     "s_min": c["s_min"] if fitted else None, "e_min": c["e_min"] if fitted else None,
                     "b_crit_20pct": c["model_free"] if c["model_free"] is not None and c["model_free"] != float("inf") else None,
                     "b_simple": concl["noise"][key]["median"], "sizes": " ".join(map(str, c["sizes"])),
                     "why": (c.get("why") or "").replace(",", ";")})
    return _csv(rows, cols)


def run(ctx: Context) -> dict[str, Any]:
    p = ctx.params
    prune_stale(ctx)
    manifest = read_manifest(ctx.data_dir)
    key = p.sweep_key(manifest["data_hash"])
    every = collect(ctx, key)
    task = manifest["task"]
    # Each batch size at its own best learning rate (validation only): a grid's choice here, a
    # search's in the train stage; without either, its one rate.
    targets = [f"{v:g}" for v in p.train.targets()]
    chosen = choose_lr(every, targets[-1])
    runs = [r for r in every if r["lr"] == chosen[r["batch_size"]]["lr"]]
    rows = aggregate(runs)
    out = ctx.compare_dir
    concl = conclusions(rows, runs, task, n_train=manifest["splits"]["train"]["n"],
                        budget_bytes=p.compare.memory_mb * 2**20, targets=targets,
                        lr_choice=chosen if p.train.lr_grid else None, searches=searches(ctx), outcomes=outcomes(ctx, runs))
    ctx.check_params_unchanged("compare")
    images = plots.make_plots(ctx, rows, runs, task, concl)
    present = [k for k in FIGURES if any(k in r for r in rows)]
    write_atomic(out / "critical.csv", critical_csv(concl))
    write_atomic(out / "sweep.csv", _csv(rows, ["batch_size", "lr", "n", "reached"] +
                                         [c for k in present for c in (k, f"{k}_ci")]))
    write_atomic(out / "runs.csv", _csv(every, [c for c in RUN_COLUMNS if any(c in r for r in every)]))
    write_json(out / "metrics.json", dvc_metrics(concl))
    from ..tracking.sweep import open_view, parent_link, publish_comparison
    view = open_view(ctx)  # one client for the report's link and the publishing after it
    write_atomic(out / "report.html", report.html(ctx, rows, runs, concl, images, manifest,
                                                  key=key, parent_url=parent_link(view, ctx, manifest)))
    files = ["sweep.csv", "runs.csv", "critical.csv", "metrics.json", "report.html", *[img.name for img, _ in images]]
    # What the sweep's parent run shows, as a record of its own (pipeline.tracking publishes it).
    write_json(out / "summary.json", {
        "sweep_key": key, "metrics": summary_metrics(concl), "rows": rows, "figures": list(FIGURES), "files": files,
        "tags": {"batchlab.recommendation": claims.recommendation_text(ctx, concl, task),
                 "batchlab.batch_sizes": list(p.train.batch_sizes), "batchlab.seeds": list(p.train.seeds)}})
    publish_comparison(ctx, view)
    return {"rows": rows, "runs": runs, "conclusions": concl}
