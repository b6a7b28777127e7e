"""Per-request deadlines and the per-peer connection cap on the Twisted listeners (issue 9, item 4)."""
from __future__ import annotations

import struct

import pytest_twisted

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from medd.config import ConnectionLimits
from medd.transports.deadlines import PeerCappedFactory
from medd.transports.http import MeddSite
from medd.transports.smtp import PackageSMTPFactory
from medd.transports.tls import PackageFrameFactory
from twisted.internet.protocol import Factory, Protocol

LIMITS = ConnectionLimits(request_timeout=30, min_transfer_rate=50_000, max_connections_per_peer=32)


class _API:
    max_object_size = 1 << 20
    web_resources: dict = {}
    limits = LIMITS
    node_name = "central.test"

    def __init__(self):
        self.reactor = self.clock = Clock()
        self.received: list[bytes] = []

    def receive_package(self, data, **kw):
        """Taken in, never answered: the frame's deadline is the receiver's business alone."""
        from twisted.internet.defer import Deferred

        self.received.append(data)
        return Deferred()

    def receive_packages(self, frames, **kw):
        return [self.receive_package(frame, **kw) for frame in frames]


def _connect(factory, host="192.0.2.7"):
    protocol = factory.buildProtocol(IPv4Address("TCP", host, 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
    protocol.makeConnection(transport)
    return protocol, transport


def _drip(clock, protocol, transport, data: bytes, every: float) -> float:
    """Feed ``data`` one byte every ``every`` seconds until it ends or the connection is aborted; the time taken."""
    for byte in data:
        if transport.disconnecting or getattr(transport, "disconnected", False):
            break
        protocol.dataReceived(bytes([byte]))
        clock.advance(every)
    return clock.seconds()


def test_drip_fed_http_request_is_aborted_at_its_deadline():
    """A request drip-fed one byte a second is aborted 30 s after its first byte, although bytes keep arriving."""
    api = _API()
    site = MeddSite(api)
    channel, transport = _connect(site)
    request = b"POST /packages HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 100
    _drip(api.reactor, channel, transport, request, every=1)
    assert transport.disconnecting and transport.disconnected  # abortConnection
    assert 30 <= api.reactor.seconds() <= 32


def test_http_request_in_time_is_untouched():
    """A request received within its deadline is answered; its deadline is gone, so a long answer is not cut."""
    api = _API()
    channel, transport = _connect(MeddSite(api))
    channel.dataReceived(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
    assert not channel.deadline.running
    api.reactor.advance(29)
    assert not transport.disconnecting
    assert transport.value().startswith(b"HTTP/1.1 ")


def test_drip_fed_tls_frame_is_aborted_at_its_deadline():
    """A TLS frame declaring 1 MB and drip-fed a byte a second is aborted 30 s after its first byte:
    its bytes earn time at the minimum rate, its declared length earns none."""
    api = _API()
    receiver, transport = _connect(PackageFrameFactory(api))
    _drip(api.reactor, receiver, transport, struct.pack("!I", 1_000_000) + b"x" * 100, every=1)
    assert transport.disconnected
    assert 30 <= api.reactor.seconds() <= 32


def test_tls_frame_at_the_minimum_rate_is_not_cut():
    """A frame arriving at the minimum rate (its size over the rate, plus the grace) completes."""
    api = _API()
    receiver, transport = _connect(PackageFrameFactory(api))
    payload = b"y" * 500_000  # 10 s at 50 kB/s
    data = struct.pack("!I", len(payload)) + payload
    for i in range(0, len(data), 50_000):
        receiver.dataReceived(data[i:i + 50_000])
        api.reactor.advance(3)  # 30 s in all: slower than the rate, within the grace
    assert api.received == [payload]
    api.reactor.advance(120)  # the frame is in: its deadline ended with it (the receiver's own stringReceived)
    assert not transport.disconnected


def test_drip_fed_smtp_command_line_is_aborted_at_its_deadline():
    """An SMTP command drip-fed one byte every 10 s (Twisted's idle timer restarts on each) is aborted
    30 s after its first byte."""
    api = _API()
    smtp, transport = _connect(PackageSMTPFactory(api))
    assert transport.value().startswith(b"220 ")
    _drip(api.reactor, smtp, transport, b"EHLO attacker.example" + b"x" * 100 + b"\r\n", every=10)
    assert transport.disconnected
    assert 30 <= api.reactor.seconds() <= 40


def test_drip_fed_smtp_message_is_aborted_at_its_deadline():
    """After DATA, a message drip-fed one byte a second is aborted 30 s after DATA, though lines keep coming."""
    api = _API()
    smtp, transport = _connect(PackageSMTPFactory(api))
    for line in (b"EHLO centre-a.example", b"MAIL FROM:<ct1@centre-a.example>", b"RCPT TO:<central@central.test>",
                 b"DATA"):
        smtp.dataReceived(line + b"\r\n")
    assert b"\r\n354 " in transport.value()
    started = api.reactor.seconds()
    _drip(api.reactor, smtp, transport, b"X-Drip: 1\r\n" * 100, every=1)
    assert transport.disconnected
    assert 30 <= api.reactor.seconds() - started <= 32
    assert api.received == []


class _Silent(Protocol):
    pass


def test_a_peer_past_its_cap_is_closed_at_once():
    """The 33rd connection from one address is refused (Twisted closes it); another address still connects,
    and once one of the 32 closes the peer may connect again."""
    factory = PeerCappedFactory(Factory.forProtocol(_Silent), max_per_peer=32, label="http")
    protocols = [_connect(factory)[0] for _ in range(32)]
    assert factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40001)) is None
    assert factory.buildProtocol(IPv4Address("TCP", "192.0.2.8", 40001)) is not None
    protocols[0].connectionLost(None)
    assert factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40002)) is not None


