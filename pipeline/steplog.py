"""The per-step record: what the training loop keeps of every optimizer step, declared once.

``FIELDS`` drives everything that holds steps: the loop's buffer (``core.pending``), a run's
step log and its checkpoint, ``steps.csv``, and the MLflow points (``tracking.points``: a
window of steps becomes one point per field that names a metric). To add a per-step figure,
add a ``Field`` here and pass its value where the loop records a step (``core.engine.fit``).

Imports neither torch nor MLflow: the loop, the tracking view and the tests share it.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator


@dataclass(frozen=True)
class Field:
    name: str
    kind: type                  # int or float: how steps.csv is read back
    on_device: bool = False     # a tensor until the loop's buffer drains (no host sync per step)
    optional: bool = False      # absent for some tasks (correct predictions: classification only)
    column: str | None = None   # its steps.csv column, where not its name
    since_start: bool = False   # a wall-clock time: steps.csv holds seconds since the first step
    metric: str | None = None   # its MLflow key, where it has one
    # How a window of steps becomes one point: "mean", "last", "per_sample" (sum over the
    # window's samples) or "per_second" (sum over the window's own step seconds).
    window: str = "mean"

    @property
    def csv_name(self) -> str:
        return self.column or self.name


FIELDS = (
    Field("step", int, metric="train/optimizer_step", window="last"),  # 1-based optimizer step
    Field("samples", int),                                              # samples seen after it
    # Samples in its batch; per second of the window's step time, the window's throughput.
    Field("batch", int, metric="train/throughput", window="per_second"),
    Field("loss", float, on_device=True, metric="train/loss"),
    Field("lr", float, metric="train/lr", window="last"),
    Field("time", float, column="wall_s", since_start=True),  # the wall clock at the step's end
    # The step's own seconds (no validation, no checkpoint): their median is the steady rate.
    Field("seconds", float, column="step_s"),
    Field("correct", int, on_device=True, optional=True, metric="train/batch_acc", window="per_sample"),
)
NAMES = tuple(f.name for f in FIELDS)


class Steps:
    """Consecutive optimizer steps: one list per field (``steps.loss``, ``steps.step``); an
    optional field's list is empty where the task has no such figure."""

    def __init__(self, columns: dict[str, list] | None = None):
        columns = columns or {}
        self.columns = {name: list(columns.get(name, ())) for name in NAMES}

    def __getattr__(self, name: str) -> list:
        try:
            return self.__dict__["columns"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __len__(self) -> int:
        return len(self.columns["step"])

    def extend(self, other: "Steps") -> None:
        for name in NAMES:
            self.columns[name].extend(other.columns[name])

    def rows(self) -> Iterator[dict[str, Any]]:
        """Each step as {field: value}; an absent optional figure is None."""
        for i in range(len(self)):
            yield {name: (col[i] if i < len(col) else None) for name, col in self.columns.items()}


class StepLog(Steps):
    """A run's steps so far, its validations and its noise-scale estimates: what a checkpoint
    keeps and the run's files are written from."""

    def __init__(self):
        super().__init__()
        self.evals: list[dict] = []
        self.noise: list[tuple[int, float]] = []  # (samples seen, B_simple)

    def state_dict(self) -> dict[str, Any]:
        return {**{n: list(c) for n, c in self.columns.items()}, "evals": list(self.evals), "noise": list(self.noise)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = len(state["step"])
        for f in FIELDS:
            # A checkpoint written before a field existed: unknown (nan) for its steps.
            missing = [] if f.optional else [math.nan] * n
            self.columns[f.name] = list(state.get(f.name, missing))
        self.evals = list(state["evals"])
        self.noise = [tuple(x) for x in state["noise"]]


def write_csv(steps: Steps, path: Path, t0: float) -> None:
    """``steps.csv``: a column per field the run has, times as seconds since ``t0``."""
    from .context import csv_text, write_atomic
    columns = {f.csv_name: ([v - t0 for v in steps.columns[f.name]] if f.since_start else steps.columns[f.name])
               for f in FIELDS if not (f.optional and not steps.columns[f.name])}
    write_atomic(path, csv_text(columns))


def read_csv(path: Path, t0: float) -> Steps:
    with Path(path).open() as fh:
        rows = list(csv.DictReader(fh))
    columns = {}
    for f in FIELDS:
        if rows and f.csv_name in rows[0]:
            values = [f.kind(float(r[f.csv_name])) for r in rows]
            columns[f.name] = [v + t0 for v in values] if f.since_start else values
    return Steps(columns)
