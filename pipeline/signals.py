"""How a training run ends early: SIGINT/SIGTERM as a request the loop honours at its next
step boundary, or a loss that is no longer finite."""
from __future__ import annotations

import signal


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the loop stopped at a step boundary after checkpointing."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class Busy(RuntimeError):
    """Another trainer of the same (sweep, batch size) is running; the message names it."""


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
        self._old: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum, frame) -> None:
        if self.immediate or self.requested is not None:
            raise Interrupted(signum)
        self.requested = signum

    def check(self) -> None:
        if self.requested is not None:
            raise Interrupted(self.requested)
