"""The metric points of a training run, as MLflow shows them: window means of the per-step record.

One function of the record serves both the live view (fed chunk by chunk while training) and the
publisher (fed ``steps.csv`` afterwards), so both produce the same (key, step) pairs and a point
sent live is never sent again. Every point's step is the number of samples seen, so runs of
different batch sizes line up. Imports neither torch nor MLflow.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Iterable

Point = tuple[str, float, int, int]  # key, value, timestamp (ms), step (= samples seen)


def window_for(total_steps: int, max_points: int, full_history: bool) -> int:
    """Steps per point, so that every metric holds at most ``max_points`` points per run."""
    return 1 if full_history else max(1, math.ceil(total_steps / max_points))


class Windows:
    """Turns consecutive steps into window means: a point at every step that is a multiple of
    ``window``, and one for the last, partial window when the run ends (``finish``)."""

    def __init__(self, window: int, start_time: float):
        self.window, self.prev_time = window, start_time
        self._reset()
        self.last: tuple | None = None

    def _reset(self) -> None:
        self.n, self.loss, self.correct, self.batch, self.seconds = 0, 0.0, 0, 0, 0.0

    def add(self, step: int, samples: int, loss: float, correct: int | None, batch: int, lr: float,
            time: float, seconds: float) -> list[Point]:
        self.n += 1
        self.loss += loss
        self.batch += batch
        self.seconds += seconds
        self.correct += correct or 0
        self.last = (step, samples, lr, time, correct is not None)
        return self._emit() if step % self.window == 0 else []

    def finish(self) -> list[Point]:
        return self._emit() if self.n and self.last else []

    def _emit(self) -> list[Point]:
        step, samples, lr, t, has_correct = self.last
        ms = int(t * 1000)
        points = [("train/loss", self.loss / self.n, ms, samples), ("train/lr", lr, ms, samples),
                  ("train/optimizer_step", float(step), ms, samples)]
        # Samples over the window's own step seconds, as the run's final throughput: the wall time
        # between points also holds validations and checkpoints, and the first step's is zero.
        # Steps resumed from a checkpoint that did not record their seconds fall back to it.
        busy = self.seconds if math.isfinite(self.seconds) and self.seconds > 0 else t - self.prev_time
        if busy > 0:
            points.append(("train/throughput", self.batch / busy, ms, samples))
        if has_correct:
            points.append(("train/batch_acc", self.correct / self.batch, ms, samples))
        self.prev_time = t
        self._reset()
        return points


def read_csv(path: Path) -> list[dict[str, str]]:
    with Path(path).open() as fh:
        return list(csv.DictReader(fh))


def train_points(folder: Path, window: int, start_time: float) -> list[Point]:
    """Every point of a finished training run, from its output folder."""
    windows, points = Windows(window, start_time), []
    for r in read_csv(folder / "steps.csv"):
        correct = round(float(r["batch_acc"]) * int(r["batch"])) if r.get("batch_acc") else None
        points += windows.add(int(r["step"]), int(r["samples"]), float(r["loss"]), correct, int(r["batch"]),
                              float(r["lr"]), start_time + float(r["wall_s"]), float(r["step_s"]))
    points += windows.finish()
    ms = int(start_time * 1000)
    for r in read_csv(folder / "evals.csv"):
        at = ms + int(float(r["train_seconds"]) * 1000)
        points.append(("val/loss", float(r["val_loss"]), at, int(r["samples"])))
        if r.get("val_acc") not in (None, "", "nan"):
            points.append(("val/acc", float(r["val_acc"]), at, int(r["samples"])))
    points += [("train/noise_scale", float(r["b_simple"]), ms, int(r["samples"])) for r in read_csv(folder / "noise.csv")]
    return points


def scalar_points(metrics: dict[str, float | None], step: int, ms: int) -> list[Point]:
    return [(k, float(v), ms, step) for k, v in metrics.items() if v is not None and math.isfinite(float(v))]


def by_key(points: Iterable[Point]) -> dict[str, list[Point]]:
    out: dict[str, list[Point]] = {}
    for p in points:
        out.setdefault(p[0], []).append(p)
    return out
