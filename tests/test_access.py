"""Who may read and write over HTTP (issue 9, items 1 and 2), probed on loopback as an attacker
would: every route of a central and a viewer node anonymously and with each kind of credential;
writes refused from their headers before the body is read; readers registered with `medd readers`;
forged reports refused over HTTP, SMTP and the TLS socket, nothing stored."""
from __future__ import annotations

import socket
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import pytest_twisted
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from requests.exceptions import HTTPError
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from medd.objects import parse_part10
from medd.package import AttachmentId, build_package
from medd.plugins.objecttypes import text_report_content
from medd.storage import index
from medd.tlscert import make_self_signed
from medd.transports.tls import send_packages
from medd.viewer.reports import build_text_report
from tests.conftest import bearer, centre_token, listener_port, testdata, write_config
from tests.test_smtp import send as smtp_send
from tests.test_viewer import LOOPBACK, _central_and_viewer, _fake_clock, _send_to_viewer, _with_recipient

MEDD = str(Path(sys.executable).parent / "medd")
RFC822 = {"Content-Type": "message/rfc822"}
CENTRE_ADDRESS = "gw@centre-a.example"
VIEWER = "dr-lee@viewers.example"
FORGER = "dr-evil@elsewhere.example"
PUSH_TOKEN = "central-pushes-with-this-" + "p" * 32


