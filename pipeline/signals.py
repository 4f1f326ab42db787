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
    """Outside the loop (``deferred`` false) a signal raises Interrupted at once, so setup and
    teardown code can clean up through ordinary exception handling. A second SIGINT while
    deferred raises at once too."""

    def __init__(self):
        self.requested: int | None = None
        self.deferred = False
        self._old: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum, frame) -> None:
        if self.deferred and self.requested is None:
            self.requested = signum
            return
        raise Interrupted(signum)
