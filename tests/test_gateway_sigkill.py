"""Store-and-forward against a real central that dies: central runs as a twistd subprocess, a modality
C-STOREs 50 objects into the gateway and SIGKILLs central after the 10th, the gateway retries several
times while central is gone, central starts again on the same ports, and then all 50 objects are on
central exactly once; a pull viewer gets each once, the reading room opens them, and central and the
gateway's receipts show each delivered, then opened by that radiologist (issue 8, "How it is checked")."""
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
from tests.test_gateway import GATEWAY_ADDRESS, central_extra, datasets, gateway_extra, pki  # noqa: F401  (pki is a fixture)
from tests.test_receipts import RADIOLOGIST
from tests.test_routing import FAST
from tests.test_viewer import LOOPBACK, VIEWER, _fake_clock, _viewer_extra

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
LISTENING = re.compile(r"(tls|http) listening on 127\.0\.0\.1:(\d+)")
MEDD = os.path.join(os.path.dirname(sys.executable), "medd")


class CentralProcess:
    """A central node as ``twistd -n medd`` in its own process; its log goes to a file."""

    def __init__(self, folder: Path, certs, ports: dict[str, int] | None = None):
        folder.mkdir(exist_ok=True)
        self.folder = folder
        ports = ports or {"tls": 0, "http": 0}
        self.ini = write_config(folder, {k: f"tcp:{p}:interface=127.0.0.1" for k, p in ports.items()},
                                central_extra(certs) + FAST, name="central.test")
        self.proc = None

    def medd(self, *args: str) -> str:
        """Blocking: ``medd ARGS --config <ini>`` against this central's database; its last output line."""
        done = subprocess.run([MEDD, *args, "--config", str(self.ini)], capture_output=True, text=True, check=True)
        return done.stdout.strip().splitlines()[-1]

    def start(self) -> "CentralProcess":
        self.log_path = self.folder / f"twistd-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen([TWISTD, "-n", "--pidfile=", "medd", "--config", str(self.ini)],
                                     stdout=self._log, stderr=subprocess.STDOUT, cwd=self.folder)
        return self

    def wait_listening(self, timeout: float = 20) -> dict[str, int]:
        """Blocking: the TLS and HTTP ports, once the log says the node listens on both. A real process is
        polled (deadline)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = dict((k, int(p)) for k, p in LISTENING.findall(self.log_path.read_text()))
            if len(found) == 2:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"central did not listen within {timeout}s:\n{self.log_path.read_text()}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None:
            return
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

    def delivery_states(self, destination: str) -> dict[str, str]:
        """uid -> state of every object delivery to ``destination``, read from central's SQLite."""
        with sqlite3.connect(self.folder / "index.sqlite") as db:
            return dict(db.execute("SELECT uid, state FROM deliveries WHERE destination = ? AND status IS NULL",
                                   (destination,)).fetchall())

    def opened_by(self, uid: str) -> str:
        """Blocking: who opened ``uid``, as `medd track UID --json` on central says."""
        done = subprocess.run([MEDD, "track", uid, "--json", "--config", str(self.ini)], capture_output=True,
                              text=True, check=True)
        return done.stdout


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
    while central is gone, and once central is back on the same ports all 50 objects are there once each;
    the viewer pulls each once, and after the radiologist opened them central and the gateway's receipts
    say delivered and opened (by whom) for every one of the 50."""
    central = CentralProcess(tmp_path / "central", pki)
    centre_token = await deferToThread(central.medd, "centres", "add", "centre-a", "--address", GATEWAY_ADDRESS,
                                       "--token")
    viewer_token = await deferToThread(central.medd, "viewers", "add", VIEWER, "--pull", "--authorise", "centre-a")
    await deferToThread(central.medd, "routes", "add", "--centre", "centre-a", "--to", VIEWER)
    restarted = None
    try:
        ports = await deferToThread(central.start().wait_listening)
        clock = Clock()
        clock.advance(1_000_000)
        outbox = f"outbox = http://127.0.0.1:{ports['http']}\ntoken = {centre_token}\npoll_interval = 60\n"
        gateway = await make_central({"dicom": "tcp:0:interface=127.0.0.1"},
                                     extra=gateway_extra(pki, ports["tls"], outbox),
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

        restarted = CentralProcess(tmp_path / "central", pki, ports)
        assert await deferToThread(restarted.start().wait_listening) == ports
        clock.advance(8)
        await forwarder.idle()
        assert await gateway.forwarding.spooled() == (0, 0)
        assert await deferToThread(restarted.objects) == (50, 50)

        # A pull viewer takes every one once; the radiologist opens them all.
        uids = {ds.SOPInstanceUID for ds in dss}
        viewer = await make_central({"http": LOOPBACK}, extra=_viewer_extra(ports["http"], viewer_token),
                                    site="viewer", role="viewer", name=VIEWER, clock=_fake_clock())
        stored = set()
        deadline = time.monotonic() + 60  # central (a real process) routes on its own clock
        while stored != uids and time.monotonic() < deadline:
            pulled = await viewer.viewer.requestor.kick()
            assert pulled.error is None, pulled
            stored = {uid for uid in uids if await viewer.index.object_by_uid(uid) is not None}
        assert stored == uids
        for uid in sorted(uids):
            await viewer.reading_room.opened(uid, RADIOLOGIST)
        await viewer.viewer.outgoing.kick()
        states = await deferToThread(restarted.delivery_states, VIEWER)
        assert states == {uid: "opened" for uid in uids}

        # The gateway's receipts say the same for each of the 50.
        events: dict[str, set] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            back = await gateway.gateway.requestor.kick()
            assert back.error is None, back
            events = {uid: {(r.event, r.user) for r in await gateway.forwarding.receipts_of(uid)} for uid in uids}
            if all({("delivered", None), ("opened", RADIOLOGIST)} <= e for e in events.values()):
                break
        assert all({("received", None), ("routed", None), ("delivered", None), ("opened", RADIOLOGIST)} <= e
                   for e in events.values()), events
    finally:
        await deferToThread(central.stop)
        if restarted is not None:
            await deferToThread(restarted.stop)