def _stall(port: int, host: str = "127.0.0.1", source: str = "127.0.0.2"):
    """A connection that sends 3 bytes of a PDU header and then nothing (from another loopback address)."""
    import socket

    s = socket.create_connection((host, port), timeout=10, source_address=(source, 0))
    s.sendall(b"\x01\x00\x00")
    return s


def _closed_within(sock, seconds: float) -> bool:
    """True if the peer closes ``sock`` within ``seconds`` (waiting on the socket, not sleeping)."""
    import select
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], deadline - time.monotonic())
        if ready:
            try:
                if sock.recv(4096) == b"":
                    return True
            except OSError:
                return True
    return False


@pytest_twisted.ensureDeferred
async def test_stalled_dicom_connections_neither_block_a_modality_nor_stay_open(make_central):
    """32 connections that each send 3 bytes of a PDU header and wait do not stop a modality from
    storing, and with [dicom] timeout = 1 the node drops every one of them."""
    from twisted.internet.threads import deferToThread

    from tests.conftest import listener_port
    from tests.test_dicom_receiver import _send

    node = await make_central({"dicom": "tcp:0:interface=0.0.0.0"}, extra="[dicom]\nae_title = MEDD\ntimeout = 1\n")
    port = listener_port(node, "dicom")
    stalled = [_stall(port) for _ in range(32)]
    try:
        from pydicom.data import get_testdata_file

        assert await deferToThread(_send, port, [get_testdata_file("CT_small.dcm")]) == [0]
        closed = await deferToThread(lambda: [_closed_within(s, 15) for s in stalled])
        assert all(closed), f"{closed.count(False)} stalled connections still open"
    finally:
        for s in stalled:
            s.close()


