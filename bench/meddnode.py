"""What the benchmarks share: a fresh medd central run by twistd as a child
process, and the small process and port helpers around it."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = "127.0.0.1"
VENV_BIN = os.path.join(REPO, ".venv", "bin")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def dcmtk_tool(name: str) -> str:
    """The DCMTK binary, not pynetdicom's console script of the same name
    (which a venv on PATH would put first)."""
    for candidate in (f"/usr/bin/{name}", shutil.which(name)):
        if candidate and os.path.exists(candidate):
            out = subprocess.run([candidate, "--version"], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT).stdout.decode(errors="replace")
            if "dcmtk" in out.lower():
                return candidate
    raise SystemExit(f"DCMTK {name} not found (apt-get install dcmtk)")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def pinned(cpus: set[int] | None):
    """A Popen ``preexec_fn`` that keeps the child (and every thread it starts) on ``cpus``."""
    return None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class MeddCentral:
    """A fresh central node in its own folder (SQLite index, blob store), run by
    ``twistd -n --pidfile= medd --config <ini>`` with the shipped defaults plus
    ``listen`` ({key: port}) and any ``extra`` INI text."""

    def __init__(self, work: str, listen: dict[str, int], extra: str = "", bin_dir: str = VENV_BIN):
        self.work, self.listen, self.extra, self.bin_dir = work, listen, extra, bin_dir
        self.db = os.path.join(work, "index.sqlite")
        self.ini = os.path.join(work, "central.ini")
        self.proc: subprocess.Popen | None = None
        self.cpus: set[int] | None = None  # run on these CPUs only (os.sched_setaffinity), e.g. to stand for a host of its own

    def write_config(self) -> None:
        if os.path.exists(self.work):
            shutil.rmtree(self.work)
        os.makedirs(self.work)
        listen = "\n".join(f"{key} = tcp:{port}:interface={HOST}" for key, port in self.listen.items())
        with open(self.ini, "w") as f:
            f.write(textwrap.dedent(f"""\
                [node]
                role = central
                name = central.bench
                [database]
                url = sqlite:///{self.db}
                [storage]
                path = {self.work}/store
                [dicom]
                ae_title = MEDD
                [listen]
                """) + listen + "\n" + textwrap.dedent(self.extra))

    def cli(self, *args: str) -> str:
        """Run ``medd ARGS --config <ini>``; its stdout."""
        p = subprocess.run([os.path.join(self.bin_dir, "medd"), *args, "--config", self.ini], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if p.returncode != 0:
            raise SystemExit(f"medd {' '.join(args)} failed: {p.stderr}")
        return p.stdout

    def start(self) -> None:
        """Start twistd (write the config first) and wait until every listener accepts."""
        for key, port in self.listen.items():
            if port_open(port):
                raise SystemExit(f"port {port} ({key}) is already in use; pick another with the script's options")
        with open(os.path.join(self.work, "twistd.log"), "ab") as logf:
            self.proc = subprocess.Popen([os.path.join(self.bin_dir, "twistd"), "-n", "--pidfile=", "medd",
                                          "--config", self.ini],
                                         cwd=REPO, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         preexec_fn=pinned(self.cpus))
        t0 = time.monotonic()
        while not all(port_open(port) for port in self.listen.values()):
            if self.proc.poll() is not None:
                raise SystemExit(f"medd exited early (rc={self.proc.returncode}); see {self.work}/twistd.log")
            if time.monotonic() - t0 > 60:
                raise SystemExit("medd did not open its ports within 60 s")
            time.sleep(0.05)

    def query(self, sql: str) -> list[tuple]:
        with sqlite3.connect(self.db) as conn:
            return conn.execute(sql).fetchall()

    def stored_count(self) -> int:
        return self.query("SELECT count(*) FROM objects")[0][0]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # our own child, by PID
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
