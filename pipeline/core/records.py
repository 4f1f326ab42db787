"""What the training loop records per optimizer step, and its history. One field list, used by
the loop, its checkpoints and the MLflow sink alike."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class StepChunk:
    """Consecutive optimizer steps, read back from the device in one go."""
    step: list[int]          # 1-based optimizer step index
    samples: list[int]       # samples seen after the step
    loss: list[float]
    correct: list[int]       # correct predictions in the batch (classification; else empty)
    batch: list[int]         # samples in the batch
    lr: list[float]
    time: list[float]        # wall clock (time.time()) at the end of the step
    # The step's own seconds (validation and checkpoints excluded): its median is the steady
    # rate, which a short run's total (start-up included) is not.
    seconds: list[float] = field(default_factory=list)


STEP_FIELDS = tuple(f.name for f in fields(StepChunk))


@dataclass
class History:
    step: list[int] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    correct: list[int] = field(default_factory=list)
    batch: list[int] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    time: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    noise: list[tuple[int, float]] = field(default_factory=list)  # (samples, B_simple)

    def extend(self, chunk: StepChunk) -> None:
        for name in STEP_FIELDS:
            getattr(self, name).extend(getattr(chunk, name))

    def after(self, step: int) -> StepChunk:
        """The recorded steps after ``step``, as one chunk."""
        first = next((i for i, s in enumerate(self.step) if s > step), len(self.step))
        return StepChunk(*[getattr(self, name)[first:] for name in STEP_FIELDS])

    def state_dict(self) -> dict[str, Any]:
        return {name: list(getattr(self, name)) for name in (*STEP_FIELDS, "evals", "noise")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in (*STEP_FIELDS, "evals"):
            # A checkpoint written before step seconds were recorded: unknown (nan) for its steps.
            setattr(self, name, list(state.get(name, [math.nan] * len(state["step"]))))
        self.noise = [tuple(x) for x in state["noise"]]
