"""POST /packages on the HTTP transport, with `requests` as the sender on loopback."""
from __future__ import annotations

import socket

import pytest_twisted
import requests
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from zope.interface import implementer
from zope.interface.verify import verifyObject

from medd.config import ConnectionLimits
from medd.objects import parse_part10
from medd.package import AttachmentId, build_package
from medd.plugins.interfaces import ITransport
from medd.plugins.objecttypes import BUILTIN_OBJECT_TYPES, status_content, text_report_content
from medd.storage import index
from medd.transports.http import HttpTransport, MeddSite
from tests.conftest import bearer, centre_token, listener_port, testdata, viewer_token

LISTEN = {"http": "tcp:0:interface=127.0.0.1"}
PACKAGE_HEADERS = {"Content-Type": "message/rfc822"}


def _image_package(name: str = "CT_small.dcm", **kw) -> tuple[bytes, str]:
    """A package carrying one of pydicom's test files, and its SOP Instance UID."""
    content = parse_part10(testdata(name))
    image = next(t for t in BUILTIN_OBJECT_TYPES if t.name == "image")
    attachment = kw.pop("attachment", None) or image.identifier(content)
    data = build_package(content, attachment, origin="ct1@centre-a.example", destination="viewer@central.test", **kw)
    return data, content.keyinfo.sop_instance_uid


async def _post(port: int, body, headers=PACKAGE_HEADERS, token: str | None = None) -> requests.Response:
    if token is not None:
        headers = bearer(token, **headers)
    return await deferToThread(requests.post, f"http://127.0.0.1:{port}/packages", data=body, headers=headers, timeout=30)


def _blob_files(node) -> list:
    return [p for p in (node.config.storage_path / "blobs").rglob("*") if p.is_file()]


async def _nothing_stored(node) -> bool:
    return await node.database.run(index.count_objects) == 0 and not _blob_files(node)


def test_http_transport_provides_itransport():
    """The built-in HTTP transport satisfies the ITransport interface like any plugin."""
    assert verifyObject(ITransport, HttpTransport())


@implementer(ITCPTransport)
class _TCPStringTransport(StringTransport):
    no_delay = False

    def setTcpNoDelay(self, enabled):
        self.no_delay = enabled


class _FakeAPI:
    limits = ConnectionLimits()
    reactor = None  # the deadline starts with the first byte; this test sends none
    max_object_size = 1024
    web_resources: dict = {}


def test_accepted_connections_have_nagle_off():
    """Every accepted HTTP connection gets TCP_NODELAY, so a small response is not held back by Nagle's algorithm."""
    site = MeddSite(_FakeAPI())
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = _TCPStringTransport()
    channel.makeConnection(transport)
    assert transport.no_delay is True


@pytest_twisted.ensureDeferred
async def test_package_created_then_idempotent(make_central):
    """A new package is answered 201 with its UID and Message-ID; the same package again is 200 and still one row and one blob."""
    node = await make_central(LISTEN)
    port = listener_port(node, "http")
    token = await centre_token(node)
    data, uid = _image_package(message_id="<pkg-1@centre-a.example>")

    first = await _post(port, data, token=token)
    assert first.status_code == 201
    assert first.headers["Content-Type"] == "application/json"
    assert first.json() == {"uid": uid, "message_id": "<pkg-1@centre-a.example>", "created": True, "object_type": "image"}

    again = await _post(port, data, token=token)
    assert again.status_code == 200
    assert again.json()["created"] is False
    assert await node.database.run(index.count_objects) == 1
    assert len(_blob_files(node)) == 1
    record = await node.database.run(lambda c: index.object_by_uid(c, uid))
    assert record.transport == "http"
    assert record.origin == "ct1@centre-a.example"


@pytest_twisted.ensureDeferred
async def test_report_and_status_packages(make_central):
    """Packages of the other object types (a plain-text report, a status message) are accepted over HTTP too."""
    node = await make_central(LISTEN)
    port = listener_port(node, "http")
    token = await viewer_token(node)
    by_name = {t.name: t for t in BUILTIN_OBJECT_TYPES}
    report = text_report_content("No findings.", uid="1.2.826.0.1.3680043.8.498.1", study_uid="1.2.826.0.1.3680043.8.498.2")
    status = status_content("opened", "1.2.826.0.1.3680043.8.498.3", "dr.who")
    for object_type, content in (("report", report), ("status", status)):
        data = build_package(content, by_name[object_type].identifier(content),
                             origin="viewer@central.test", destination="central@central.test")
        response = await _post(port, data, token=token)
        assert response.status_code == 201, response.text
        assert response.json()["object_type"] == object_type


