"""A durable local journal of tracking writes, for when the store does not answer.

One folder per stage run under ``spool/``: ``journal.jsonl`` (one operation per line, in the
order they were made), ``files/`` (copies of artifacts, so later runs cannot change them),
``metrics-*.jsonl`` (metric points the logger could not send) and ``done`` (how many
operations already reached the store: replay resumes there). Runs created while the store was
down have local ids (``local-…``); ``spool/ids.json`` maps them to the store's ids once sent,
and is kept so later stages can translate the ids they read from ``run.json``.
Knows nothing of MLflow: ``tracking.Tracker`` writes and replays it.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

LOCAL = "local-"


def is_local(run_id: str | None) -> bool:
    return bool(run_id) and run_id.startswith(LOCAL)


def new_local_id() -> str:
    return LOCAL + uuid.uuid4().hex[:16]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Spool:
    """The journal of one stage run (created on its first entry)."""

    def __init__(self, root: Path, name: str):
        self.root = root
        self.dir = root / f"{name}-{uuid.uuid4().hex[:8]}"

    def append(self, op: str, run: str | None, args: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir / "journal.jsonl").open("a") as fh:
            fh.write(json.dumps({"op": op, "run": run, "args": args}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def keep_file(self, path: Path) -> str:
        """A copy of ``path`` inside the spool; returns it relative to the spool folder."""
        files = self.dir / "files"
        files.mkdir(parents=True, exist_ok=True)
        dest = files / f"{len(list(files.iterdir())):04d}" / path.name  # the artifact keeps its name
        dest.parent.mkdir()
        shutil.copyfile(path, dest)
        return str(dest.relative_to(self.dir))

    def metrics_file(self, run: str) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        return self.dir / f"metrics-{run}.jsonl"


def pending(root: Path) -> list[Path]:
    """Spool folders not yet sent, oldest first."""
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and (d / "journal.jsonl").is_file()]
    return sorted(dirs, key=lambda d: (d / "journal.jsonl").stat().st_mtime)


def entries(folder: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(index, operation) not yet sent."""
    done = int((folder / "done").read_text()) if (folder / "done").is_file() else 0
    with (folder / "journal.jsonl").open() as fh:
        for i, line in enumerate(fh):
            if i >= done and line.strip():
                yield i, json.loads(line)


def mark_done(folder: Path, index: int) -> None:
    _write_atomic(folder / "done", str(index + 1))


def finish(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def load_ids(root: Path) -> dict[str, str]:
    path = root / "ids.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def save_ids(root: Path, ids: dict[str, str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    _write_atomic(root / "ids.json", json.dumps(ids, indent=1, sort_keys=True))
