"""``python -m pipeline.metric_logger URI RUN_ID``: sends metric batches to MLflow from its own
process, so the training process never waits on the store.

Protocol: stdin carries one JSON list of [key, value, timestamp_ms, step] per line; the process
answers ``ready`` once connected, and at end of input one JSON line {"sent": n, "error": ...}.
It imports only MLflow and ignores SIGINT/SIGTERM: the parent decides when it stops.
"""
from __future__ import annotations

import json
import os
import signal
import sys

MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call


def main(uri: str, run_id: str) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.nice(10)  # training comes first when both want the CPU
    try:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        client.get_run(run_id)
    except Exception as exc:
        print(json.dumps({"sent": 0, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    print("ready", flush=True)
    sent, error = 0, None
    for line in sys.stdin:
        if error is not None:
            continue
        try:
            metrics = [Metric(k, v, ts, step) for k, v, ts, step in json.loads(line)]
            for i in range(0, len(metrics), MAX_BATCH):
                client.log_batch(run_id, metrics=metrics[i:i + MAX_BATCH])
            sent += len(metrics)
        except Exception as exc:  # reported to the parent at the end
            error = f"{type(exc).__name__}: {exc}"
    print(json.dumps({"sent": sent, "error": error}), flush=True)
    return 0 if error is None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
