"""evaluate: test-set figures for every run of one batch size, logged into each training's run.

The MLflow side (its import and the store's opening, about 2 s here) runs in a tracker worker
started first, on the other core, while this process imports torch and scikit-learn and
evaluates; torch is therefore imported inside the functions below, not at the top.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .config import DataError
from .context import Context, read_json, write_atomic, write_json
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
    try:
        from .data import load_prepared
        data = load_prepared(ctx.data_dir, ("test",))
        results = [run_one(ctx, data, batch_size, seed) for seed in seeds]
        ctx.check_params_unchanged(f"evaluate@{batch_size}")  # the stage fails: dvc.lock records nothing
    except BaseException:
        if worker is not None:
            worker.abort()
        raise
    if worker is not None:
        worker.send([op for metrics, files in results if runs[metrics["seed"]].is_file()
                     for op in _ops(read_json(runs[metrics["seed"]])["run_id"], metrics, files)])
    return [m for m, _ in results]


def run_one(ctx: Context, data, batch_size: int, seed: int) -> tuple[dict[str, Any], list[Path]]:
    from .models import loss_fn
    model = load_trained(ctx, batch_size, seed, data.n_features, data.n_outputs)
    test = data.test
    out = predict(model, test.x, ctx.params.evaluate.batch_size)
    metrics: dict[str, Any] = {"batch_size": batch_size, "seed": seed,
                               "test_loss": float(loss_fn(data.task)(out, test.y))}
    folder = ctx.eval_dir(batch_size, seed)
    files: list[Path] = []
    if data.task == "classification":
        metrics |= _classification(test.y.numpy(), out.argmax(1).numpy(), folder, files)
    else:
        metrics |= _regression(test.y.numpy().ravel(), out.numpy().ravel(), folder, files)
        metrics["weight"] = float(model.weight.detach().flatten()[0])
        metrics["bias"] = float(model.bias.detach()[0])
    write_json(folder / "metrics.json", metrics)
    files.append(folder / "metrics.json")
    return metrics, files


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def _predictions(y: np.ndarray, pred: np.ndarray, folder: Path, files: list[Path]) -> None:
    rows = ["actual,predicted"] + [f"{a},{b}" for a, b in zip(y.tolist(), pred.tolist())]
    write_atomic(folder / "predictions.csv", "\n".join(rows) + "\n")
    files += [folder / "report.json", folder / "predictions.csv", folder / "evaluation.png"]


def _regression(y: np.ndarray, pred: np.ndarray, folder: Path, files: list[Path]) -> dict[str, Any]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    result = {"test_mse": float(mean_squared_error(y, pred)), "test_r2": float(r2_score(y, pred)),
              "test_mae": float(mean_absolute_error(y, pred))}
    write_json(folder / "report.json", result)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(y, pred, s=6)
    ax.set(xlabel="actual", ylabel="predicted", title="Predicted against actual (test)")
    _save_figure(fig, folder / "evaluation.png")
    _predictions(y, pred, folder, files)
    return result


def _classification(y: np.ndarray, pred: np.ndarray, folder: Path, files: list[Path]) -> dict[str, Any]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import (ConfusionMatrixDisplay, accuracy_score, classification_report,
                                 precision_recall_fscore_support)

    report = classification_report(y, pred, output_dict=True, zero_division=0)
    write_json(folder / "report.json", report)
    precision, recall, f1, _ = precision_recall_fscore_support(y, pred, average="macro", zero_division=0)
    fig, ax = plt.subplots(figsize=(6, 6))
    ConfusionMatrixDisplay.from_predictions(y, pred, ax=ax, colorbar=False)
    ax.set_title("Confusion matrix (test)")
    _save_figure(fig, folder / "evaluation.png")
    _predictions(y, pred, folder, files)
    return {"test_acc": float(accuracy_score(y, pred)), "test_precision_macro": float(precision),
            "test_recall_macro": float(recall), "test_f1_macro": float(f1)}


def _ops(run_id: str, metrics: dict[str, Any], files: list[Path]) -> list[list[Any]]:
    """Into the seed's (finished) training run, with the client: evaluating never changes its status."""
    named = {f"test/{k[5:]}" if k.startswith("test_") else f"model/{k}": v
             for k, v in metrics.items() if k not in ("batch_size", "seed")}
    return [["log_metrics", run_id, [named]], ["log_artifacts", run_id, [[str(f) for f in files], "evaluate"]]]
