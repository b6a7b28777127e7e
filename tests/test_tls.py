"""The TLS socket transport on loopback: a plain Python ssl client and medd's own client."""
from __future__ import annotations

import json
import socket
import ssl
import struct

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher

from medd.config import ConnectionLimits
from medd.ingest import Refused, StoreFailed, Stored
from medd.config import ConfigError, load_config
from medd.objects import parse_part10
from medd.package import AttachmentId, build_package
from medd.plugins.objecttypes import ImageType
from medd.storage import index
from medd.tlscert import make_self_signed
from medd.transports.tls import PackageFrameReceiver, TransferIncomplete, send_packages
from tests import conftest
from tests.conftest import listener_port, write_config

LISTEN = {"tls": "tcp:0:interface=127.0.0.1"}
ORIGIN = "ct1@centre-a.example"


@pytest.fixture
def server_tls(tmp_path):
    """A self-signed server certificate; (cert path, [tls] config section)."""
    cert, key = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    make_self_signed(cert, key)
    return cert, f"[tls]\ncertificate = {cert}\nprivate_key = {key}\n"


def ct_content():
    return parse_part10(conftest.testdata("CT_small.dcm"))


def image_package(content=None, *, attachment: AttachmentId | None = None, message_id: str | None = None) -> bytes:
    content = content or ct_content()
    return build_package(
        content,
        attachment or ImageType().identifier(content),
        origin=ORIGIN,
        destination="viewer1@central.test",
        message_id=message_id,
    )