def _echo_from(port: int, source: str) -> int | None:
    """The status of a C-ECHO over an association from ``source`` (None if the association failed)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDD", bind_address=(source, 0))
    if not assoc.is_established:
        return None
    try:
        return assoc.send_c_echo().Status
    finally:
        assoc.release()


def _eventually(check, seconds: float = 30.0) -> bool:
    """True as soon as ``check()`` is; False if it is still not after ``seconds`` (a generous bound)."""
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


@pytest_twisted.ensureDeferred
async def test_a_dicom_peer_stalled_mid_pdu_is_dropped_and_its_slots_are_free_again(make_central):
    """With [limits] request_timeout = 1 and [dicom] timeout = 60, two connections that stall in their
    first PDU's header (the peer's cap is 2) are dropped, their associations end and the peer's slots are
    free again (a C-ECHO from it succeeds) long before [dicom] timeout: the association waiting for its
    A-ASSOCIATE-RQ no longer keeps its threads and slot until its ACSE timeout."""
    from twisted.internet.threads import deferToThread

    from tests.conftest import listener_port

    node = await make_central({"dicom": "tcp:0:interface=0.0.0.0"},
                              extra="[limits]\nrequest_timeout = 1\nmax_connections_per_peer = 2\n"
                                    "[dicom]\nae_title = MEDD\ntimeout = 60\n")
    port = listener_port(node, "dicom")
    server = node.getServiceNamed("listen-dicom").server
    source = "127.0.0.3"

    def held() -> int:
        return server.slots(source) + sum(1 for a in server.active_associations if a.requestor.address == source)

    stalled = [_stall(port, source=source) for _ in range(2)]
    try:
        assert await deferToThread(_eventually, lambda: server.slots(source) == 2)
        closed = await deferToThread(lambda: [_closed_within(s, 30) for s in stalled])
        assert all(closed), f"{closed.count(False)} stalled connections still open"
        assert await deferToThread(_eventually, lambda: held() == 0), (server.slots(source), held())
        assert await deferToThread(_echo_from, port, source) == 0
        assert await deferToThread(_eventually, lambda: held() == 0)
    finally:
        for s in stalled:
            s.close()


@pytest_twisted.ensureDeferred
async def test_simultaneous_dicom_connects_do_not_overshoot_the_per_peer_cap(make_central):
    """Twelve connections from one address at once against a cap of 3: the slots are counted at accept,
    so exactly 3 stay open and the other 9 are closed at once (counting running associations let a
    burst through before their threads started)."""
    import socket
    import threading

    from twisted.internet.threads import deferToThread

    from tests.conftest import listener_port

    node = await make_central({"dicom": "tcp:0:interface=0.0.0.0"},
                              extra="[limits]\nmax_connections_per_peer = 3\n[dicom]\nae_title = MEDD\ntimeout = 60\n")
    port = listener_port(node, "dicom")
    server = node.getServiceNamed("listen-dicom").server
    source = "127.0.0.4"
    start = threading.Barrier(12)

    def connect() -> socket.socket:
        start.wait()
        return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))

    def burst() -> list[socket.socket]:
        out: list = []
        threads = [threading.Thread(target=lambda: out.append(connect())) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    sockets = await deferToThread(burst)
    try:
        # The refused ones see end of file at once; the admitted ones say nothing and are kept ([dicom] timeout).
        assert await deferToThread(_eventually, lambda: _refused(sockets) == 9), (_refused(sockets), server.slots(source))
        assert server.slots(source) == 3
        assert _refused(sockets) == 9
    finally:
        for s in sockets:
            s.close()


def _refused(sockets) -> int:
    """How many of ``sockets`` the peer has closed (end of file waiting), without reading the others' data away."""
    import socket as _socket

    count = 0
    for s in sockets:
        s.settimeout(0)
        try:
            if s.recv(1, _socket.MSG_PEEK | _socket.MSG_DONTWAIT) == b"":
                count += 1
        except BlockingIOError:
            pass
        except OSError:
            count += 1
    return count


@pytest_twisted.ensureDeferred
async def test_stalled_connections_on_every_listener_neither_block_a_modality_nor_stay_open(make_central, tmp_path):
    """The short version of bench/stalled (issue 9, "200 stalled connections while a modality stores"):
    20 connections on each of the DICOM, HTTP, TLS socket and SMTP listeners, each stopped partway through
    its first unit (a PDU header, request headers, a TLS record header, an SMTP command line), do not stop
    a modality storing, and under [limits] request_timeout = 1 every one of them is closed (DICOM too,
    though its [dicom] timeout is 60)."""
    import socket

    from twisted.internet.threads import deferToThread

    from medd.tlscert import make_self_signed
    from tests.conftest import listener_port
    from tests.test_dicom_receiver import _send

    cert, key = tmp_path / "node.pem", tmp_path / "node.key"
    make_self_signed(cert, key)
    loopback = "tcp:0:interface=127.0.0.1"
    node = await make_central({"dicom": "tcp:0:interface=0.0.0.0", "http": loopback, "tls": loopback, "smtp": loopback},
                              extra=f"[tls]\ncertificate = {cert}\nprivate_key = {key}\n"
                                    "[limits]\nrequest_timeout = 1\n[dicom]\nae_title = MEDD\ntimeout = 60\n")
    partial = {"dicom": b"\x01\x00\x00", "http": b"POST /packages HTTP/1.1\r\nHost: central\r\n",
               "tls": b"\x16\x03\x01", "smtp": b"EHLO centre-a.example"}

    def stall_all() -> list:
        out = []
        for key, data in partial.items():
            for _ in range(20):
                s = socket.create_connection(("127.0.0.1", listener_port(node, key)), timeout=30,
                                             source_address=("127.0.0.5", 0))
                s.sendall(data)
                out.append(s)
        return out

    stalled = await deferToThread(stall_all)
    try:
        from pydicom.data import get_testdata_file

        files = [get_testdata_file(n) for n in ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm")]
        assert await deferToThread(_send, listener_port(node, "dicom"), files) == [0, 0, 0]
        closed = await deferToThread(lambda: [_closed_within(s, 30) for s in stalled])
        assert all(closed), f"{closed.count(False)} stalled connections still open"
    finally:
        for s in stalled:
            s.close()
