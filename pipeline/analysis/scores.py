"""A seed's test figures from its targets and predictions: scikit-learn's metrics, a predictions
table and one figure (confusion matrix, or predicted against actual). No torch, no MLflow."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..context import write_atomic, write_json

FILES = ("report.json", "predictions.csv", "evaluation.png")  # what a seed's scoring writes


def score(task: str, y: np.ndarray, pred: np.ndarray, folder: Path) -> tuple[dict[str, Any], list[Path]]:
    """The figures of one seed, written into ``folder`` as ``FILES``: (metrics, their paths)."""
    import matplotlib
    matplotlib.use("Agg")
    metrics = (_classification if task == "classification" else _regression)(y, pred, folder)
    rows = ["actual,predicted"] + [f"{a},{b}" for a, b in zip(y.tolist(), pred.tolist())]
    write_atomic(folder / "predictions.csv", "\n".join(rows) + "\n")
    return metrics, [folder / name for name in FILES]


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def _regression(y: np.ndarray, pred: np.ndarray, folder: Path) -> dict[str, Any]:
    import matplotlib.pyplot as plt
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    result = {"test_mse": float(mean_squared_error(y, pred)), "test_r2": float(r2_score(y, pred)),
              "test_mae": float(mean_absolute_error(y, pred))}
    write_json(folder / "report.json", result)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(y, pred, s=6)
    ax.set(xlabel="actual", ylabel="predicted", title="Predicted against actual (test)")
    _save_figure(fig, folder / "evaluation.png")
    return result


def _classification(y: np.ndarray, pred: np.ndarray, folder: Path) -> dict[str, Any]:
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
    return {"test_acc": float(accuracy_score(y, pred)), "test_precision_macro": float(precision),
            "test_recall_macro": float(recall), "test_f1_macro": float(f1)}