def _stow_body(*datasets: bytes) -> tuple[bytes, dict]:
    body = b"".join(b"--b\r\nContent-Type: application/dicom\r\n\r\n" + d + b"\r\n" for d in datasets) + b"--b--\r\n"
    return body, {"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'}


def _image_package(name: str = "CT_small.dcm", origin: str = CENTRE_ADDRESS, to: str = "central.test") -> bytes:
    content = parse_part10(testdata(name))
    return build_package(content, AttachmentId.of("image", uid=content.keyinfo.sop_instance_uid), origin=origin,
                         destination=to)


def _report_package(study_uid: str, origin: str, uid: str = "1.2.826.0.1.3680043.8.498.4242") -> bytes:
    report = text_report_content("Forged: no findings.", uid=uid, study_uid=study_uid)
    return build_package(report, AttachmentId.of("report", uid=uid, study_uid=study_uid), origin=origin,
                         destination="central.test")


def _sr_on(image: bytes, uid: str) -> bytes:
    """A Basic Text SR about ``image``, signed (VERIFIED) by "dr-evil", as the reading room makes them."""
    return build_text_report(image, [], text="Signed by nobody we know.", user="dr-evil", report_uid=uid,
                             device="forger")


def _raw(port: int, head: bytes, body: bytes = b"") -> bytes:
    """Blocking: send a request's head (and only then ``body``), return all that came back before close."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        sock.settimeout(5)
        answer = b""
        try:
            answer = sock.recv(65536)
        except TimeoutError:
            pass
        if body and b"100 Continue" in answer:
            sock.sendall(body)
        sock.settimeout(30)
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


async def _central(make_central, tmp_path):
    """A central with its HTTP listener and one credential of each kind: (node, base URL, tokens by kind)."""
    node = await make_central({"http": LOOPBACK, "dicom": LOOPBACK})
    directory = node.central_storage.directory
    tokens = {
        "admin": await directory.add_admin("alice"),
        "reader": (await directory.add_reader("research", "read", token=True)).token,
        "centre": await centre_token(node, address=CENTRE_ADDRESS),
        "viewer": (await directory.add_viewer(VIEWER, None, ["centre-a"])).token,
        "nobody": "not-a-token-of-anyone",
    }
    return node, f"http://127.0.0.1:{listener_port(node, 'http')}", tokens


@pytest_twisted.ensureDeferred
async def test_every_central_route_refuses_the_anonymous_and_answers_only_its_credentials(make_central, tmp_path):
    """Every HTTP route of central answers an anonymous request 401 problem JSON with WWW-Authenticate, a token
    that is no one's 401 too; DICOMweb reads answer an administrator and a reader 200 and a centre or viewer
    403; POST /packages and STOW-RS answer a centre (201/200) and refuse an administrator and a reader 403;
    nothing anonymous is stored."""
    node, base, tokens = await _central(make_central, tmp_path)
    stored = await node.ingest.receive_dicom(testdata("CT_small.dcm"), transport="test", origin="MOD")
    study, series, uid = stored.study_instance_uid, stored.series_instance_uid, stored.uid
    reads = ["/dicomweb/studies", f"/dicomweb/studies/{study}", f"/dicomweb/studies/{study}/metadata",
             f"/dicomweb/studies/{study}/series", "/dicomweb/series", "/dicomweb/instances",
             f"/dicomweb/studies/{study}/series/{series}/instances/{uid}",
             f"/dicomweb/studies/{study}/series/{series}/instances/{uid}/metadata"]
    others = ["/outbox", "/outbox/1", f"/api/objects/{uid}", "/api/quarantine", "/api/viewers", "/api/routes",
              "/api/conflicts"]
    posts = ["/packages", "/dicomweb/studies", f"/dicomweb/studies/{study}", "/outbox/1/ack", "/api/viewers",
             "/api/routes", "/api/quarantine/1/route", "/api/quarantine/1/reject"]
    routes = [("GET", p) for p in reads + others] + [("POST", p) for p in posts]
    for method, path in routes:
        for headers in ({}, bearer(tokens["nobody"])):
            r = await deferToThread(requests.request, method, base + path, headers=headers, data=b"x", timeout=30)
            assert r.status_code == 401, (method, path, headers, r.status_code, r.text)
            assert r.headers["Content-Type"] == "application/problem+json", (method, path)
            assert r.headers["WWW-Authenticate"].startswith("Bearer"), (method, path)

    for path in reads:
        for kind, status in (("admin", 200), ("reader", 200), ("centre", 403), ("viewer", 403)):
            r = await deferToThread(requests.get, base + path, headers=bearer(tokens[kind]), timeout=30)
            assert r.status_code == status, (path, kind, r.text)

    image = _image_package("rtplan.dcm")
    for kind in ("admin", "reader"):
        r = await deferToThread(requests.post, base + "/packages", data=image, headers=bearer(tokens[kind], **RFC822))
        assert r.status_code == 403 and r.json()["type"] == "urn:medd:problem:forbidden", (kind, r.text)
        body, ctype = _stow_body(testdata("MR_small.dcm"))
        r = await deferToThread(requests.post, base + "/dicomweb/studies", data=body, headers=bearer(tokens[kind], **ctype))
        assert r.status_code == 403, (kind, r.text)
    assert await node.database.run(index.count_objects) == 1

    r = await deferToThread(requests.post, base + "/packages", data=image, headers=bearer(tokens["centre"], **RFC822))
    assert r.status_code == 201, r.text
    body, ctype = _stow_body(testdata("MR_small.dcm"))
    r = await deferToThread(requests.post, base + "/dicomweb/studies", data=body,
                            headers=bearer(tokens["centre"], **ctype))
    assert r.status_code == 200, r.text
    mr = await node.database.run(lambda c: index.object_by_uid(c, dcmread(BytesIO(testdata("MR_small.dcm"))).SOPInstanceUID))
    assert mr.origin == CENTRE_ADDRESS  # stored in the centre's name, so routed as its own


@pytest_twisted.ensureDeferred
async def test_a_reader_token_reads_with_dicomweb_client_and_cannot_write(make_central, tmp_path):
    """A reader registered with `medd readers add NAME --scope read --token` finds and retrieves studies with
    dicomweb-client; its STOW-RS is 403; `readers list` shows it and, once `readers revoke`d, its token is 401."""
    node = await make_central({"http": LOOPBACK})
    ini = node.config.path
    await node.ingest.receive_dicom(testdata("CT_small.dcm"), transport="test", origin="MOD")
    added = await deferToThread(subprocess.run, [MEDD, "readers", "add", "research", "--scope", "read", "--token",
                                                 "--config", str(ini)], capture_output=True, text=True)
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip().splitlines()[-1]
    url = f"http://127.0.0.1:{listener_port(node, 'http')}/dicomweb"
    client = DICOMwebClient(url=url, headers=bearer(token))
    studies = await deferToThread(client.search_for_studies)
    assert len(studies) == 1
    study = studies[0]["0020000D"]["Value"][0]
    assert len(await deferToThread(client.retrieve_study, study)) == 1
    try:
        await deferToThread(client.store_instances, [dcmread(BytesIO(testdata("MR_small.dcm")))])
        raise AssertionError("a reader stored an instance")
    except HTTPError as e:
        assert e.response.status_code == 403
    listed = await deferToThread(subprocess.run, [MEDD, "readers", "list", "--config", str(ini)],
                                 capture_output=True, text=True)
    assert "research" in listed.stdout and "read" in listed.stdout and "token" in listed.stdout
    revoked = await deferToThread(subprocess.run, [MEDD, "readers", "revoke", "research", "--config", str(ini)],
                                  capture_output=True, text=True)
    assert revoked.returncode == 0, revoked.stderr
    r = await deferToThread(requests.get, url + "/studies", headers=bearer(token), timeout=30)
    assert r.status_code == 401
    assert await node.database.run(index.count_objects) == 1


@pytest_twisted.ensureDeferred
async def test_a_reader_client_certificate_is_known_by_its_fingerprint(make_central, tmp_path):
    """`medd readers add NAME --scope read --client-cert FILE` issues a certificate from [tls] client_ca_key and
    keeps its SHA-256; central's access policy lets that certificate read and nothing else it does not know."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    from medd.plugins.api import check_access
    from medd.plugins.hookspecs import AccessClaim

    ca, ca_key = tmp_path / "ca.pem", tmp_path / "ca-key.pem"
    make_self_signed(ca, ca_key, "medd test client CA")
    extra = f"[tls]\nclient_ca = {ca}\nclient_ca_key = {ca_key}\n"
    ini = write_config(tmp_path, {}, extra)
    added = await deferToThread(subprocess.run, [MEDD, "readers", "add", "pacs-x", "--scope", "read", "--client-cert",
                                                 str(tmp_path / "pacs-x.pem"), "--config", str(ini)],
                                capture_output=True, text=True)
    assert added.returncode == 0, added.stderr
    cert = x509.load_pem_x509_certificate((tmp_path / "pacs-x.pem").read_bytes())
    fingerprint = cert.fingerprint(hashes.SHA256()).hex()
    node = await make_central({}, extra=extra)

    allowed = await check_access(node.ingest.plugins.manager, AccessClaim("query", "http", certificate=fingerprint))
    assert allowed.allowed and allowed.who == "pacs-x" and allowed.role == "reader"
    store = await check_access(node.ingest.plugins.manager, AccessClaim("store", "http", certificate=fingerprint))
    assert not store.allowed and store.authenticated
    stranger = await check_access(node.ingest.plugins.manager, AccessClaim("query", "http", certificate="ab" * 32))
    assert not stranger.allowed and not stranger.authenticated


@pytest_twisted.ensureDeferred
async def test_a_write_is_refused_from_its_headers_before_the_body_is_sent(make_central, tmp_path):
    """POST /packages and STOW-RS with Expect: 100-continue and no credential (or one that may not write) get
    401/403 from the headers alone, never "100 Continue"; a centre's token gets "100 Continue" and its package
    is stored."""
    node, base, tokens = await _central(make_central, tmp_path)
    port = listener_port(node, "http")
    package = _image_package()
    for path, auth, status in (("/packages", b"", b"401"), ("/dicomweb/studies", b"", b"401"),
                               ("/packages", b"Authorization: Bearer " + tokens["reader"].encode() + b"\r\n", b"403")):
        head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: message/rfc822\r\n"
                f"Content-Length: {len(package)}\r\nExpect: 100-continue\r\n").encode() + auth + b"\r\n"
        answer = await deferToThread(_raw, port, head)
        assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer[:200]
        assert b"100 Continue" not in answer and b"application/problem+json" in answer
    head = (f"POST /packages HTTP/1.1\r\nHost: x\r\nContent-Type: message/rfc822\r\nConnection: close\r\n"
            f"Content-Length: {len(package)}\r\nExpect: 100-continue\r\n"
            f"Authorization: Bearer {tokens['centre']}\r\n\r\n").encode()
    answer = await deferToThread(_raw, port, head, package)
    assert answer.startswith(b"HTTP/1.1 100 Continue") and b"HTTP/1.1 201 " in answer, answer[:300]
    assert await node.database.run(index.count_objects) == 1


