"""A tool's own MLflow run (bench, find-batch-size), in an experiment of its own
(``<experiment>-<tool>``): the sweep's experiment holds sweeps only."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator

from mlflow.entities import Metric, Param

from ..context import param_text as _text
from .client import TrackingClient
from .uri import project_root


class ToolRun:
    def __init__(self, view: TrackingClient, run_id: str):
        self.view, self.client, self.run_id = view, view.client, run_id

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(k, _text(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()
                                                    if v is not None])

    def log_dict(self, obj: Any, path: str) -> None:
        self.client.log_dict(self.run_id, obj, path)

    def log_text(self, text: str, path: str) -> None:
        self.client.log_text(self.run_id, text, path)

    @contextmanager
    def child(self, name: str, window: int) -> Iterator[Any]:
        """A child run with live metrics, as a training run has (the bench's logging cells)."""
        from .live import LiveMetrics
        run_id = self.client.create_run(self.view.experiment_id, run_name=name, tags={
            "mlflow.parentRunId": self.run_id, "batchlab.role": "bench-sink"}).info.run_id
        sink = LiveMetrics(self.client, run_id, window, uri=self.view.uri)
        try:
            yield sink
        finally:
            sink.close(complete=True)
            self.client.set_terminated(run_id, "FINISHED")


@contextmanager
def tool_run(ctx, tool: str, params: dict[str, Any] | None = None) -> Iterator[ToolRun]:
    """A run that ends FINISHED, or FAILED / KILLED with the error."""
    view = TrackingClient(project_root(ctx.workdir), f"{ctx.params.tracking.experiment}-{tool}", ctx.env)
    run = ToolRun(view, view.client.create_run(view.experiment_id, run_name=tool,
                                               tags={"batchlab.role": tool}).info.run_id)
    if params:
        run.log_params(params)
    try:
        yield run
    except KeyboardInterrupt:
        view.end_run(run.run_id, "KILLED", "stopped by SIGINT")
        raise
    except BaseException as exc:
        view.end_run(run.run_id, "FAILED", f"{type(exc).__name__}: {exc}")
        raise
    view.client.set_terminated(run.run_id, "FINISHED")