@pytest_twisted.ensureDeferred
async def test_lying_attachment_header_refused(make_central):
    """A Medd-Attachment header naming another UID than the object's is 400 problem JSON, and nothing is stored."""
    node = await make_central(LISTEN)
    port = listener_port(node, "http")
    token = await centre_token(node)
    data, uid = _image_package(attachment=AttachmentId.of("image", uid="1.2.826.0.1.3680043.8.498.99"))
    response = await _post(port, data, token=token)
    assert response.status_code == 400
    assert response.headers["Content-Type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == 400
    assert problem["type"] == "urn:medd:problem:invalid"
    assert "does not match" in problem["detail"] and uid in problem["detail"]
    assert {"type", "title", "status", "detail"} <= set(problem)
    assert await _nothing_stored(node)


@pytest_twisted.ensureDeferred
async def test_malformed_mime_refused(make_central):
    """Bodies that are not well-formed packages (no headers, a multipart without its boundary, a
    broken base64 DICOM part) are each 400 problem JSON and change nothing."""
    node = await make_central(LISTEN)
    port = listener_port(node, "http")
    token = await centre_token(node)
    good, uid = _image_package()
    head = (
        b"From: ct1@centre-a.example\r\nTo: viewer@central.test\r\nMessage-ID: <bad@centre-a.example>\r\n"
        b"Medd-Attachment: image; uid=" + uid.encode() + b"\r\nMIME-Version: 1.0\r\n"
    )
    bodies = [
        b"this is not a package at all",
        head + b'Content-Type: multipart/mixed; boundary="XYZ"\r\n\r\nno parts here\r\n',
        head + b"Content-Type: application/dicom\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!notbase64",
        good[: len(good) // 2],  # truncated: the DICOM object inside is cut short
    ]
    for body in bodies:
        response = await _post(port, body, token=token)
        assert response.status_code == 400, (body[:60], response.text)
        assert response.headers["Content-Type"] == "application/problem+json"
        assert response.json()["detail"]
    assert await _nothing_stored(node)


@pytest_twisted.ensureDeferred
async def test_wrong_content_type_is_415(make_central):
    """A package must be posted as message/rfc822; anything else is 415 and nothing is read."""
    node = await make_central(LISTEN)
    port = listener_port(node, "http")
    token = await centre_token(node)
    data, _ = _image_package()
    response = await _post(port, data, headers={"Content-Type": "application/octet-stream"}, token=token)
    assert response.status_code == 415
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.headers["Accept-Post"] == "message/rfc822"
    assert await _nothing_stored(node)


@pytest_twisted.ensureDeferred
async def test_unknown_path_and_method_are_problems(make_central):
    """An unknown path is 404 and a wrong method 405 with Allow, both as problem JSON, not HTML."""
    node = await make_central(LISTEN)
    port = listener_port(node, "http")
    missing = await deferToThread(requests.get, f"http://127.0.0.1:{port}/nowhere", timeout=30)
    assert missing.status_code == 404
    assert missing.headers["Content-Type"] == "application/problem+json"
    wrong = await deferToThread(requests.get, f"http://127.0.0.1:{port}/packages", timeout=30)
    assert wrong.status_code == 405
    assert wrong.headers["Content-Type"] == "application/problem+json"
    assert "POST" in wrong.headers["Allow"]


@pytest_twisted.ensureDeferred
async def test_oversized_body_refused_413(make_central):
    """A body over [limits] max_object_size is 413 problem JSON, whether its size is declared
    (Content-Length) or only discovered while it streams (chunked); nothing is stored."""
    node = await make_central(LISTEN, extra="[limits]\nmax_object_size = 10K\n")
    port = listener_port(node, "http")
    token = await centre_token(node)
    data, _ = _image_package()
    assert len(data) > 10 * 1024

    declared = await _post(port, data, token=token)
    assert declared.status_code == 413
    assert declared.headers["Content-Type"] == "application/problem+json"
    assert declared.json()["type"] == "urn:medd:problem:too-large"

    def chunks():
        for i in range(0, len(data), 4096):
            yield data[i : i + 4096]

    chunked = await _post(port, chunks(), token=token)
    assert chunked.status_code == 413
    assert chunked.json()["status"] == 413
    assert await _nothing_stored(node)

    # A package under the limit still goes through on the same listener.
    small = build_package(
        text_report_content("ok", uid="1.2.826.0.1.3680043.8.498.5", study_uid="1.2.826.0.1.3680043.8.498.6"),
        AttachmentId.of("report", uid="1.2.826.0.1.3680043.8.498.5", study_uid="1.2.826.0.1.3680043.8.498.6"),
        origin="viewer@central.test", destination="central@central.test",
    )
    assert (await _post(port, small, token=await viewer_token(node))).status_code == 201


@pytest_twisted.ensureDeferred
async def test_oversized_body_refused_before_it_is_sent(make_central):
    """With Expect: 100-continue and a declared length over the limit, the 413 comes back from the
    headers alone: the client never has to send the body (and is not told to continue)."""
    node = await make_central(LISTEN, extra="[limits]\nmax_object_size = 10K\n")
    port = listener_port(node, "http")

    def ask():
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(
                b"POST /packages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: message/rfc822\r\n"
                b"Content-Length: 1000000000\r\nExpect: 100-continue\r\n\r\n"
            )
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            return answer

    answer = await deferToThread(ask)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in answer
    assert b"application/problem+json" in answer
    assert await _nothing_stored(node)


@pytest_twisted.ensureDeferred
async def test_store_failure_is_503_with_retry_after(make_central, monkeypatch):
    """When medd cannot make the object durable (blob store write fails) the sender gets 503 with
    Retry-After, a problem saying to try again, and nothing is indexed."""
    node = await make_central(LISTEN)
    port = listener_port(node, "http")
    token = await centre_token(node)

    def disk_full(data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(node.blobs, "put", disk_full)
    data, _ = _image_package()
    response = await _post(port, data, token=token)
    assert response.status_code == 503
    assert response.headers["Retry-After"].isdigit()
    assert response.json()["type"] == "urn:medd:problem:store-failed"
    assert await node.database.run(index.count_objects) == 0


@pytest_twisted.ensureDeferred
async def test_refusals_are_logged(make_central):
    """Each refusal is logged with its peer, status and reason as named fields."""
    from twisted.logger import globalLogPublisher

    node = await make_central(LISTEN, extra="[limits]\nmax_object_size = 10K\n")
    port = listener_port(node, "http")
    token = await centre_token(node)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        lying, _ = _image_package("rtplan.dcm", attachment=AttachmentId.of("image", uid="1.2.826.0.1.3680043.8.498.7"))
        assert (await _post(port, lying, token=token)).status_code == 400
        big, _ = _image_package()
        assert (await _post(port, big, token=token)).status_code == 413
    finally:
        globalLogPublisher.removeObserver(events.append)
    refusals = [e for e in events if "refused" in e.get("log_format", "")]
    assert any(e.get("status") == 400 and e.get("peer") == "127.0.0.1" and "does not match" in e["detail"] for e in refusals)
    assert any("exceeds the limit" in e.get("detail", "") and e.get("peer") == "127.0.0.1" for e in refusals)


@pytest_twisted.ensureDeferred
async def test_mounted_web_resources_are_served(make_central):
    """Resources mounted with WebMounts.mount are served at /<name> beside /packages and /dicomweb; others are 404."""
    from twisted.internet import reactor
    from twisted.web.resource import Resource

    from medd.plugins.api import TLSSettings, TransportAPI, WebMounts

    class Hello(Resource):
        isLeaf = True

        def render_GET(self, request):
            request.setHeader("Content-Type", "text/plain")
            return b"hello"

    node = await make_central({})
    mounts = WebMounts()
    mounts.mount("hello", Hello())
    api = TransportAPI(reactor, node.ingest, transport="http", node_name="central.test", settings={},
                       tls=TLSSettings(), web_resources=mounts.freeze())
    listener = HttpTransport().listener("tcp:0:interface=127.0.0.1", api)
    listener.startService()
    try:
        port = (await listener.whenListening()).getHost().port
        response = await deferToThread(requests.get, f"http://127.0.0.1:{port}/hello", timeout=30)
        assert response.status_code == 200 and response.text == "hello"
        assert (await deferToThread(requests.get, f"http://127.0.0.1:{port}/nothello", timeout=30)).status_code == 404
    finally:
        await listener.stopService()


def test_mounts_are_frozen_once_the_listeners_are_built():
    """A resource mounted after the listeners were built (and so never served) is an error, as is a name mounted twice."""
    import pytest
    from twisted.web.resource import Resource

    from medd.plugins.api import WebMounts

    mounts = WebMounts()
    mounts.mount("a", Resource())
    with pytest.raises(ValueError):
        mounts.mount(b"a", Resource())
    served = mounts.freeze()
    with pytest.raises(RuntimeError):
        mounts.mount("b", Resource())
    assert list(served) == [b"a"]


@pytest_twisted.ensureDeferred
async def test_stopping_the_node_closes_kept_alive_connections(make_central):
    """A client holding a kept-alive connection is disconnected when the node stops, instead of being
    answered by a node that has already shut its storage down."""
    import pytest

    node = await make_central({"http": "tcp:0:interface=127.0.0.1"})
    url = f"http://127.0.0.1:{listener_port(node, 'http')}/dicomweb/studies"
    session = requests.Session()
    session.headers["Authorization"] = "Bearer " + await node.central_storage.directory.add_admin("reader")
    first = await deferToThread(session.get, url)
    assert first.status_code in (200, 204)
    await node.stopService()
    with pytest.raises(requests.ConnectionError):
        await deferToThread(session.get, url, timeout=10)


@pytest_twisted.ensureDeferred
async def test_text_report_is_no_dicom_instance_in_qido(make_central):
    """A plain-text report attached to a study neither adds an instance to it in QIDO-RS nor makes a
    report-only study appear there."""
    node = await make_central(LISTEN)
    port = listener_port(node, "http")
    token = await centre_token(node)
    data, uid = _image_package()
    assert (await _post(port, data, token=token)).status_code == 201
    study = (await node.database.run(lambda c: index.object_by_uid(c, uid))).study_instance_uid
    by_name = {t.name: t for t in BUILTIN_OBJECT_TYPES}
    from_viewer = await viewer_token(node)
    for report_uid, study_uid in (("1.2.826.0.1.3680043.8.498.11", study), ("1.2.826.0.1.3680043.8.498.12", "1.2.826.0.1.3680043.8.498.13")):
        report = text_report_content("Seen.", uid=report_uid, study_uid=study_uid)
        package = build_package(report, by_name["report"].identifier(report), origin="viewer@central.test",
                                destination="central@central.test")
        assert (await _post(port, package, token=from_viewer)).status_code == 201
    reader = {"Authorization": "Bearer " + await node.central_storage.directory.add_admin("reader")}
    studies = (await deferToThread(requests.get, f"http://127.0.0.1:{port}/dicomweb/studies", headers=reader)).json()
    assert [s["0020000D"]["Value"][0] for s in studies] == [study]
    assert studies[0]["00201208"]["Value"][0] == 1  # NumberOfStudyRelatedInstances


@pytest_twisted.ensureDeferred
async def test_https_push_verifies_the_receiver_against_the_configured_ca(make_central, tmp_path):
    """The HTTP(S) push sender (what a gateway forwards with) trusts the CA named by tls_ca: a package
    reaches an https:// node whose certificate that CA signed, and the same send without tls_ca fails
    verification (the platform's trust store does not know a site's private CA), storing nothing."""
    import pytest
    from twisted.internet import reactor

    from medd.tlscert import make_self_signed
    from medd.transports.push import HttpSender

    cert, key = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    cert.parent.mkdir()
    make_self_signed(cert, key)
    node = await make_central({"http": f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"})
    url = f"https://127.0.0.1:{listener_port(node, 'http')}/packages"
    data, uid = _image_package(message_id="<https-1@centre-a.example>")
    token = await centre_token(node)
    with pytest.raises(Exception):
        await HttpSender().send(reactor, url, data, {"http_token": token})
    assert await node.database.run(index.count_objects) == 0
    assert await HttpSender().send(reactor, url, data, {"tls_ca": str(cert), "http_token": token}) == 201
    assert (await node.database.run(lambda c: index.object_by_uid(c, uid))) is not None