@pytest_twisted.ensureDeferred
async def test_forged_report_refused_over_http_smtp_and_tls(make_central, tmp_path):
    """A report (plain text, or a DICOM SR marked VERIFIED) from an address no viewer or centre is registered
    with is refused over HTTP (401 anonymous, 403 with a centre's token), SMTP (554) and the TLS socket
    (`refused`), and nothing of it is stored or attached; a centre's report on a study not its own is refused
    too, and the registered viewer's own report is accepted."""
    server_cert, server_key = tmp_path / "server.pem", tmp_path / "server-key.pem"
    make_self_signed(server_cert, server_key, "127.0.0.1")
    listen = {key: LOOPBACK for key in ("http", "smtp", "tls", "dicom")}
    extra = f"[tls]\ncertificate = {server_cert}\nprivate_key = {server_key}\n"
    node = await make_central(listen, extra=extra)
    directory = node.central_storage.directory
    centre = await centre_token(node, address=CENTRE_ADDRESS)
    other = (await directory.add_centre("centre-b", addresses=["gw@centre-b.example"], token=True)).token
    viewer = (await directory.add_viewer(VIEWER, None, ["centre-a"])).token
    base = f"http://127.0.0.1:{listener_port(node, 'http')}"
    ct = testdata("CT_small.dcm")
    r = await deferToThread(requests.post, base + "/packages", data=_image_package(), headers=bearer(centre, **RFC822))
    assert r.status_code == 201, r.text
    study = dcmread(BytesIO(ct)).StudyInstanceUID
    await node.routing.kick()
    before = await node.database.run(index.count_objects)

    forged_text = _report_package(study, FORGER)
    sr = parse_part10(_sr_on(ct, "1.2.826.0.1.3680043.8.498.4343"))
    forged_sr = build_package(sr, AttachmentId.of("report", uid=sr.keyinfo.sop_instance_uid, study_uid=study),
                              origin=FORGER, destination="central.test")
    for forged in (forged_text, forged_sr):
        anonymous = await deferToThread(requests.post, base + "/packages", data=forged, headers=RFC822)
        assert anonymous.status_code == 401, anonymous.text
        as_centre = await deferToThread(requests.post, base + "/packages", data=forged, headers=bearer(centre, **RFC822))
        assert as_centre.status_code == 403 and "neither" in as_centre.json()["detail"], as_centre.text
        code, reply = await deferToThread(smtp_send, listener_port(node, "smtp"), forged)
        assert code == 554, reply
        (framed,) = await send_packages(reactor, "127.0.0.1", listener_port(node, "tls"), [forged],
                                        ca_pem=server_cert.read_bytes())
        assert framed["status"] == "refused", framed
    # Centre-b is authenticated, but the study is centre-a's.
    not_its_own = _report_package(study, "gw@centre-b.example")
    r = await deferToThread(requests.post, base + "/packages", data=not_its_own, headers=bearer(other, **RFC822))
    assert r.status_code == 403 and "study of its own" in r.json()["detail"], r.text
    await node.routing.kick()
    assert await node.database.run(index.count_objects) == before
    tracked = await node.central_storage.tracking.object_history(dcmread(BytesIO(ct)).SOPInstanceUID)
    assert tracked.reports == ()

    mine = _report_package(study, VIEWER, uid="1.2.826.0.1.3680043.8.498.4444")
    r = await deferToThread(requests.post, base + "/packages", data=mine, headers=bearer(viewer, **RFC822))
    assert r.status_code == 201, r.text
    own = _report_package(study, CENTRE_ADDRESS, uid="1.2.826.0.1.3680043.8.498.4545")
    r = await deferToThread(requests.post, base + "/packages", data=own, headers=bearer(centre, **RFC822))
    assert r.status_code == 201, r.text