def _recv_exact(sock, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def _read_reply(sock) -> dict | None:
    """One reply frame, or None at end of stream."""
    header = _recv_exact(sock, 4)
    if header is None:
        return None
    (length,) = struct.unpack(">I", header)
    return json.loads(_recv_exact(sock, length))


def ssl_exchange(port: int, cafile, steps) -> list:
    """Blocking: one TLS connection with the standard library's ssl module.

    ``steps`` is a list of ("send", [frames]) and ("read", n) items; each read
    collects n replies (None once the server has closed the stream).
    """
    ctx = ssl.create_default_context(cafile=str(cafile))
    # The timeout only keeps a broken server from hanging the suite.
    with socket.create_connection(("127.0.0.1", port), timeout=60) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with ctx.wrap_socket(raw, server_hostname="localhost") as sock:
            replies = []
            for what, arg in steps:
                if what == "send":
                    sock.sendall(b"".join(struct.pack(">I", len(f)) + f for f in arg))
                else:
                    replies.extend(_read_reply(sock) for _ in range(arg))
            return replies


async def nothing_stored(node, uid: str | None = None) -> bool:
    rows = await node.database.run(index.count_objects)
    blobs = [p for p in (node.config.storage_path / "blobs").rglob("*") if p.is_file()]
    if uid is not None:
        assert await node.database.run(lambda c: index.object_by_uid(c, uid)) is None
    return rows == 0 and not blobs


@pytest_twisted.ensureDeferred
async def test_ack_means_indexed_and_on_disk(make_central, server_tls):
    """An "ok" reply carries the Message-ID and UID, and by then the object is indexed and its blob is on disk."""
    cert, extra = server_tls
    node = await make_central(LISTEN, extra=extra)
    port = listener_port(node, "tls")
    content = ct_content()
    package = image_package(content, message_id="<one@centre-a.example>")

    (reply,) = await deferToThread(ssl_exchange, port, cert, [("send", [package]), ("read", 1)])

    uid = content.keyinfo.sop_instance_uid
    assert reply == {"status": "ok", "message_id": "<one@centre-a.example>", "uid": uid, "object_type": "image", "created": True}
    record = await node.database.run(lambda c: index.object_by_uid(c, uid))
    assert record is not None
    assert record.transport == "tls"
    assert record.origin == ORIGIN
    assert node.blobs.path(record.digest).read_bytes() == content.data


@pytest_twisted.ensureDeferred
async def test_resend_is_ok_and_idempotent(make_central, server_tls):
    """Resending a package is acknowledged again (created false) and leaves one row and one blob."""
    cert, extra = server_tls
    node = await make_central(LISTEN, extra=extra)
    port = listener_port(node, "tls")
    package = image_package()

    first = await send_packages(reactor, "127.0.0.1", port, [package], ca_pem=cert.read_bytes())
    second = await send_packages(reactor, "127.0.0.1", port, [package], ca_pem=cert.read_bytes())

    assert [r["status"] for r in first + second] == ["ok", "ok"]
    assert (first[0]["created"], second[0]["created"]) == (True, False)
    assert await node.database.run(index.count_objects) == 1
    assert len([p for p in (node.config.storage_path / "blobs").rglob("*") if p.is_file()]) == 1


@pytest_twisted.ensureDeferred
async def test_pipelined_frames_answered_in_order(make_central, server_tls):
    """Frames sent back to back without waiting get one reply each, in the order sent, good and bad mixed."""
    cert, extra = server_tls
    node = await make_central(LISTEN, extra=extra)
    port = listener_port(node, "tls")
    names = ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm"]
    contents = [parse_part10(conftest.testdata(n)) for n in names]
    packages = [image_package(c, message_id=f"<{i}@centre-a.example>") for i, c in enumerate(contents)]
    frames = [packages[0], b"not a package", packages[1], packages[2]]

    replies = await send_packages(reactor, "127.0.0.1", port, frames, ca_pem=cert.read_bytes())

    assert [r["status"] for r in replies] == ["ok", "refused", "ok", "ok"]
    good = [r for r in replies if r["status"] == "ok"]
    assert [r["uid"] for r in good] == [c.keyinfo.sop_instance_uid for c in contents]
    assert [r["message_id"] for r in good] == [f"<{i}@centre-a.example>" for i in range(3)]
    # The same through a plain ssl client that writes all frames in one go.
    replies = await deferToThread(ssl_exchange, port, cert, [("send", list(reversed(packages))), ("read", 3)])
    assert [r["uid"] for r in replies] == [c.keyinfo.sop_instance_uid for c in reversed(contents)]
    assert [r["created"] for r in replies] == [False, False, False]


@pytest_twisted.ensureDeferred
async def test_lying_header_refused_then_connection_still_usable(make_central, server_tls):
    """A Medd-Attachment UID that is not the object's is refused with a reason, nothing is stored, and the same connection then accepts a good package."""
    cert, extra = server_tls
    node = await make_central(LISTEN, extra=extra)
    port = listener_port(node, "tls")
    content = ct_content()
    liar = image_package(content, attachment=AttachmentId.of("image", uid="1.2.3.4.5"))

    replies = await deferToThread(
        ssl_exchange, port, cert, [("send", [liar]), ("read", 1), ("send", [image_package(content)]), ("read", 1)]
    )

    refused, ok = replies
    assert refused["status"] == "refused"
    assert refused["kind"] == "invalid"
    assert "1.2.3.4.5" in refused["reason"]
    assert ok["status"] == "ok" and ok["uid"] == content.keyinfo.sop_instance_uid
    assert await node.database.run(lambda c: index.object_by_uid(c, "1.2.3.4.5")) is None
    assert await node.database.run(index.count_objects) == 1


@pytest_twisted.ensureDeferred
async def test_non_mime_frame_refused_and_nothing_stored(make_central, server_tls):
    """A frame that is not a MIME package (here raw DICOM bytes) is refused with a reason and leaves no row and no blob; a good package follows on the same connection."""
    cert, extra = server_tls
    node = await make_central(LISTEN, extra=extra)
    port = listener_port(node, "tls")
    raw_dicom = conftest.testdata("CT_small.dcm")

    refused = await send_packages(reactor, "127.0.0.1", port, [raw_dicom, b""], ca_pem=cert.read_bytes())
    assert [r["status"] for r in refused] == ["refused", "refused"]
    assert all(r["reason"] for r in refused)
    assert await nothing_stored(node, ct_content().keyinfo.sop_instance_uid)

    replies = await deferToThread(ssl_exchange, port, cert, [("send", [raw_dicom, image_package()]), ("read", 2)])
    assert [r["status"] for r in replies] == ["refused", "ok"]


@pytest_twisted.ensureDeferred
async def test_oversized_frame_refused_and_connection_closed(make_central, server_tls):
    """A frame longer than max_object_size is refused as too large, the server closes the connection, and nothing is stored."""
    cert, extra = server_tls
    node = await make_central(LISTEN, extra=extra + "[limits]\nmax_object_size = 10K\n")
    port = listener_port(node, "tls")
    package = image_package()
    assert len(package) > 10 * 1024

    replies = await deferToThread(ssl_exchange, port, cert, [("send", [package, image_package()]), ("read", 2)])
    assert replies[0]["status"] == "refused"
    assert replies[0]["kind"] == "too-large"
    assert "too large" in replies[0]["reason"]
    assert replies[1] is None  # end of stream: the second frame was never answered

    with pytest.raises(TransferIncomplete) as raised:
        await send_packages(reactor, "127.0.0.1", port, [package, package], ca_pem=cert.read_bytes())
    assert [r["kind"] for r in raised.value.replies] == ["too-large"]
    assert await nothing_stored(node)


@pytest_twisted.ensureDeferred
async def test_plain_tcp_client_cannot_talk(make_central, server_tls):
    """A client that skips TLS and sends a frame in the clear gets no reply frame and stores nothing."""
    _, extra = server_tls
    node = await make_central(LISTEN, extra=extra)
    port = listener_port(node, "tls")
    package = image_package()

    def plain():
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(struct.pack(">I", len(package)) + package)
            received = b""
            try:
                while chunk := sock.recv(65536):
                    received += chunk
            except ConnectionResetError:
                pass
            return received

    received = await deferToThread(plain)
    assert b"status" not in received
    assert await nothing_stored(node)


@pytest_twisted.ensureDeferred
async def test_client_verifies_the_server(make_central, server_tls, tmp_path):
    """medd's client refuses a server whose certificate is not signed by the CA it was given."""
    _, extra = server_tls
    node = await make_central(LISTEN, extra=extra)
    port = listener_port(node, "tls")
    other_cert = tmp_path / "other" / "cert.pem"
    make_self_signed(other_cert, tmp_path / "other" / "key.pem")

    with pytest.raises(TransferIncomplete) as raised:
        await send_packages(reactor, "127.0.0.1", port, [image_package()], ca_pem=other_cert.read_bytes())
    assert "certificate verify failed" in raised.value.reason
    assert await nothing_stored(node)


@pytest_twisted.ensureDeferred
async def test_mutual_tls_requires_client_certificate_and_names_peer_by_cn(make_central, server_tls, tmp_path):
    """With [tls] client_ca, a client without a certificate is turned away, and a refusal logged for a certified client names it by its certificate's CN."""
    cert, extra = server_tls
    client_cert, client_key = tmp_path / "client" / "cert.pem", tmp_path / "client" / "key.pem"
    make_self_signed(client_cert, client_key, hostname="gateway.centre-a.example")
    node = await make_central(LISTEN, extra=extra + f"client_ca = {client_cert}\n")
    port = listener_port(node, "tls")
    client_pem = client_cert.read_bytes() + client_key.read_bytes()

    with pytest.raises(TransferIncomplete) as raised:
        await send_packages(reactor, "127.0.0.1", port, [image_package()], ca_pem=cert.read_bytes())
    assert raised.value.replies == []
    # A certificate from a CA not in client_ca is turned away too.
    stranger = cert.read_bytes() + (tmp_path / "tls" / "key.pem").read_bytes()
    with pytest.raises(TransferIncomplete) as raised:
        await send_packages(reactor, "127.0.0.1", port, [image_package()], ca_pem=cert.read_bytes(), client_cert=stranger)
    assert raised.value.replies == []
    assert await nothing_stored(node)

    refusals = []

    def observe(event):
        if event.get("log_namespace", "").startswith("medd.transports.tls") and "kind" in event:
            refusals.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        replies = await send_packages(
            reactor, "127.0.0.1", port, [b"not a package", image_package()], ca_pem=cert.read_bytes(), client_cert=client_pem
        )
    finally:
        globalLogPublisher.removeObserver(observe)
    assert [r["status"] for r in replies] == ["refused", "ok"]
    assert [e["peer"] for e in refusals] == ["gateway.centre-a.example"]


def test_client_ca_with_ssl_endpoint_is_a_config_error(tmp_path, server_tls):
    """client_ca applies to a tcp: tls listener only; beside an ssl: endpoint string the daemon refuses to start, naming the key."""
    cert, _ = server_tls
    path = write_config(
        tmp_path,
        {"tls": f"ssl:0:privateKey={tmp_path / 'tls' / 'key.pem'}:certKey={cert}"},
        extra=f"[tls]\nclient_ca = {cert}\n",
    )
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert [(p.section, p.key) for p in raised.value.problems] == [("tls", "client_ca")]


@pytest_twisted.ensureDeferred
async def test_ssl_endpoint_string_used_as_is(make_central, server_tls, tmp_path):
    """A tls listener given as an ssl: endpoint string serves the same protocol with the endpoint's own certificate."""
    cert, _ = server_tls
    key = tmp_path / "tls" / "key.pem"
    node = await make_central({"tls": f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"})
    port = listener_port(node, "tls")
    (reply,) = await send_packages(reactor, "127.0.0.1", port, [image_package()], ca_pem=cert.read_bytes())
    assert reply["status"] == "ok"


# -- the protocol on Twisted's fakes ---------------------------------------------------------


class FakeReceiver:
    """The two things PackageFrameReceiver uses of its TransportAPI, with ingest outcomes the test settles by hand."""
    limits = ConnectionLimits()

    def __init__(self, max_object_size: int = 1000):
        self.reactor = Clock()
        self.max_object_size = max_object_size
        self.calls: list[tuple[bytes, Deferred]] = []
        self.batches: list[list[bytes]] = []

    def receive_packages(self, frames, *, transport, peer=None, user=None):
        outcomes = [Deferred() for _ in frames]
        self.batches.append(list(frames))
        self.calls += zip(frames, outcomes)
        return outcomes


def framed(*payloads: bytes) -> bytes:
    return b"".join(struct.pack(">I", len(p)) + p for p in payloads)


def replies_in(transport: StringTransport) -> list[dict]:
    data, out = transport.value(), []
    while data:
        (n,) = struct.unpack(">I", data[:4])
        out.append(json.loads(data[4 : 4 + n]))
        data = data[4 + n :]
    return out


def connected(api) -> tuple[PackageFrameReceiver, StringTransport]:
    protocol, transport = PackageFrameReceiver(api), StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def stored(uid: str) -> Stored:
    return Stored(uid=uid, object_type="image", digest="d", created=True, message_id=f"<{uid}@x>")


def test_replies_wait_for_ingest_and_pipelined_frames_are_stored_in_batches():
    """Frames that arrive together go to ingest as one batch; frames arriving while it is stored make
    the next batch, handed over only once the first is answered; no reply is written before ingest's
    Deferred fires, and replies keep arrival order when ingest settles them out of order."""
    api = FakeReceiver()
    protocol, transport = connected(api)
    protocol.dataReceived(framed(b"first", b"second"))
    assert api.batches == [[b"first", b"second"]]
    assert transport.value() == b""
    protocol.dataReceived(framed(b"third"))
    assert api.batches == [[b"first", b"second"]]

    api.calls[1][1].callback(stored("1.2"))
    assert transport.value() == b""  # the second waits for the first's reply
    api.calls[0][1].callback(stored("1.1"))
    assert [r["uid"] for r in replies_in(transport)] == ["1.1", "1.2"]
    assert api.batches == [[b"first", b"second"], [b"third"]]
    api.calls[2][1].callback(stored("1.3"))
    assert [r["uid"] for r in replies_in(transport)] == ["1.1", "1.2", "1.3"]
    assert transport.producerState == "producing"


def test_reading_stops_while_a_full_batch_waits():
    """With BATCH_FRAMES frames waiting the connection stops reading; the next batch takes them, the
    frames that stayed unread come after it, and reading resumes once the held frames are answered."""
    from medd.transports.tls import BATCH_FRAMES

    api = FakeReceiver()
    protocol, transport = connected(api)
    protocol.dataReceived(framed(b"0"))
    protocol.dataReceived(framed(*(b"%d" % i for i in range(1, BATCH_FRAMES + 3))))
    assert transport.producerState == "paused"
    assert len(api.batches) == 1
    api.calls[0][1].callback(stored("1.0"))
    assert [len(b) for b in api.batches] == [1, BATCH_FRAMES]
    assert transport.producerState == "paused"
    for _, d in api.calls[1:]:
        d.callback(stored("1.x"))
    assert [len(b) for b in api.batches] == [1, BATCH_FRAMES, 2]
    assert transport.producerState == "producing"
    for _, d in api.calls[BATCH_FRAMES + 1:]:
        d.callback(stored("1.y"))
    assert len(replies_in(transport)) == BATCH_FRAMES + 3


def test_too_large_after_pipelined_frames_is_refused_after_their_replies():
    """A frame over max_object_size behind frames still being stored is refused after their replies,
    in order, and then the connection is closed."""
    api = FakeReceiver(max_object_size=10)
    protocol, transport = connected(api)
    protocol.dataReceived(framed(b"one"))
    protocol.dataReceived(framed(b"two") + struct.pack(">I", 11))
    assert not transport.disconnecting and transport.value() == b""
    api.calls[0][1].callback(stored("1.1"))
    api.calls[1][1].callback(stored("1.2"))
    assert [r.get("uid") or r["kind"] for r in replies_in(transport)] == ["1.1", "1.2", "too-large"]
    assert transport.disconnecting


def test_store_failure_and_internal_error_ask_for_a_retry():
    """StoreFailed and an unexpected error are both answered "retry" with a reason, and the connection stays open."""
    api = FakeReceiver()
    protocol, transport = connected(api)
    protocol.dataReceived(framed(b"a", b"b", b"c"))
    api.calls[0][1].errback(StoreFailed("cannot write to the blob store: disk full"))
    api.calls[1][1].errback(RuntimeError("bug"))
    api.calls[2][1].errback(Refused("not a UID", "invalid"))
    assert replies_in(transport) == [
        {"status": "retry", "reason": "cannot write to the blob store: disk full"},
        {"status": "retry", "reason": "internal error: RuntimeError"},
        {"status": "refused", "kind": "invalid", "reason": "not a UID"},
    ]
    assert not transport.disconnecting


def test_too_large_refused_from_the_length_prefix_alone():
    """A length prefix over max_object_size is refused before any of its body arrives, the connection is closed, and later bytes are ignored."""
    api = FakeReceiver(max_object_size=10)
    protocol, transport = connected(api)
    protocol.dataReceived(struct.pack(">I", 11))
    assert replies_in(transport)[0]["kind"] == "too-large"
    assert transport.disconnecting
    protocol.dataReceived(b"x" * 11 + framed(b"next"))
    assert api.calls == []
    assert len(replies_in(transport)) == 1


def test_idle_connection_closed_but_not_while_a_package_is_being_stored():
    """A silent connection is closed after idle_timeout; a slow ingest does not count as idle."""
    api = FakeReceiver()
    protocol, transport = connected(api)
    protocol.dataReceived(framed(b"slow"))
    api.reactor.advance(protocol.idle_timeout * 2)
    assert not transport.disconnecting
    api.calls[0][1].callback(stored("1.1"))
    api.reactor.advance(protocol.idle_timeout - 1)
    assert not transport.disconnecting
    api.reactor.advance(1)
    assert transport.disconnecting


def test_transport_provides_itransport():
    """The tls transport plugin provides ITransport, as the plugin host requires."""
    from zope.interface.verify import verifyObject

    from medd.plugins.interfaces import ITransport
    from medd.transports.tls import TlsTransport

    assert verifyObject(ITransport, TlsTransport())
