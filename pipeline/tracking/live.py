"""Batch-wise metrics in MLflow while a run trains: best effort, through the public client.

The loop hands its steps to ``LiveMetrics`` (the loop's sink); window means go to a queue
that one thread sends with ``MlflowClient.log_batch``. The thread, not the loop, waits on the
store. The first error ends live logging for the run with one line: every step is in the run's
files, and publishing them afterwards (the stage's end, or ``python -m pipeline sync``) sends
the points the store lacks. ``close`` waits a bounded time; a thread still stuck in a request
then is abandoned and the stage leaves publishing to ``sync`` (a request still in flight could
otherwise land beside the one that replaces it).
"""
from __future__ import annotations

import math
import queue
import sys
import threading
import time

from .points import Point, Windows

MAX_BATCH = 1000      # MLflow's limit of metrics per log_batch call
SEND_SECONDS = 5.0    # how stale the live chart may get


class LiveMetrics:
    def __init__(self, client, run_id: str, window: int, held: dict[str, int] | None = None,
                 uri: str = ""):
        self.client, self.run_id, self.uri = client, run_id, uri
        self.windows = Windows(window)
        self.held = held or {}            # key -> highest step the store holds (a resumed run)
        self.failed: str | None = None
        self.sent = 0
        self._pending: list[Point] = []
        self._sent_at = time.monotonic()
        self._queue: queue.Queue = queue.Queue()
        self._abandoned = False
        self._thread = threading.Thread(target=self._send_all, name="live-metrics", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- the loop's side
    def resume_from(self, log, resumed_step: int) -> None:
        """Refill the window the interruption left partial; nothing is sent for steps trained
        before it: what the store lacks of them, publishing sends."""
        first = (resumed_step // self.windows.window) * self.windows.window
        for row in log.rows():
            if row["step"] > first:
                self.windows.add(row)

    def steps(self, steps) -> None:
        out: list[Point] = []
        for row in steps.rows():
            out += self.windows.add(row)
        self._add(out)

    def point(self, key: str, value: float, samples: int) -> None:
        if math.isfinite(value):
            self._add([(key, float(value), int(time.time() * 1000), samples)])

    def _add(self, points: list[Point], force: bool = False) -> None:
        self._pending += [p for p in points if p[3] > self.held.get(p[0], -1)]
        now = time.monotonic()
        if self._pending and (force or len(self._pending) >= MAX_BATCH or now - self._sent_at > SEND_SECONDS):
            self._queue.put(self._pending)
            self._pending, self._sent_at = [], now

    # ----------------------------------------------------------------- the thread
    def _send_all(self) -> None:
        from mlflow.entities import Metric
        while (batch := self._queue.get()) is not None:
            if self.failed or self._abandoned:
                continue
            try:
                for i in range(0, len(batch), MAX_BATCH):
                    self.client.log_batch(self.run_id, metrics=[Metric(*p) for p in batch[i:i + MAX_BATCH]],
                                          synchronous=True)
                    self.sent += len(batch[i:i + MAX_BATCH])
            except Exception as err:  # the store refused or does not answer: the files have it all
                self.failed = " ".join(f"{type(err).__name__}: {err}".split())[:200]
                print(f"warning: live metrics to {self.uri} stopped ({self.failed}); training goes on, every "
                      f"step is in the run's files and is published when the store answers "
                      f"(python -m pipeline sync)", file=sys.stderr, flush=True)

    def close(self, complete: bool, timeout: float = 30.0) -> bool:
        """Send the rest (the last partial window too when training ``complete``d) and wait up to
        ``timeout`` s. True when the thread finished: nothing of this run is still in flight."""
        if complete:
            self._add(self.windows.finish(), force=True)
        self._add([], force=True)
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._abandoned = True
            return False
        return True
