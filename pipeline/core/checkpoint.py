"""A training's checkpoint: written whole (a temporary file renamed over the old one), and
resumed only by the run configuration that wrote it."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class Checkpoint:
    """Where a run's checkpoint lives. ``key`` names the run configuration and must match on
    resume, so a checkpoint of other params is never resumed; ``meta`` (the training's identity:
    its record id, creation time and logging window) is stored alongside and not compared."""
    path: Path
    key: dict
    meta: dict = field(default_factory=dict)

    def save(self, state: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._drop_partial()
        try:
            torch.save(state | {"key": self.key, "meta": self.meta}, tmp)
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _drop_partial(self) -> None:
        """A save cut short by a process killed mid-write (a lost node, SIGKILL) leaves its
        temporary file: the trainer of this checkpoint, the only one (its lock), removes it."""
        for partial in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            partial.unlink(missing_ok=True)

    def read(self) -> dict | None:
        """The stored state, whatever its key. One that cannot be read is moved aside (and
        said so), never trusted and never silently dropped."""
        if not self.path.is_file():
            return None
        try:
            return torch.load(self.path, weights_only=True)
        except Exception as err:
            aside = self.path.with_name(self.path.name + ".unreadable")
            os.replace(self.path, aside)
            print(f"warning: checkpoint {self.path} cannot be read ({type(err).__name__}); "
                  f"moved to {aside.name}, training starts from step 0", file=sys.stderr)
            return None

    def load(self) -> dict | None:
        state = self.read()
        return state if state is not None and state.get("key") == self.key else None

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        self._drop_partial()
