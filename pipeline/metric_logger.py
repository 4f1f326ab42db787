"""``python -m pipeline.metric_logger URI``: sends metric batches to MLflow from its own process,
so the training process never waits on the store. It is started (``spawn``) before its run is
known, at the stage's start (``prestart``), and serves the stage's runs one after another: one
process per stage, so its imports and connection are paid once, not once per seed.

Protocol, per run: a line [RUN_ID, SPOOL_FILE]; the process answers ``ready`` once connected. Then
one JSON list of [key, value, timestamp_ms, step] per line, until a line ``null`` (the run's end:
the next run's line may follow) or the end of input (the process exits after answering). At the
run's end it answers one JSON line {"sent": n, "skipped": n, "spooled": n, "error": ...}.

Exactly once: a point whose step is not beyond the last step the store already holds for its key
is skipped (a resumed run re-trains the steps after its checkpoint; the store may hold them from
the process that died). When the store stops answering, the failed batch and every later one are
appended to SPOOL_FILE, which the stage's journal then carries to the store later.
Writing: through MLflow's ``log_batch`` this process spent about 87 µs a point on a SQLite store
(its ORM builds an object per point): at five points per optimizer step, over half a core at
batch size 64. For the SQL stores tested here (SQLite, PostgreSQL) the points go in with one
multi-row INSERT into the metric tables MLflow itself defines: about 14 µs a point, reading the
pipe included. Any other store (an ``mlflow server``), or tables with other columns than expected,
gets ``log_batch``.
It imports only MLflow and ignores SIGINT/SIGTERM: the parent decides when it stops.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys

MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call


def last_steps(client, run_id: str) -> dict[str, int]:
    """The highest step the store holds for each metric key of the run."""
    keys = client.get_run(run_id).data.metrics
    return {k: max((m.step for m in client.get_metric_history(run_id, k)), default=-1) for k in keys}


class Points:
    """Sends metric points, lists of [key, value, timestamp_ms, step], to runs of one store."""

    def __init__(self, client, uri: str):
        self.client = client
        self.sql = SqlPoints.open(uri)

    def send(self, run_id: str, points: list) -> None:
        for i in range(0, len(points), MAX_BATCH):
            batch = points[i:i + MAX_BATCH]
            if self.sql is None or not self.sql.insert(run_id, batch):
                self._log_batch(run_id, batch)

    def _log_batch(self, run_id: str, points: list) -> None:
        from mlflow.entities import Metric

        self.client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in points])


class SqlPoints:
    """Metric points as rows of MLflow's ``metrics`` table (a row per point) and ``latest_metrics``
    (a row per key: the point with the highest (step, timestamp, value), what the UI's run table
    shows), written the way ``SqlAlchemyStore.log_batch`` writes them: values sanitized alike
    (NaN as 0 with ``is_nan``, infinities as the largest finite floats), refused for a run that is
    not active, in one transaction."""

    SCHEMES = ("sqlite", "postgresql")
    COLUMNS = {"run_uuid", "key", "value", "timestamp", "step", "is_nan"}

    @classmethod
    def open(cls, uri: str) -> "SqlPoints | None":
        """A writer for ``uri``, or None when it is not a SQL store of SCHEMES, or when its tables
        (or MLflow's definitions of them) have other columns than the ones written here."""
        if uri.split(":", 1)[0].split("+", 1)[0] not in cls.SCHEMES:
            return None
        import sqlalchemy
        from mlflow.store.db.utils import create_sqlalchemy_engine
        from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlRun

        tables = SqlMetric.__table__, SqlLatestMetric.__table__
        engine = create_sqlalchemy_engine(uri)
        inspector = sqlalchemy.inspect(engine)
        for table in tables:
            if {c.name for c in table.columns} != cls.COLUMNS or \
                    {c["name"] for c in inspector.get_columns(table.name)} != cls.COLUMNS:
                return None
        return cls(engine, *tables, SqlRun.__table__)

    def __init__(self, engine, metrics, latest, runs):
        self.engine, self.metrics, self.latest, self.runs = engine, metrics, latest, runs

    @staticmethod
    def _value(value: float) -> tuple[bool, float]:
        if math.isnan(value):
            return True, 0.0
        if math.isinf(value):
            return False, math.copysign(sys.float_info.max, value)
        return False, float(value)

    def insert(self, run_id: str, points: list) -> bool:
        """Writes the points; False (nothing written) when one of them is in the store already, for
        ``log_batch`` to sort out."""
        import sqlalchemy as sa
        from mlflow.exceptions import MlflowException

        def order(row) -> tuple:  # which of two points of a key is the latest, as MLflow decides
            return row["step"], row["timestamp"], row["value"]

        rows, newest = [], {}
        for key, value, ts, step in points:
            is_nan, value = self._value(value)
            row = {"run_uuid": run_id, "key": key, "value": value, "timestamp": int(ts), "step": int(step),
                   "is_nan": is_nan}
            rows.append(row)
            if key not in newest or order(row) > order(newest[key]):
                newest[key] = row
        m, lm, r = self.metrics, self.latest, self.runs
        try:
            with self.engine.begin() as conn:
                stage = conn.execute(sa.select(r.c.lifecycle_stage).where(r.c.run_uuid == run_id)).scalar()
                if stage != "active":
                    raise MlflowException(f"The run {run_id} must be in the 'active' state. Current state is {stage}.")
                conn.execute(sa.insert(m), rows)
                held = {row.key: row._mapping for row in conn.execute(
                    sa.select(lm).where(lm.c.run_uuid == run_id, lm.c.key.in_(list(newest))))}
                fresh = [row for key, row in newest.items() if key not in held]
                if fresh:
                    conn.execute(sa.insert(lm), fresh)
                for key, row in newest.items():
                    if key in held and order(row) > order(held[key]):
                        conn.execute(sa.update(lm).where(lm.c.run_uuid == run_id, lm.c.key == key).values(
                            value=row["value"], timestamp=row["timestamp"], step=row["step"], is_nan=row["is_nan"]))
        except sa.exc.IntegrityError:
            return False
        return True


def yield_to_training() -> None:
    """Run only on a core training leaves idle (Linux SCHED_IDLE): a trainer whose step uses
    every core through OpenMP waits for its slowest thread, so a logger that takes a core even
    briefly stalls every step. The points queue up and are sent in the gaps and after training.
    Elsewhere: the lowest ordinary priority."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)


def main(uri: str) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    yield_to_training()
    # Import while the trainer works, then wait for the first line, [run_id, spool_file]. The
    # client is made only then, when the stage has made the store (two processes creating a new
    # SQLite store at once break it).
    import importlib
    importlib.import_module("mlflow.tracking")
    if uri.startswith("sqlite:"):
        importlib.import_module("mlflow.store.tracking.sqlalchemy_store")
    client = writer = None
    while header := sys.stdin.readline():
        run_id, spool_file = json.loads(header)
        try:
            if client is None:
                from mlflow.tracking import MlflowClient
                client = MlflowClient(uri)
                writer = Points(client, uri)
            last = last_steps(client, run_id)
        except Exception as exc:
            print(json.dumps({"sent": 0, "skipped": 0, "spooled": 0, "error": f"{type(exc).__name__}: {exc}"}),
                  flush=True)
            return 1
        print("ready", flush=True)
        if not serve(writer, run_id, spool_file, last):
            break
    return 0


def serve(writer: Points, run_id: str, spool_file: str, last: dict[str, int]) -> bool:
    """One run's points, until its end line (True: another run may follow) or the end of input."""
    sent = skipped = spooled = 0
    error = None
    more = False
    for line in sys.stdin:
        points = json.loads(line)
        if points is None:
            more = True
            break
        fresh = [p for p in points if p[3] > last.get(p[0], -1)]
        skipped += len(points) - len(fresh)
        for p in fresh:
            last[p[0]] = p[3]
        if error is None:
            try:
                writer.send(run_id, fresh)
                sent += len(fresh)
                continue
            except Exception as exc:  # the store stopped answering: spool from here on
                error = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        os.makedirs(os.path.dirname(spool_file), exist_ok=True)
        with open(spool_file, "a") as fh:
            fh.write(json.dumps(fresh) + "\n")
        spooled += len(fresh)
    print(json.dumps({"sent": sent, "skipped": skipped, "spooled": spooled, "error": error}), flush=True)
    return more and error is None


_SPARES: dict = {}  # store URI -> a logger waiting for its next run


def prestart(uri: str) -> None:
    """Have a logger for ``uri`` importing in the background until ``take`` hands it a run. One
    that is never taken reads the end of its input when this process ends, and exits."""
    proc = _SPARES.get(uri)
    if proc is None or proc.poll() is not None:
        _SPARES[uri] = spawn(uri)


def take(uri: str):
    proc = _SPARES.pop(uri, None)
    return proc if proc is not None and proc.poll() is None else None


def give_back(uri: str, proc) -> None:
    """A logger whose run has ended (its answer read) waits for the stage's next run."""
    spare = _SPARES.get(uri)
    if spare is not None and spare is not proc and spare.poll() is None:
        spare.stdin.close()  # one spare per store is enough: this one exits
    _SPARES[uri] = proc


def spawn(uri: str):
    """A logger started before its run exists, so that its imports overlap the trainer's work;
    ``MlflowSink`` names the run on its first line. Imports nothing heavy here."""
    return spawn_helper("pipeline.metric_logger", uri)


def spawn_helper(module: str, *args: str):
    """``python -m MODULE ARGS`` as a helper of this process (this logger, a tracker worker): its
    stdin and stdout are pipes to us, and it runs in a session of its own, so a terminal's Ctrl-C
    reaches the stage alone, which then ends the helper's input."""
    import subprocess
    from pathlib import Path

    return subprocess.Popen([sys.executable, "-m", module, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=str(Path(__file__).resolve().parent.parent), start_new_session=True)


def close_input(proc) -> None:
    """End a helper's input (this logger, a tracker worker, a scorer): it finishes what it was
    handed and exits. One that has died already is left as it is."""
    try:
        proc.stdin.close()
    except OSError:
        pass


def read_answer(proc, who: str, exits: bool = True) -> dict:
    """The answer line a helper process (this logger, a tracker worker, a scorer) writes, as JSON, once it
    exited (``exits``; else once written); a helper that died without answering gives
    {"error": ...} naming ``who``."""
    answer = proc.stdout.readline().strip()
    if exits or not answer:
        proc.wait()
    try:
        return json.loads(answer)
    except json.JSONDecodeError:
        return {"error": f"no answer from the {who} (exit {proc.returncode})"}


if __name__ == "__main__":
    from .signals import exit_now
    exit_now(main(sys.argv[1]))
