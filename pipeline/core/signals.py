"""How a training run ends early: SIGINT/SIGTERM as a request the loop honours at its next
step boundary (also sent when the `dvc repro` that started the trainer dies: ``procs``), or a
loss that is no longer finite."""
from __future__ import annotations

import signal
from contextlib import contextmanager

from ..procs import Interrupted  # noqa: F401  (the loop raises it; procs, so tracking can catch it)


class NonFiniteLoss(RuntimeError):
    """The loss became inf or nan (``train.stop_on_nonfinite``)."""


class StopSignals:
    """A signal is recorded, and acted on where stopping is safe: when set-up is done and at
    every step boundary (``check``, or the loop's own test of ``requested``). Raising from the
    handler itself could land anywhere, even in a library's weakref callback, where Python
    swallows the exception and the signal would be lost. A second signal acts at once, and so
    does the first where ``immediate`` is set (under torchrun: a rank cannot stop alone at a step
    boundary without the others)."""

    def __init__(self):
        self.requested: int | None = None
        self.immediate = False
        self._holding = False
        self._old: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum, frame) -> None:
        if self._holding:
            return
        if self.immediate or self.requested is not None:
            raise Interrupted(signum)
        self.requested = signum

    @contextmanager
    def holding(self):
        """While the stop is being recorded (a checkpoint, the run's end): a further signal (Linux's
        parent-death signal and a watcher can both send one) waits rather than cut it short."""
        self._holding = True
        try:
            yield
        finally:
            self._holding = False

    def check(self) -> None:
        if self.requested is not None:
            raise Interrupted(self.requested)
