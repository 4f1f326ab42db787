"""One front door at a time per workspace: a second `mlflow run`, `dvc repro` or stage stops at once.

The outermost batchlab process of a command holds ``.batchlab.lock`` (an flock, released by the
kernel however the process ends). Processes it started (the stages `mlflow run` runs through DVC)
pass: the holder is their ancestor. A stage started by hand also holds DVC's own repository lock
(``.dvc/tmp/lock``, an flock as DVC takes it), so a `dvc repro` started beside it stops before
it removes the stage's outputs. The `mlflow run` launcher checks that DVC's lock is free before it
lets DVC touch ``params.yaml``.
"""
from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

from .procs import Busy, proc_stat

LOCK = ".batchlab.lock"
_held: dict[Path, object] = {}  # lock file -> the open file whose flock this process holds until it exits


def _ancestors() -> set[int]:
    out, pid = set(), os.getpid()
    while pid > 1:
        fields = proc_stat(pid)
        pid = int(fields[1]) if len(fields) > 1 else 0
        out.add(pid)
    return out


def _flock(path: Path) -> tuple[object | None, str]:
    """The file with an exclusive flock on it, or (None, what the file says of its holder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = path.open("a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        text = fh.read().strip()
        fh.close()
        return None, text
    return fh, ""


def hold(workdir: Path, what: str, dvc_too: bool = False) -> None:
    """Hold the workspace for ``what`` until this process exits, or raise Busy naming the holder."""
    path = (workdir / LOCK).resolve()
    if path in _held:
        return
    fh, holder = _flock(path)
    if fh is None:
        pid = holder.split(" ", 1)[0]
        if pid.isdigit() and int(pid) in _ancestors():
            return  # our own launcher holds it
        raise Busy(f"another batchlab command runs in this workspace (pid {holder or '?'}); "
                   f"wait for it to end, then run {what} again")
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()} {' '.join(sys.argv)[:200]}")
    fh.flush()
    _held[path] = fh
    if dvc_too and (workdir / ".dvc").is_dir():
        dvc, _ = _flock(workdir / ".dvc" / "tmp" / "lock")
        if dvc is None:
            _held.pop(path).close()
            raise Busy(f"DVC runs in this workspace (.dvc/tmp/lock is held); wait for it to end, then run {what} again")
        _held[path.with_suffix(".dvc")] = dvc


def dvc_busy(workdir: Path) -> bool:
    """Does a DVC command hold this workspace's repository lock now?"""
    if not (workdir / ".dvc").is_dir():
        return False
    fh, _ = _flock(workdir / ".dvc" / "tmp" / "lock")
    if fh is None:
        return True
    fcntl.flock(fh, fcntl.LOCK_UN)
    fh.close()
    return False
