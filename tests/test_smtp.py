"""Packages into central over SMTP, with Python's smtplib as the sending MTA."""
from __future__ import annotations

import smtplib
import ssl

import pytest
import pytest_twisted
from sqlalchemy import select
from twisted.internet.defer import fail
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.internet.interfaces import ITLSTransport
from zope.interface import implementer
from zope.interface.verify import verifyObject

from medd.config import ConnectionLimits
from medd.ingest import StoreFailed
from medd.objects import parse_part10
from medd.package import AttachmentId, build_package
from medd.plugins.interfaces import ITransport
from medd.plugins.objecttypes import ImageType, status_content
from medd.storage import index
from medd.storage.schema import status_events
from medd.tlscert import make_self_signed
from medd.transports.smtp import PackageSMTPFactory, SMTPTransport
from tests.conftest import listener_port, testdata

LISTEN = {"smtp": "tcp:0:interface=127.0.0.1"}
SENDER = "ct1@centre-a.example"
RECIPIENT = "central@central.test"


def image_package(name: str = "CT_small.dcm", attachment: AttachmentId | None = None) -> tuple[bytes, str]:
    """(package bytes, SOP Instance UID) of one of pydicom's test files."""
    content = parse_part10(testdata(name))
    attachment = attachment or ImageType().identifier(content)
    package = build_package(content, attachment, origin=SENDER, destination=RECIPIENT)
    return package, content.keyinfo.sop_instance_uid


