"""The fault campaign's nodes: central, a pull viewer, a push viewer and a gateway, each a real
``twistd -n medd`` child process on loopback, restarted on the ports it first took."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from medd.tlscert import issue_client_certificate, make_self_signed

BIN = os.path.dirname(sys.executable)
LISTENING = re.compile(r"(\w+) listening on 127\.0\.0\.1:(\d+)")
CENTRAL = "central.faults.test"
CENTRE = "centre-a"
CENTRE_ADDRESS = "gw@centre-a.faults.test"
PULL_VIEWER = "pull@viewers.faults.test"
PUSH_VIEWER = "push@viewers.faults.test"
PUSH_TOKEN = "p" * 40
#: Every node started, so that the campaign kills all of them however it ends: a node left running
#: on a folder the next run reuses would sweep that run's blobs against its own (old) database.
STARTED: list["Node"] = []


class Pki:
    """Central's certificate (also the CA of client certificates) and the centre's client certificate."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.cert, self.key = folder / "central.pem", folder / "central.key"
        make_self_signed(self.cert, self.key)
        pem, _ = issue_client_certificate(self.cert.read_bytes(), self.key.read_bytes(), CENTRE_ADDRESS)
        self.client = folder / "centre-a.pem"
        self.client.write_bytes(pem)


class Node:
    """One node in ``folder``: ``listen`` keys start on port 0 and keep the port they got for every
    restart; ``sections`` is the rest of its INI (a callable, so it can name other nodes' ports)."""

    def __init__(self, name: str, role: str, folder: Path, listen: tuple[str, ...], sections, db_url: str | None = None,
                 store: Path | None = None):
        self.name, self.role, self.folder = name, role, folder
        folder.mkdir(parents=True, exist_ok=True)
        self.ports = {key: 0 for key in listen}
        self.sections = sections
        self.db_path = folder / "index.sqlite"
        self.db_url = db_url or f"sqlite:///{self.db_path}"
        self.store = store or folder / "store"
        self.ini = folder / f"{role}.ini"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def write_ini(self) -> None:
        listen = "".join(f"{k} = tcp:{p}:interface=127.0.0.1\n" for k, p in self.ports.items())
        self.ini.write_text(textwrap.dedent(f"""\
            [node]
            role = {self.role}
            name = {self.name}
            [database]
            url = {self.db_url}
            [storage]
            path = {self.store}
            """) + self.sections() + "\n[listen]\n" + listen)

    def medd(self, *args: str) -> str:
        """Blocking: ``medd ARGS --config <ini>``; its last output line."""
        done = subprocess.run([os.path.join(BIN, "medd"), *args, "--config", str(self.ini)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise RuntimeError(f"medd {' '.join(args)}: {done.stderr}")
        return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 240) -> float:
        """Blocking: start twistd and wait until every listener is up; the seconds that took. The first
        start fixes the ports."""
        self.write_ini()
        self.starts += 1
        self.log_path = self.folder / f"twistd-{self.starts}.log"
        t0 = time.monotonic()
        with self.log_path.open("w") as out:
            self.proc = subprocess.Popen([os.path.join(BIN, "twistd"), "-n", "--pidfile=", "medd",
                                          "--config", str(self.ini)], stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.folder)
        STARTED.append(self)
        while time.monotonic() - t0 < timeout:
            found = {k: int(p) for k, p in LISTENING.findall(self.log_path.read_text(errors="replace"))}
            if all(k in found for k in self.ports):
                if all(p == 0 for p in self.ports.values()):
                    self.ports = {k: found[k] for k in self.ports}
                return time.monotonic() - t0
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"{self.name} did not listen:\n{self.log_path.read_text(errors='replace')[-4000:]}")

    def kill(self) -> None:
        """SIGKILL our own child, by PID."""
        if self.running:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    @staticmethod
    def kill_all() -> None:
        for node in STARTED:
            node.kill()
        STARTED.clear()

    def url(self, key: str = "http") -> str:
        return f"http://127.0.0.1:{self.ports[key]}"


def central_node(folder: Path, pki: Pki, db_url: str | None = None, store: Path | None = None,
                 delivery: str = "") -> Node:
    def sections() -> str:
        return textwrap.dedent(f"""\
            sweep_interval = 2
            sweep_grace = 5
            [dicom]
            ae_title = MEDD
            [tls]
            certificate = {pki.cert}
            private_key = {pki.key}
            client_ca = {pki.cert}
            [push]
            http_token = {PUSH_TOKEN}
            [delivery]
            route_delay = 0.05
            poll_interval = 0.5
            """) + (delivery or "retry_base = 0.2\nretry_multiplier = 2\nretry_max_delay = 1\nmax_attempts = 100000\n")
    return Node(CENTRAL, "central", folder, ("dicom", "http", "smtp", "tls"), sections, db_url, store)


def viewer_node(folder: Path, name: str, central: Node, token_of) -> Node:
    """A viewer; ``token_of()`` is its token on central (known once it is registered)."""
    def sections() -> str:
        return textwrap.dedent(f"""\
            sweep_interval = 2
            sweep_grace = 5
            [central]
            url = {central.url()}
            token = {token_of()}
            push_token = {PUSH_TOKEN}
            poll_interval = 0.3
            retry_base = 0.1
            retry_max_delay = 1
            timeout = 10
            """)
    return Node(name, "viewer", folder, ("http",), sections)


def gateway_node(folder: Path, central: Node, pki: Pki) -> Node:
    def sections() -> str:
        return textwrap.dedent(f"""\
            sweep_interval = 2
            sweep_grace = 5
            [dicom]
            ae_title = GATEWAY
            [gateway]
            address = {CENTRE_ADDRESS}
            central = tls://127.0.0.1:{central.ports['tls']}
            central_name = {CENTRAL}
            ca = {pki.cert}
            client_cert = {pki.client}
            retry_base = 0.2
            retry_max_delay = 1
            """)
    return Node("gateway.centre-a.faults.test", "gateway", folder, ("dicom",), sections)
