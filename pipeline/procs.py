"""Process helpers: what /proc says of a process, stopping with the process that started us,
and exiting without the interpreter's teardown. Imports neither torch nor MLflow."""
from __future__ import annotations

import atexit
import os
import signal
import sys
from pathlib import Path


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the loop stopped at a step boundary after checkpointing."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    def __reduce__(self):  # rebuilt from its signal where it is unpickled (a Ray task's error)
        return type(self), (self.signum,)


class Stopped(BaseException):
    """SIGTERM in a stage that keeps nothing when stopped (prepare, evaluate, compare). A
    BaseException, as KeyboardInterrupt is: a handler of ordinary errors (a store that refuses a
    request, say) must not swallow it and carry on."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    def __reduce__(self):  # rebuilt from its signal where it is unpickled (a Ray task's error)
        return type(self), (self.signum,)


class Busy(RuntimeError):
    """Another batchlab command, or another trainer of the same (sweep, batch size, seed), runs
    in this workspace; the message names it."""


def stop_with_parent() -> None:
    """Linux: SIGTERM this process when the process that started it dies, so a trainer whose
    `dvc repro` is killed stops at its next step boundary with a checkpoint instead of running on
    as an orphan. The kernel does it for the direct parent (PR_SET_PDEATHSIG). DVC runs a stage's
    command through ``$SHELL -c`` (``/bin/sh`` where SHELL is unset, as under cron or CI), and dash
    forks the command instead of exec'ing it: there the parent is a shell that outlives DVC, so
    the process above such wrappers is watched too, by a thread blocked on its pidfd (no polling,
    nothing that competes with the step). Called for DVC's stage commands only: a trainer started
    by hand (`nohup python -m pipeline train ... &`) outlives its shell. Elsewhere nothing."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    below, pid = os.getpid(), os.getppid()
    while _is_shell_wrapper(pid):
        below, pid = pid, _parent_of(pid)
    if not _is_dvc(pid):  # DVC died before the line above armed anything: we are an orphan already
        os.kill(os.getpid(), signal.SIGTERM)
    elif below != os.getpid():
        _term_when_gone(pid, below)


def _is_dvc(pid: int) -> bool:
    """A DVC process (``dvc``, ``python -m dvc``, a ``dvc exp`` queue worker): what runs a stage."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return pid > 1 and any(b"dvc" in os.path.basename(a) for a in argv[:3])


def proc_stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state, ppid, ... starttime at 19);
    [] where there is no such process (or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()  # "pid (comm) state ..."; comm may hold ") "
    except OSError:
        return []
    return stat.rsplit(")", 1)[1].split()


def _parent_of(pid: int) -> int:
    fields = proc_stat(pid)
    return int(fields[1]) if fields else 0


def _is_shell_wrapper(pid: int) -> bool:
    """``sh -c CMD`` (or bash, zsh, fish with DVC's options): a process that only runs ours."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    shells = {b"sh", b"dash", b"bash", b"zsh", b"ksh", b"fish"}
    return pid > 1 and os.path.basename(argv[0]) in shells and b"-c" in argv[1:]


def _term_when_gone(pid: int, below: int) -> None:
    """SIGTERM this process when ``pid`` (the parent of wrapper ``below``) exits."""
    import select
    import threading
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # gone already, or a kernel/Python without pidfds
        fd = None
    if _parent_of(below) != pid:  # the wrapper was re-parented: pid died (its number may be reused)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    if fd is None:
        return

    def wait() -> None:
        select.select([fd], [], [])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait, name="stop-with-parent", daemon=True).start()


_exit_code: list[int] = []


def exit_now(code: int) -> None:
    """End this process once its work is written and answered: Python's exit handlers run and the
    standard streams are flushed, but the interpreter's teardown of every loaded module and the
    C++ destructors of torch's libraries are skipped (seconds a stage or ``dvc repro`` would
    otherwise wait for nothing: docs/performance.md). The exit handlers run LIFO, so the one that
    ends the process is registered first (``end_after_exit_handlers``) and runs last."""
    _exit_code.append(code)
    sys.exit(code)


def end_after_exit_handlers() -> None:
    """Register, before anything else does, the exit handler that ``exit_now`` relies on."""
    atexit.register(_end)


def _end() -> None:
    if not _exit_code:
        return  # an ordinary exit: the interpreter tears down as usual
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(_exit_code[-1])  # os._exit is public, documented API: exit without teardown