@pytest_twisted.ensureDeferred
async def test_forged_report_by_c_store_is_quarantined_not_attached(make_central):
    """A DICOM SR sent by C-STORE from an AE title no centre is registered with is not filed under the study's
    centre (only a registered viewer's report is): it is quarantined as from an unknown centre."""
    from tests.test_routing import _cstore

    node = await make_central({"dicom": LOOPBACK})
    directory = node.central_storage.directory
    await directory.add_centre("centre-a", aes=["MODALITY1"])
    await directory.add_viewer(VIEWER, None, ["centre-a"])
    await directory.add_rule(VIEWER, centre="centre-a")
    ct = dcmread(BytesIO(testdata("CT_small.dcm")))
    assert await deferToThread(_cstore, listener_port(node, "dicom"), [ct]) == [0]
    sr = dcmread(BytesIO(_sr_on(testdata("CT_small.dcm"), "1.2.826.0.1.3680043.8.498.4646")))
    assert await deferToThread(_cstore, listener_port(node, "dicom"), [sr], "FORGER") == [0]
    await node.routing.kick()
    history = await node.central_storage.tracking.object_history(sr.SOPInstanceUID)
    assert history.routing.outcome == "quarantined" and history.routing.centre is None
    assert history.deliveries == ()


@pytest_twisted.ensureDeferred
async def test_viewer_posting_an_image_is_403_and_its_own_report_is_stored(make_central, tmp_path):
    """A registered viewer's token may store only what a viewer makes: an image over STOW-RS or POST /packages
    is 403 and nothing is stored; its SR over STOW-RS is stored in its name."""
    node, base, tokens = await _central(make_central, tmp_path)
    before = await node.database.run(index.count_objects)
    body, ctype = _stow_body(testdata("CT_small.dcm"))
    r = await deferToThread(requests.post, base + "/dicomweb/studies", data=body, headers=bearer(tokens["viewer"], **ctype))
    assert r.status_code == 403 and "only overlays and reports" in r.json()["detail"], r.text
    r = await deferToThread(requests.post, base + "/packages", data=_image_package(origin=VIEWER),
                            headers=bearer(tokens["viewer"], **RFC822))
    assert r.status_code == 403 and "not an image" in r.json()["detail"], r.text
    assert await node.database.run(index.count_objects) == before

    sr = _sr_on(testdata("CT_small.dcm"), "1.2.826.0.1.3680043.8.498.4747")
    body, ctype = _stow_body(sr)
    r = await deferToThread(requests.post, base + "/dicomweb/studies", data=body, headers=bearer(tokens["viewer"], **ctype))
    assert r.status_code == 200, r.text
    record = await node.database.run(lambda c: index.object_by_uid(c, "1.2.826.0.1.3680043.8.498.4747"))
    assert record.object_type == "report" and record.origin == VIEWER