def send(port: int, message: bytes, recipients=(RECIPIENT,), starttls: bool = False) -> tuple[int, bytes]:
    """Blocking: one SMTP session delivering ``message``; the reply to DATA."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo()
        if starttls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            client.starttls(context=context)
            client.ehlo()
        code, reply = client.mail(SENDER, [f"size={len(message)}"] if client.has_extn("size") else [])
        assert code == 250, reply
        for rcpt in recipients:
            code, reply = client.rcpt(rcpt)
            assert code == 250, reply
        return client.data(message)


def blob_files(node) -> list:
    return [p for p in (node.config.storage_path / "blobs").rglob("*") if p.is_file()]


@pytest_twisted.ensureDeferred
async def test_package_stored_and_indexed(make_central):
    """A 250 after DATA means the image is indexed with its true UID and its blob is on disk."""
    node = await make_central(LISTEN)
    package, uid = image_package()
    code, reply = await deferToThread(send, listener_port(node, "smtp"), package)
    assert code == 250, reply
    assert uid.encode() in reply
    record = await node.database.run(lambda c: index.object_by_uid(c, uid))
    assert record is not None
    assert record.transport == "smtp"
    assert record.origin == SENDER
    assert node.blobs.path(record.digest).is_file()


@pytest_twisted.ensureDeferred
async def test_resend_is_idempotent(make_central):
    """The same package sent again gets 250 again and leaves one row and one blob."""
    node = await make_central(LISTEN)
    package, uid = image_package()
    port = listener_port(node, "smtp")
    assert (await deferToThread(send, port, package))[0] == 250
    code, reply = await deferToThread(send, port, package)
    assert code == 250, reply
    assert b"already stored" in reply
    assert await node.database.run(index.count_objects) == 1
    assert len(blob_files(node)) == 1


@pytest_twisted.ensureDeferred
async def test_many_recipients_ingest_once(make_central):
    """A message for several recipients is handed to ingest once and answered with one 250."""
    node = await make_central(LISTEN)
    calls = []
    receive = node.ingest.receive_package

    def counting(data, **kw):
        calls.append(kw)
        return receive(data, **kw)

    node.ingest.receive_package = counting
    package, uid = image_package()
    recipients = [RECIPIENT, "viewer1@central.test", "viewer2@central.test"]
    code, reply = await deferToThread(send, listener_port(node, "smtp"), package, recipients)
    assert code == 250, reply
    assert calls == [{"transport": "smtp", "peer": "127.0.0.1", "credentials": None, "user": None}]
    assert await node.database.run(index.count_objects) == 1


@pytest_twisted.ensureDeferred
async def test_lying_attachment_refused(make_central):
    """A package whose Medd-Attachment uid is not the object's gets 554 5.6.0, is logged as a
    refusal with its peer and reason, and stores nothing."""
    node = await make_central(LISTEN)
    package, uid = image_package(attachment=AttachmentId.of("image", uid="1.2.3.4.5"))
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        code, reply = await deferToThread(send, listener_port(node, "smtp"), package)
    finally:
        globalLogPublisher.removeObserver(events.append)
    refusals = [e for e in events if e.get("kind") == "invalid" and "code" in e]
    assert [(e["peer"], e["code"]) for e in refusals] == [("127.0.0.1", 554)]
    assert "1.2.3.4.5" in refusals[0]["reason"]
    assert code == 554
    assert reply.startswith(b"5.6.0")
    assert b"1.2.3.4.5" in reply
    assert await node.database.run(lambda c: index.object_by_uid(c, uid)) is None
    assert await node.database.run(index.count_objects) == 0
    assert blob_files(node) == []


MALFORMED_MIME = (
    b"From: ct1@centre-a.example\r\n"
    b"To: central@central.test\r\n"
    b"Message-ID: <broken@centre-a.example>\r\n"
    b"Medd-Attachment: image; uid=1.2.3\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="never-used"\r\n'
    b"\r\n"
    b"no boundary ever starts a part here\r\n"
)
PLAIN_MAIL = b"From: someone@example.com\r\nTo: central@central.test\r\nSubject: hello\r\n\r\nJust a note.\r\n"


@pytest.mark.parametrize(
    "message, reason",
    [(MALFORMED_MIME, b"malformed MIME"), (PLAIN_MAIL, b"no Message-ID"), (b"", b"empty package")],
    ids=["malformed-mime", "not-a-package", "empty"],
)
@pytest_twisted.ensureDeferred
async def test_non_package_refused(make_central, message, reason):
    """A malformed MIME body, an ordinary e-mail or an empty message gets 554 5.6.0 saying why, and changes nothing."""
    node = await make_central(LISTEN)
    code, reply = await deferToThread(send, listener_port(node, "smtp"), message)
    assert code == 554, reply
    assert reply.startswith(b"5.6.0")
    assert reason in reply
    assert await node.database.run(index.count_objects) == 0
    assert blob_files(node) == []


@pytest_twisted.ensureDeferred
async def test_size_advertised_and_declared_size_refused(make_central):
    """EHLO advertises SIZE with the configured limit; MAIL FROM with a larger SIZE gets 552 5.3.4."""
    node = await make_central(LISTEN, extra="[limits]\nmax_object_size = 10K\n")
    package, _ = image_package()
    assert len(package) > 10 * 1024

    def session():
        with smtplib.SMTP("127.0.0.1", listener_port(node, "smtp"), timeout=30) as client:
            client.ehlo()
            advertised = client.esmtp_features.get("size")
            with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                client.sendmail(SENDER, [RECIPIENT], package)
            return advertised, refused.value

    advertised, refused = await deferToThread(session)
    assert advertised == str(10 * 1024)
    assert refused.smtp_code == 552
    assert refused.smtp_error.startswith(b"5.3.4")
    assert await node.database.run(index.count_objects) == 0


@pytest_twisted.ensureDeferred
async def test_undeclared_oversize_refused_at_end_of_data(make_central):
    """Data over the limit without a SIZE parameter is counted and refused with 552 at the final dot;
    the session stays usable and a small package sent next is stored."""
    node = await make_central(LISTEN, extra="[limits]\nmax_object_size = 10K\n")
    big, big_uid = image_package()
    small, small_uid = image_package("SC_rgb_small_odd.dcm")

    def session():
        with smtplib.SMTP("127.0.0.1", listener_port(node, "smtp"), timeout=30) as client:
            client.ehlo()
            replies = []
            for message in (big, small):
                assert client.mail(SENDER)[0] == 250
                assert client.rcpt(RECIPIENT)[0] == 250
                replies.append(client.data(message))
            return replies

    (big_code, big_reply), (small_code, small_reply) = await deferToThread(session)
    assert big_code == 552
    assert big_reply.startswith(b"5.3.4")
    assert small_code == 250, small_reply
    assert await node.database.run(index.count_objects) == 1
    assert await node.database.run(lambda c: index.object_by_uid(c, big_uid)) is None
    assert await node.database.run(lambda c: index.object_by_uid(c, small_uid)) is not None
    assert len(blob_files(node)) == 1


@pytest_twisted.ensureDeferred
async def test_starttls(make_central, tmp_path):
    """With [tls] configured, STARTTLS is offered and a package sent over it is stored."""
    cert, key = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    make_self_signed(cert, key)
    node = await make_central(LISTEN, extra=f"[tls]\ncertificate = {cert}\nprivate_key = {key}\n")
    package, uid = image_package()
    code, reply = await deferToThread(send, listener_port(node, "smtp"), package, starttls=True)
    assert code == 250, reply
    assert await node.database.run(lambda c: index.object_by_uid(c, uid)) is not None


@pytest_twisted.ensureDeferred
async def test_no_starttls_without_certificate(make_central):
    """Without a certificate STARTTLS is neither advertised nor accepted."""
    node = await make_central(LISTEN)

    def session():
        with smtplib.SMTP("127.0.0.1", listener_port(node, "smtp"), timeout=30) as client:
            client.ehlo()
            return client.has_extn("starttls"), client.docmd("STARTTLS")[0]

    assert await deferToThread(session) == (False, 454)


@pytest_twisted.ensureDeferred
async def test_status_package_refused(make_central):
    """A status package over SMTP is refused with 554 5.6.0 and records nothing: nothing authenticates a viewer
    over SMTP (a viewer sends its status to POST /packages with its token), and no one else may send one."""
    node = await make_central(LISTEN)
    viewer = "viewer1@central.test"
    await node.central_storage.directory.add_viewer(viewer)
    uid = "1.2.826.0.1.3680043.8.498.1"
    for origin in (viewer, "stranger@elsewhere.example"):
        package = build_package(
            status_content("opened", uid, "dr.who"), AttachmentId.of("status", event="opened", uid=uid),
            origin=origin, destination=RECIPIENT,
        )
        code, reply = await deferToThread(send, listener_port(node, "smtp"), package)
        assert code == 554 and reply.startswith(b"5.6.0"), reply
    assert await node.database.run(lambda c: c.execute(select(status_events.c.event, status_events.c.uid)).all()) == []


@pytest_twisted.ensureDeferred
async def test_store_failure_asks_for_retry(make_central):
    """When medd cannot make the package durable, the sender gets 451 4.3.0 (try again), not a 5xx."""
    node = await make_central(LISTEN)
    node.ingest.receive_package = lambda data, **kw: fail(StoreFailed("cannot write to the blob store: disk full"))
    package, _ = image_package()
    code, reply = await deferToThread(send, listener_port(node, "smtp"), package)
    assert code == 451
    assert reply.startswith(b"4.3.0")
    assert b"disk full" not in reply


@pytest_twisted.ensureDeferred
async def test_empty_recipient_refused(make_central):
    """RCPT TO with an empty address is refused; DATA is then refused for want of a recipient."""
    node = await make_central(LISTEN)

    def session():
        with smtplib.SMTP("127.0.0.1", listener_port(node, "smtp"), timeout=30) as client:
            client.ehlo()
            client.mail(SENDER)
            codes = [client.docmd("RCPT", "TO:<>")[0], client.docmd("RCPT", 'TO:<"">')[0]]
            codes.append(client.docmd("DATA")[0])
            return codes

    empty, quoted_empty, data = await deferToThread(session)
    assert empty == 501
    assert quoted_empty == 553
    assert data == 503


# --- protocol details on Twisted's fakes ------------------------------------------------------


class _FakeAPI:
    limits = ConnectionLimits()
    node_name = "central.test"
    max_object_size = 1000

    def __init__(self):
        from twisted.internet.task import Clock

        self.reactor = self.clock = Clock()


class _NoDelayTransport(StringTransport):
    no_delay = False

    def setTcpNoDelay(self, enabled):
        self.no_delay = enabled


@implementer(ITLSTransport)
class _TLSCapableTransport(_NoDelayTransport):
    tls_context = None

    def startTLS(self, contextFactory, normal=True):
        self.tls_context = contextFactory


def _connect(transport, context=None):
    protocol = PackageSMTPFactory(_FakeAPI(), context).buildProtocol(None)
    protocol.makeConnection(transport)
    transport.clear()
    return protocol


def test_transport_plugin_provides_interface():
    """The smtp transport plugin provides ITransport."""
    assert verifyObject(ITransport, SMTPTransport())


def test_tcp_nodelay_set():
    """Accepted connections have Nagle's algorithm off."""
    transport = _NoDelayTransport()
    _connect(transport)
    assert transport.no_delay is True


def test_clear_text_pipelined_after_starttls_is_ignored():
    """Commands that arrive in the same read as STARTTLS are dropped, not run
    after the switch to TLS (CVE-2011-0411), and the EHLO state is forgotten."""
    transport = _TLSCapableTransport()
    protocol = _connect(transport, context=object())
    protocol.dataReceived(b"EHLO client.example\r\n")
    assert b"STARTTLS" in transport.value()
    transport.clear()
    protocol.dataReceived(b"STARTTLS\r\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<x@y>\r\n")
    assert transport.tls_context is not None
    assert transport.value() == b"220 Begin TLS negotiation now\r\n"
    assert protocol._from is None
    assert protocol._helo[0] is None


def test_overlong_line_closes_connection():
    """A line longer than the protocol's limit gets 500 and the connection is closed
    rather than buffering it without bound."""
    transport = _NoDelayTransport()
    protocol = _connect(transport)
    protocol.dataReceived(b"x" * (protocol.MAX_LENGTH + 10))
    assert transport.value().startswith(b"500")
    assert transport.disconnecting
    assert protocol._buffer == b""
