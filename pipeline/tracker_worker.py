"""``python -m pipeline.tracker_worker CONFIG``: a stage's MLflow writes from a process of their
own, started when the stage starts, so that importing MLflow and opening the store (about 2 s on
the 2-core machine) run on the other core while the stage imports torch and does its work.

CONFIG is JSON: {"root", "uri", "experiment", "parent_run_id", "stage"}; ``uri`` is the store the
stage resolved from its own environment. The worker opens the store as
any stage does (``Tracker``: earlier journals are sent first; a store that does not answer sends
this stage's writes to its journal, with the usual warning), then reads one line from stdin: a
JSON list of operations [name, run_id, args] (``OPS``). End of input before that line (the stage
failed or was stopped) writes nothing. It answers one JSON line, {"done": n, "down": reason or
null} or {"error": "..."}, and exits. It runs in a session of its own: a terminal's Ctrl-C reaches
the stage, which closes the worker's input.

``TrackerWorker`` is the stage's side; this module imports nothing heavy at the top.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .metric_logger import close_input, read_answer, spawn_helper

OPS = ("log_metrics", "log_artifacts")  # Tracker methods a stage may hand over, called as (run_id, *args)


class TrackerWorker:
    """A worker started now for the store of ``ctx``; ``send`` hands it the stage's writes."""

    def __init__(self, ctx, stage: str):
        from .store import project_root, tracking_uri
        root = project_root(ctx.workdir)
        config = {"root": str(root), "uri": tracking_uri(root, ctx.env), "experiment": ctx.params.tracking.experiment,
                  "parent_run_id": ctx.parent_run_id, "stage": stage}
        self.proc = spawn_helper("pipeline.tracker_worker", json.dumps(config))

    def send(self, ops: list[list[Any]]) -> dict[str, Any]:
        """Hand over ``ops`` and wait until the worker has written them (or journaled them); an
        operation not in ``OPS`` comes back as the worker's error."""
        try:
            self.proc.stdin.write(json.dumps(ops) + "\n")
            self.proc.stdin.close()
        except OSError:
            pass  # it died; its answer (none) says so below
        result = read_answer(self.proc, "tracker worker")
        if result.get("error"):
            raise RuntimeError(f"tracking store: {result['error']}")
        return result

    def abort(self) -> None:
        """The stage stops: the worker reads the end of its input and exits without writing."""
        close_input(self.proc)


def main(config: dict[str, Any]) -> int:
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = sys.stdout
    sys.stdout = sys.stderr  # MLflow's prints never mix into the answer
    try:
        from .tracking import Tracker
        tracker = Tracker(Path(config["root"]), config["experiment"], {"MLFLOW_TRACKING_URI": config["uri"]},
                          parent_run_id=config["parent_run_id"], stage=config["stage"])
        line = sys.stdin.readline()
        if not line.endswith("\n"):
            return 0  # the stage ended without handing anything over
        ops = json.loads(line)
        for name, run_id, args in ops:
            if name not in OPS:
                raise ValueError(f"unknown operation {name!r} (allowed: {', '.join(OPS)})")
            getattr(tracker, name)(run_id, *args)
        answer: dict[str, Any] = {"done": len(ops), "down": tracker.down}
    except Exception as err:
        from .tracking import first_line
        answer = {"error": first_line(err)}
    out.write(json.dumps(answer) + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    from .signals import exit_now
    exit_now(main(json.loads(sys.argv[1])))