@pytest_twisted.ensureDeferred
async def test_viewer_node_serves_and_takes_only_its_radiologists_and_central(make_central, tmp_path):
    """On a viewer node: anonymous GET /dicomweb/studies is 401, pages redirect to the login form, POST /packages
    is 401 anonymous or with a wrong token and 201 with central's push token (the package reaches the inbox);
    STOW-RS is 401 anonymous and 403 with a session; the login form and static files are open."""
    central, viewer, _ = await _central_and_viewer(make_central, _fake_clock())
    ct = _with_recipient("CT_small.dcm", recipient=VIEWER)
    await _send_to_viewer(central, viewer, ct)
    base = f"http://127.0.0.1:{listener_port(viewer, 'http')}"
    for path in ("/dicomweb/studies", f"/dicomweb/studies/{ct.StudyInstanceUID}"):
        r = await deferToThread(requests.get, base + path, timeout=30)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer"), path
    for path in ("/worklist", f"/studies/{ct.StudyInstanceUID}", f"/ohif/viewer?StudyInstanceUIDs={ct.StudyInstanceUID}",
                 f"/dicomweb/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}/instances/{ct.SOPInstanceUID}"
                 "/frames/1"):
        r = await deferToThread(requests.get, base + path, allow_redirects=False, timeout=30)
        assert r.status_code in (303, 401) and b"CompressedSamples" not in r.content, (path, r.status_code)
        assert r.status_code == 401 or r.headers["Location"].startswith("/?next="), path
    assert (await deferToThread(requests.get, base + "/", timeout=30)).status_code == 200
    assert (await deferToThread(requests.get, base + "/static/reading-room.css", timeout=30)).status_code == 200

    mr = _image_package("MR_small.dcm", origin="central.test", to=VIEWER)
    before = await viewer.database.run(index.count_objects)
    for headers in (RFC822, bearer("wrong-" + PUSH_TOKEN, **RFC822)):
        r = await deferToThread(requests.post, base + "/packages", data=mr, headers=headers, timeout=30)
        assert r.status_code == 401 and r.headers["Content-Type"] == "application/problem+json", r.text
    body, ctype = _stow_body(testdata("MR_small.dcm"))
    r = await deferToThread(requests.post, base + "/dicomweb/studies", data=body, headers=ctype, timeout=30)
    assert r.status_code == 401
    session = await viewer.reading_room.create_session("dr-lee")
    r = await deferToThread(requests.post, base + "/dicomweb/studies", data=body, headers=ctype,
                            cookies={"medd_session": session}, timeout=30)
    assert r.status_code == 403
    assert await viewer.database.run(index.count_objects) == before


