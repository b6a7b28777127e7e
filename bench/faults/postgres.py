"""A private PostgreSQL cluster for the campaign (initdb under a temporary folder, its own port,
run as the ``postgres`` user), so that the server can be crashed and restarted without touching
anyone else's; and the two faults: terminating the node's backends, restarting the server."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def _tool(name: str) -> str:
    found = shutil.which(name) or next((str(p) for p in Path("/usr/lib/postgresql").glob(f"*/bin/{name}")), None)
    if found is None:
        raise RuntimeError(f"{name} not found (PostgreSQL server binaries)")
    return found


class PrivatePostgres:
    def __init__(self, user: str = "postgres"):
        # Its own folder under the system's temporary one: the server's user must reach it, and
        # may not reach the caller's (a pytest tmp_path is private to root).
        self.folder, self.user = Path(tempfile.mkdtemp(prefix="medd-faults-pg-")), user
        self.data = self.folder / "data"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"postgresql+psycopg2://{user}@127.0.0.1:{self.port}/postgres"

    def _as_user(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        run_as = ["runuser", "-u", self.user, "--"] if os.geteuid() == 0 else []
        return subprocess.run([*run_as, *cmd], capture_output=True, text=True, check=check)

    def start(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.folder, self.user)
        self._as_user(_tool("initdb"), "-D", str(self.data), "-A", "trust", "-U", self.user, "--no-sync")
        self._ctl("start", "-w", "-o", f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
                                      "-c fsync=on -c max_connections=100", "-l", str(self.folder / "pg.log"))

    def _ctl(self, *args: str) -> None:
        self._as_user(_tool("pg_ctl"), "-D", str(self.data), *args)

    def restart(self) -> float:
        """A crash and restart of the server (immediate shutdown: no checkpoint); seconds it was away."""
        t0 = time.monotonic()
        self._ctl("restart", "-w", "-m", "immediate", "-l", str(self.folder / "pg.log"))
        return time.monotonic() - t0

    def terminate_backends(self) -> int:
        """pg_terminate_backend on every client connection but this one; how many."""
        out = self._as_user(_tool("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "-At", "-c",
                            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()")
        return int(out.stdout.strip() or 0)

    def stop(self) -> None:
        self._as_user(_tool("pg_ctl"), "-D", str(self.data), "stop", "-m", "immediate", check=False)
        shutil.rmtree(self.folder, ignore_errors=True)
