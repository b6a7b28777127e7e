"""Store-and-forward against a real central that dies: central runs as a twistd subprocess, a modality
C-STOREs 50 objects into the gateway and SIGKILLs central after the 10th, the gateway retries several
times while central is gone, central starts again on the same port, and then all 50 objects are on
central exactly once (issue 8, "How it is checked")."""
from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest_twisted
from pynetdicom import AE
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

from tests.conftest import listener_port, write_config
from tests.test_gateway import central_extra, datasets, gateway_extra, pki  # noqa: F401  (pki is a fixture)

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
LISTENING = re.compile(r"tls listening on 127\.0\.0\.1:(\d+)")


class CentralProcess:
    """A central node as ``twistd -n medd`` in its own process; its log goes to a file."""

    def __init__(self, folder: Path, certs, port: int = 0):
        folder.mkdir(exist_ok=True)
        self.folder = folder
        self.ini = write_config(folder, {"tls": f"tcp:{port}:interface=127.0.0.1"}, central_extra(certs),
                                name="central.test")
        self.log_path = folder / f"twistd-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen([TWISTD, "-n", "--pidfile=", "medd", "--config", str(self.ini)],
                                     stdout=self._log, stderr=subprocess.STDOUT, cwd=folder)

    def wait_listening(self, timeout: float = 20) -> int:
        """Blocking: the TLS port, once the log says the node listens. A real process is polled (deadline)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = LISTENING.search(self.log_path.read_text())
            if found:
                return int(found.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"central did not listen within {timeout}s:\n{self.log_path.read_text()}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()

    def objects(self) -> tuple[int, int]:
        """(objects, distinct SOP Instance UIDs) in central's own SQLite, read directly."""
        with sqlite3.connect(self.folder / "index.sqlite") as db:
            return db.execute("SELECT count(*), count(distinct sop_instance_uid) FROM objects").fetchone()


def send_killing_central(port: int, dss: list, central: CentralProcess, after: int) -> list[int]:
    """Blocking: one association, one C-STORE per dataset; central is SIGKILLed after ``after`` of them."""
    ae = AE(ae_title="CT1")
    ae.add_requested_context(dss[0].SOPClassUID, dss[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="GATEWAY")
    assert assoc.is_established
    statuses = []
    try:
        for n, ds in enumerate(dss, 1):
            statuses.append(assoc.send_c_store(ds).Status)
            if n == after:
                central.kill()
    finally:
        assoc.release()
    return statuses


@pytest_twisted.ensureDeferred
async def test_central_sigkilled_while_a_modality_sends(make_central, pki, tmp_path):  # noqa: F811
    """SIGKILL central mid-stream: the gateway acknowledges every C-STORE, retries with backoff on its clock
    while central is gone, and once central is back on the same port all 50 objects are there once each."""
    central = await deferToThread(CentralProcess, tmp_path / "central", pki)
    restarted = None
    try:
        port = await deferToThread(central.wait_listening)
        clock = Clock()
        clock.advance(1_000_000)
        gateway = await make_central({"dicom": "tcp:0:interface=127.0.0.1"}, extra=gateway_extra(pki, port),
                                     site="gateway", role="gateway", name="gateway.centre-a.test", clock=clock)
        forwarder = gateway.gateway.forwarder
        dss = datasets(50)
        statuses = await deferToThread(send_killing_central, listener_port(gateway, "dicom"), dss, central, 10)
        assert statuses == [0] * 50
        await forwarder.idle()

        # Central is gone: every attempt the clock allows fails and is retried later, nothing is lost.
        head = await gateway.forwarding.head_of_line()
        first_attempts = head.attempts
        for _ in range(3):
            clock.advance(8)
            await forwarder.idle()
        head = await gateway.forwarding.head_of_line()
        assert head.attempts >= first_attempts + 3 and head.attempts >= 3, head
        waiting = (await gateway.forwarding.spooled())[0]
        assert waiting > 0

        restarted = await deferToThread(CentralProcess, tmp_path / "central", pki, port)
        assert await deferToThread(restarted.wait_listening) == port
        clock.advance(8)
        await forwarder.idle()
        assert await gateway.forwarding.spooled() == (0, 0)
        assert await deferToThread(restarted.objects) == (50, 50)
    finally:
        await deferToThread(central.stop)
        if restarted is not None:
            await deferToThread(restarted.stop)
