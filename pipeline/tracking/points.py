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

from ..steplog import FIELDS, read_csv as read_steps

Point = tuple[str, float, int, int]  # key, value, timestamp (ms), step (= samples seen)


def window_for(total_steps: int, max_points: int, full_history: bool) -> int:
    """Steps per point, so that every metric holds at most ``max_points`` points per run."""
    return 1 if full_history else max(1, math.ceil(total_steps / max_points))


class Windows:
    """Turns consecutive steps into window means: a point at every step that is a multiple of
    ``window``, and one for the last, partial window when the run ends (``finish``). Which
    figures become points, and how, is each field's ``metric`` and ``window`` (``steplog``)."""

    def __init__(self, window: int):
        self.window = window
        self.rows: list[dict] = []

    def add(self, row: dict) -> list[Point]:
        self.rows.append(row)
        return self._emit() if row["step"] % self.window == 0 else []

    def finish(self) -> list[Point]:
        return self._emit() if self.rows else []

    def _emit(self) -> list[Point]:
        rows, self.rows = self.rows, []
        last = rows[-1]
        ms, samples = int(last["time"] * 1000), last["samples"]
        total = {name: sum(r[name] for r in rows) for name in ("batch", "seconds")}
        points = []
        for f in FIELDS:
            if f.metric is None or last[f.name] is None:
                continue
            value = last[f.name] if f.window == "last" else sum(r[f.name] for r in rows)
            over = {"mean": len(rows), "last": 1, "per_sample": total["batch"], "per_second": total["seconds"]}[f.window]
            # Steps resumed from a checkpoint that did not record their seconds: no rate for them.
            if math.isfinite(over) and over > 0:
                points.append((f.metric, float(value) / over, ms, samples))
        return points


def train_points(folder: Path, window: int, start_time: float) -> list[Point]:
    """Every point of a finished training run, from its output folder."""
    windows, points = Windows(window), []
    for row in read_steps(folder / "steps.csv", start_time).rows():
        points += windows.add(row)
    points += windows.finish()
    ms = int(start_time * 1000)
    for r in read_csv(folder / "evals.csv"):
        at = ms + int(float(r["train_seconds"]) * 1000)
        points.append(("val/loss", float(r["val_loss"]), at, int(r["samples"])))
        if r.get("val_acc") not in (None, "", "nan"):
            points.append(("val/acc", float(r["val_acc"]), at, int(r["samples"])))
    points += [("train/noise_scale", float(r["b_simple"]), ms, int(r["samples"])) for r in read_csv(folder / "noise.csv")]
    return points


def read_csv(path: Path) -> list[dict[str, str]]:
    with Path(path).open() as fh:
        return list(csv.DictReader(fh))


def scalar_points(metrics: dict[str, float | None], step: int, ms: int) -> list[Point]:
    return [(k, float(v), ms, step) for k, v in metrics.items() if v is not None and math.isfinite(float(v))]


def by_key(points: Iterable[Point]) -> dict[str, list[Point]]:
    out: dict[str, list[Point]] = {}
    for p in points:
        out.setdefault(p[0], []).append(p)
    return out