@pytest_twisted.ensureDeferred
async def test_central_pushes_to_a_viewer_with_the_token_both_sides_know(make_central, tmp_path):
    """A push viewer node with [central] push_token takes central's HTTP push (central's [push] http_token): the
    image central routes to it is stored and delivered."""
    from tests.test_routing import FAST, _cstore
    from tests.test_viewer import _viewer_extra

    central = await make_central({"dicom": LOOPBACK, "http": LOOPBACK}, site="central",
                                 extra=FAST + f"\n[push]\nhttp_token = {PUSH_TOKEN}\n")
    directory = central.central_storage.directory
    await directory.add_centre("centre-a", aes=["MODALITY1"])
    token = (await directory.add_viewer(VIEWER, None, ["centre-a"])).token
    viewer = await make_central({"http": LOOPBACK}, site="viewer", role="viewer", name=VIEWER, clock=_fake_clock(),
                                extra=_viewer_extra(listener_port(central, "http"), token)
                                + f"push_token = {PUSH_TOKEN}\n")
    await directory.remove_viewer(VIEWER)
    await directory.add_viewer(VIEWER, f"http://127.0.0.1:{listener_port(viewer, 'http')}/packages", ["centre-a"])
    ct = _with_recipient("CT_small.dcm", recipient=VIEWER)
    assert await deferToThread(_cstore, listener_port(central, "dicom"), [ct]) == [0]
    await central.routing.kick()
    await central.routing.outbox.settled()
    history = await central.central_storage.tracking.object_history(ct.SOPInstanceUID)
    assert [d.state for d in history.deliveries] == ["delivered"], history.deliveries
    record = await viewer.database.run(lambda c: index.object_by_uid(c, ct.SOPInstanceUID))
    assert record is not None and record.transport == "http"
