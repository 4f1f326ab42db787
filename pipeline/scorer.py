"""``python -m pipeline.scorer``: the evaluate stage's scikit-learn metrics and matplotlib figure
for each seed, from a process of its own, started first: importing scikit-learn and matplotlib
(about 1 s on the 2-core machine) runs on the other core while the stage imports torch and
predicts.

Protocol: one JSON line per seed, {"task", "y", "pred", "dtypes", "folder"} (the test targets and
the model's predictions, as lists, and their numpy dtypes); for each, in order, the process writes
``FILES`` into ``folder`` and answers one JSON line, {"metrics": {...}} or {"error": "..."}. It
exits at the end of its input: a stage that fails or is stopped closes it and waits for that exit.
It runs in a session of its own and ignores SIGINT: a terminal's Ctrl-C reaches the stage, which
then closes the input.

``Scorer`` is the stage's side; this module imports nothing heavy at the top.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .context import write_atomic, write_json
from .metric_logger import close_input, read_answer, spawn_helper

FILES = ("report.json", "predictions.csv", "evaluation.png")  # what a seed's scoring writes


class Scorer:
    """A scorer process started now; ``submit`` hands it a seed, ``results`` collects them all."""

    def __init__(self):
        self.proc = spawn_helper("pipeline.scorer")
        self.folders: list[Path] = []  # one per seed submitted, in order

    def submit(self, task: str, y: np.ndarray, pred: np.ndarray, folder: Path) -> None:
        """Queue one seed's figures; the next seed's predictions are made while it works."""
        job = {"task": task, "y": y.tolist(), "pred": pred.tolist(), "dtypes": [str(y.dtype), str(pred.dtype)],
               "folder": str(folder)}
        try:
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # it died; ``results`` says so
        self.folders.append(folder)

    def results(self) -> list[tuple[dict[str, Any], list[Path]]]:
        """(metrics, files written) for every seed submitted, in order."""
        close_input(self.proc)
        out = []
        for folder in self.folders:
            answer = read_answer(self.proc, "scorer", exits=False)
            if answer.get("error"):
                self.proc.wait()
                raise RuntimeError(f"evaluate's scorer: {answer['error']}")
            out.append((answer["metrics"], [folder / name for name in FILES]))
        self.proc.wait()
        return out

    def abort(self) -> None:
        """The stage stops: the process finishes the seeds it was handed (each file is written
        whole) and has exited when this returns, so nothing writes into the outputs after the
        stage has ended. Its answers are read and dropped, so that it never waits on a full pipe."""
        try:
            self.proc.communicate()
        except (OSError, ValueError):
            self.proc.wait()


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


def main() -> int:
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = sys.stdout
    sys.stdout = sys.stderr  # a library's print never mixes into the answers
    import importlib
    import matplotlib
    matplotlib.use("Agg")
    for module in ("matplotlib.pyplot", "sklearn.metrics"):  # now, while the stage imports torch
        importlib.import_module(module)
    for line in sys.stdin:
        try:
            job = json.loads(line)
            folder = Path(job["folder"])
            folder.mkdir(parents=True, exist_ok=True)
            y, pred = (np.asarray(job[k], dtype=t) for k, t in zip(("y", "pred"), job["dtypes"]))
            answer: dict[str, Any] = {"metrics": score(job["task"], y, pred, folder)[0]}
        except Exception as err:
            answer = {"error": f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"}
        try:
            out.write(json.dumps(answer) + "\n")
            out.flush()
        except BrokenPipeError:
            return 0  # the stage has gone (stopped or failed): nobody waits for the answer
        if "error" in answer:
            return 1
    return 0


if __name__ == "__main__":
    from .signals import exit_now
    exit_now(main())
