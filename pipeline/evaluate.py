"""evaluate: test-set figures for every run of one batch size, logged into each training's run.

Two helper processes start first and work on the other core while this process imports torch and
predicts: a tracker worker (importing MLflow and opening the store, about 2 s here) and a scorer
(``pipeline.scorer``: scikit-learn's metrics and matplotlib's figure per seed, about 1 s of
imports). torch is therefore imported inside the functions below, not at the top.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import DataError
from .context import Context, read_json, write_json
from .scorer import Scorer
from .tracker_worker import TrackerWorker


def predict(model, x, batch_size: int):
    """Model outputs for ``x`` in chunks of ``batch_size``; the result does not depend on it."""
    import torch
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]) \
            if len(x) else torch.empty(0)


def load_trained(ctx: Context, batch_size: int, seed: int, n_in: int, n_out: int):
    import torch
    from .models import build_model
    path = ctx.train_dir(batch_size, seed) / "model.pt"
    if not path.is_file():
        raise DataError(f"{path} not found: train batch size {batch_size} first (dvc repro train@{batch_size})")
    model = build_model(ctx.params.model, n_in, n_out)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model


def run(ctx: Context, batch_size: int) -> list[dict[str, Any]]:
    seeds = ctx.params.train.seeds
    runs = {seed: ctx.train_dir(batch_size, seed) / "run.json" for seed in seeds}  # absent: trained untracked
    worker = TrackerWorker(ctx, f"evaluate-bs{batch_size}") if any(p.is_file() for p in runs.values()) else None
    scorer = Scorer()
    try:
        from .data import load_prepared
        data = load_prepared(ctx.data_dir, ("test",))
        metrics = [run_one(ctx, data, batch_size, seed, scorer) for seed in seeds]
        results = []
        for m, (scores, files) in zip(metrics, scorer.results()):
            m |= scores
            folder = ctx.eval_dir(batch_size, m["seed"])
            write_json(folder / "metrics.json", m)
            results.append((m, files + [folder / "metrics.json"]))
        ctx.check_params_unchanged(f"evaluate@{batch_size}")  # the stage fails: dvc.lock records nothing
    except BaseException:
        scorer.abort()
        if worker is not None:
            worker.abort()
        raise
    if worker is not None:
        worker.send([op for metrics, files in results if runs[metrics["seed"]].is_file()
                     for op in _ops(read_json(runs[metrics["seed"]])["run_id"], metrics, files)])
    return [m for m, _ in results]


def run_one(ctx: Context, data, batch_size: int, seed: int, scorer: Scorer) -> dict[str, Any]:
    """The seed's test loss (and a linear model's weights); its scikit-learn figures and plot are
    handed to ``scorer``."""
    from .models import loss_fn
    model = load_trained(ctx, batch_size, seed, data.n_features, data.n_outputs)
    test = data.test
    out = predict(model, test.x, ctx.params.evaluate.batch_size)
    metrics: dict[str, Any] = {"batch_size": batch_size, "seed": seed,
                               "test_loss": float(loss_fn(data.task)(out, test.y))}
    folder = ctx.eval_dir(batch_size, seed)
    if data.task == "classification":
        scorer.submit(data.task, test.y.numpy(), out.argmax(1).numpy(), folder)
    else:
        scorer.submit(data.task, test.y.numpy().ravel(), out.numpy().ravel(), folder)
        metrics["weight"] = float(model.weight.detach().flatten()[0])
        metrics["bias"] = float(model.bias.detach()[0])
    return metrics


def _ops(run_id: str, metrics: dict[str, Any], files: list[Path]) -> list[list[Any]]:
    """Into the seed's (finished) training run, with the client: evaluating never changes its status."""
    named = {f"test/{k[5:]}" if k.startswith("test_") else f"model/{k}": v
             for k, v in metrics.items() if k not in ("batch_size", "seed")}
    return [["log_metrics", run_id, [named]], ["log_artifacts", run_id, [[str(f) for f in files], "evaluate"]]]
