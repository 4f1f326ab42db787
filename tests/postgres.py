"""A throwaway PostgreSQL server for the tests: a new cluster in a temporary folder on 127.0.0.1.

Uses BATCHLAB_TEST_POSTGRES_URI when set (``.ci/run`` sets nothing: the tests start their own).
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def _bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    def __init__(self):
        self.uri = os.environ.get("BATCHLAB_TEST_POSTGRES_URI")
        self.data: str | None = None
        self.why_not = ""

    def _as_postgres(self, cmd: list[str]) -> subprocess.CompletedProcess:
        if os.geteuid() == 0:  # the server refuses to run as root
            # /usr/sbin is not on every PATH (a minimal CI environment's, for one)
            runuser = shutil.which("runuser", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin") or "runuser"
            cmd = [runuser, "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    def start(self) -> bool:
        if self.uri:
            return True
        initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
        if not (initdb and pg_ctl):
            self.why_not = "no PostgreSQL binaries (initdb, pg_ctl) on this machine"
            return False
        self.data = tempfile.mkdtemp(prefix="batchlab-pg-")
        if os.geteuid() == 0:
            shutil.chown(self.data, "postgres")
        port = _free_port()
        steps = [
            [initdb, "-D", self.data, "-A", "trust", "-U", "postgres"],
            [pg_ctl, "-D", self.data, "-l", f"{self.data}/log", "-w", "-o",
             f"-p {port} -k {self.data} -c listen_addresses=127.0.0.1", "start"],
        ]
        for cmd in steps:
            proc = self._as_postgres(cmd)
            if proc.returncode != 0:
                self.why_not = f"{Path(cmd[0]).name} failed: {proc.stderr.strip()[-500:]}"
                return False
        self.port = port
        self.uri = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        return True

    def stop(self) -> None:
        if self.data:
            self._as_postgres([_bin("pg_ctl"), "-D", self.data, "-m", "immediate", "stop"])
            shutil.rmtree(self.data, ignore_errors=True)
