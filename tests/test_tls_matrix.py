"""Transport security on every TLS listener of a node, with real clients on loopback.

The mutual-TLS matrix — no client certificate, a self-signed one, one from
another CA, one from the configured CA — and a TLS 1.1 client, against the
DICOM TLS listener (pynetdicom as the SCU), HTTPS (the standard library's
ssl) and the TLS socket transport; a pull viewer that holds only a client
certificate fetching and acknowledging central's outbox over HTTPS; the
config rules of the new keys.
"""
from __future__ import annotations

import http.client
import json
import socket
import ssl
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_twisted
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from twisted.internet.threads import deferToThread

from medd.config import ConfigError, load_config
from medd.plugins.host import load_plugins
from medd.storage import index
from medd.tlscert import issue_client_certificate, make_self_signed
from medd.validation import validate
from tests.conftest import listener_port, testdata, write_config
from tests.test_routing import FAST, _state, _with_recipient
from tests.test_tls import ORIGIN, image_package

LOOPBACK = "tcp:0:interface=127.0.0.1"
VIEWER = "dr-lee@viewers.example"


@dataclass(frozen=True)
class Pki:
    server_cert: Path  # the node's certificate (self-signed; clients trust it directly)
    server_key: Path
    ca: Path  # [tls] client_ca
    right: Path  # client certificate + key signed by ``ca``, CN = VIEWER
    other_ca: Path  # client certificate + key signed by another CA, same CN
    self_signed: Path  # a self-signed client certificate + key

    def tls_section(self, client_ca: bool = True) -> str:
        return (f"[tls]\ncertificate = {self.server_cert}\nprivate_key = {self.server_key}\n"
                + (f"client_ca = {self.ca}\n" if client_ca else ""))


@pytest.fixture
def pki(tmp_path) -> Pki:
    folder = tmp_path / "pki"
    server_cert, server_key = folder / "server.pem", folder / "server.key"
    make_self_signed(server_cert, server_key)
    ca, ca_key = folder / "ca.pem", folder / "ca.key"
    make_self_signed(ca, ca_key, hostname="medd-test-ca")
    other, other_key = folder / "other-ca.pem", folder / "other-ca.key"
    make_self_signed(other, other_key, hostname="another-ca")
    right, _ = issue_client_certificate(ca.read_bytes(), ca_key.read_bytes(), VIEWER)
    stranger, _ = issue_client_certificate(other.read_bytes(), other_key.read_bytes(), VIEWER)
    own_cert, own_key = folder / "self.pem", folder / "self.key"
    make_self_signed(own_cert, own_key, hostname="viewers.example")
    paths = {"right": right, "other_ca": stranger, "self_signed": own_cert.read_bytes() + own_key.read_bytes()}
    for name, pem in paths.items():
        (folder / f"{name}-client.pem").write_bytes(pem)
    return Pki(server_cert, server_key, ca, folder / "right-client.pem", folder / "other_ca-client.pem",
               folder / "self_signed-client.pem")


def client_context(pki: Pki, client: str | None, *, tls11: bool = False) -> ssl.SSLContext:
    """A client context trusting the node's certificate, presenting ``client`` ("right", "other_ca",
    "self_signed" or None); ``tls11`` offers TLS 1.0-1.1 only (and lets OpenSSL try them)."""
    ctx = ssl.create_default_context(cafile=str(pki.server_cert))
    if tls11:
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    if client is not None:
        ctx.load_cert_chain(str(getattr(pki, client)))
    return ctx


# -- one exchange per listener, blocking (run in a thread) -----------------------------------------------


def dicom_exchange(port: int, ctx: ssl.SSLContext) -> str:
    """A C-ECHO over DICOM TLS: "ok", or how it failed."""
    ae = AE(ae_title="MODALITY1")
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 20
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDD", tls_args=(ctx, "localhost"))
    if not assoc.is_established:
        return "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
    try:
        status = assoc.send_c_echo()
        return "ok" if status and status.Status == 0 else "no echo"
    finally:
        assoc.release()


def https_exchange(port: int, ctx: ssl.SSLContext, path: str = "/", headers: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=20)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def tls_frame_exchange(port: int, ctx: ssl.SSLContext) -> dict | None:
    """One package frame over the TLS socket transport; the reply, or None if the server closed."""
    package = image_package()
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(struct.pack(">I", len(package)) + package)
            header = sock.recv(4)
            if len(header) < 4:
                return None
            (length,) = struct.unpack(">I", header)
            body = b""
            while len(body) < length:
                body += sock.recv(length - len(body))
            return json.loads(body)


def outcome(exchange, *args) -> str:
    """"ok"/"refused: …" for an exchange that completed, else the TLS error that ended it."""
    try:
        result = exchange(*args)
    except ssl.SSLError as e:
        return f"tls error: {e.reason or e}"
    except (ConnectionError, OSError) as e:
        return f"connection error: {type(e).__name__}"
    return result


# -- the matrix ---------------------------------------------------------------------------------------------


async def _matrix_node(make_central, pki: Pki, extra: str = ""):
    listen = {"dicom_tls": LOOPBACK, "https": LOOPBACK, "tls": LOOPBACK}
    return await make_central(listen, extra=pki.tls_section() + "[https]\nclient_certificates = required\n" + extra)


async def _stored(node) -> int:
    return await node.database.run(index.count_objects)


def refused_by_server(result) -> bool:
    """The server ended the handshake: its alert, or its close, as the client saw it. With TLS 1.3 a
    refused client certificate is known only after the client's side of the handshake is done, so
    the alert (or the close) arrives on the client's next read or write. The client's own refusal of
    the server's certificate is not one (every client here trusts it, as the "right" case shows)."""
    return (isinstance(result, str) and result.startswith(("tls error", "connection error"))
            and "CERTIFICATE_VERIFY_FAILED" not in result)


@pytest_twisted.ensureDeferred
async def test_mutual_tls_matrix_on_dicom_tls(make_central, pki):
    """DICOM TLS with [tls] client_ca: pynetdicom as the SCU associates only with a certificate from
    that CA; without one, self-signed, or from another CA the association never opens."""
    node = await _matrix_node(make_central, pki)
    port = listener_port(node, "dicom_tls")
    results = {c: await deferToThread(outcome, dicom_exchange, port, client_context(pki, c))
               for c in (None, "self_signed", "other_ca", "right")}
    assert results == {None: "aborted", "self_signed": "aborted", "other_ca": "aborted", "right": "ok"}


@pytest_twisted.ensureDeferred
async def test_dicom_tls_stores_with_the_plain_listeners_protections(make_central, pki):
    """A C-STORE over DICOM TLS is stored as from the calling AE; the called AE title is checked as on
    the plain port; a peer that connects and never finishes its handshake does not stop others."""
    node = await _matrix_node(make_central, pki, extra="[dicom]\ntimeout = 2\n")
    port = listener_port(node, "dicom_tls")
    ctx = client_context(pki, "right")
    ct = _with_recipient("CT_small.dcm")

    def store(called: str):
        ae = AE(ae_title="MODALITY1")
        ae.add_requested_context(ct.SOPClassUID, ct.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title=called, tls_args=(ctx, "localhost"))
        if not assoc.is_established:
            return "rejected" if assoc.is_rejected else "aborted"
        try:
            return int(assoc.send_c_store(ct).Status)
        finally:
            assoc.release()

    # Stalled peers: TCP connected, not one byte of the handshake; they hold no acceptor.
    stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    try:
        assert await deferToThread(store, "SOMEONE-ELSE") == "rejected"
        assert await deferToThread(store, "MEDD") == 0
    finally:
        for s in stalled:
            s.close()
    record = await node.database.run(lambda c: index.object_by_uid(c, ct.SOPInstanceUID))
    assert record is not None and record.origin == "MODALITY1" and record.transport == "dicom"


@pytest_twisted.ensureDeferred
async def test_dicom_tls_drops_a_stalled_handshake_within_the_timeout(make_central, pki):
    """A peer that opens the TCP connection and sends half a ClientHello is closed after [dicom] timeout."""
    node = await _matrix_node(make_central, pki, extra="[dicom]\ntimeout = 1\n")
    port = listener_port(node, "dicom_tls")

    def stall() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"\x16\x03\x01")  # the start of a TLS record header
            return s.recv(100)  # b"" once the server gives up; a timeout (30 s) fails the test

    assert await deferToThread(stall) == b""


def _half_a_client_hello() -> bytes:
    """The first half of a real ClientHello record (as a client's TLS library would send it)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        client.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    return hello[:len(hello) // 2]


def _stalled_handshake_closed(port: int, starttls: bool = False) -> bool:
    """Connect, (on SMTP: say EHLO and STARTTLS), send half a ClientHello and wait: True once the
    node closes the connection, False if it is still open after 30 s (a generous bound)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        if starttls:
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"EHLO probe.example\r\n")
            while not f.readline().startswith(b"250 "):
                pass
            s.sendall(b"STARTTLS\r\n")
            assert f.readline().startswith(b"220")
        s.sendall(_half_a_client_hello())
        try:
            while s.recv(4096):
                pass
        except TimeoutError:
            return False
        except ConnectionError:
            pass
        return True


@pytest_twisted.ensureDeferred
async def test_a_stalled_tls_handshake_is_bounded_by_the_request_deadline_on_every_listener(make_central, pki):
    """Half a ClientHello, then nothing: HTTPS, the TLS socket, SMTP after STARTTLS and DICOM TLS each close
    the connection at [limits] request_timeout (1 s here), though their idle timers ([dicom] timeout = 60,
    Twisted's idle timeouts of minutes or hours) would let it wait far longer."""
    node = await make_central({"dicom_tls": LOOPBACK, "https": LOOPBACK, "tls": LOOPBACK, "smtp": LOOPBACK},
                              extra=pki.tls_section() + "[limits]\nrequest_timeout = 1\n[dicom]\ntimeout = 60\n")
    for key in ("https", "tls", "dicom_tls"):
        assert await deferToThread(_stalled_handshake_closed, listener_port(node, key)), key
    assert await deferToThread(_stalled_handshake_closed, listener_port(node, "smtp"), True)


@pytest_twisted.ensureDeferred
async def test_dicom_tls_keeps_the_per_peer_cap_and_the_pdu_deadline(make_central, pki):
    """On the DICOM TLS port a peer holds at most [limits] max_connections_per_peer associations (the
    next is closed), and a PDU begun after the handshake but never finished is dropped after
    [dicom] timeout."""
    node = await _matrix_node(make_central, pki, extra="[dicom]\ntimeout = 1\n[limits]\nmax_connections_per_peer = 2\n")
    port = listener_port(node, "dicom_tls")

    def hold_two_then_a_third():
        held = []
        for _ in range(2):
            ae = AE(ae_title="MODALITY1")
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", port, ae_title="MEDD", tls_args=(client_context(pki, "right"), "localhost"))
            assert assoc.is_established
            held.append(assoc)
        try:
            return outcome(dicom_exchange, port, client_context(pki, "right"))
        finally:
            for assoc in held:
                assoc.release()

    assert await deferToThread(hold_two_then_a_third) in ("aborted", "not established")

    def once_the_slots_are_back() -> str:
        # A released association gives its slot back when its thread on the node ends, just after the
        # release the client saw: the next association is accepted eventually (a generous bound).
        import time

        node_threads = node.getServiceNamed("listen-dicom_tls").server
        deadline = time.monotonic() + 30
        while node_threads.slots("127.0.0.1") and time.monotonic() < deadline:
            time.sleep(0.05)
        return outcome(dicom_exchange, port, client_context(pki, "right"))

    assert await deferToThread(once_the_slots_are_back) == "ok"

    def half_a_pdu() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
            with client_context(pki, "right").wrap_socket(raw, server_hostname="localhost") as sock:
                sock.sendall(b"\x01\x00\x00")  # 3 bytes of an A-ASSOCIATE-RQ header
                try:
                    return sock.recv(100)  # b"" once the server gives up; a timeout (30 s) fails the test
                except (ssl.SSLError, ConnectionError):
                    return b""

    assert await deferToThread(half_a_pdu) == b""


@pytest_twisted.ensureDeferred
async def test_mutual_tls_matrix_on_https(make_central, pki):
    """HTTPS with client_certificates = required: only a certificate from [tls] client_ca gets an HTTP
    answer (here central's 401 problem for a certificate no viewer or centre was registered with)."""
    node = await _matrix_node(make_central, pki)
    port = listener_port(node, "https")
    results = {}
    for client in (None, "self_signed", "other_ca", "right"):
        got = await deferToThread(outcome, https_exchange, port, client_context(pki, client), "/outbox")
        results[client] = got if isinstance(got, str) else (got[0], json.loads(got[1])["status"])
    assert results["right"] == (401, 401)
    for client in (None, "self_signed", "other_ca"):
        assert refused_by_server(results[client]), (client, results[client])
    assert await _stored(node) == 0


@pytest_twisted.ensureDeferred
async def test_mutual_tls_matrix_on_the_tls_socket(make_central, pki):
    """The TLS socket transport with client_ca: a package is answered only over a certificate from that CA."""
    node = await _matrix_node(make_central, pki)
    port = listener_port(node, "tls")
    results = {c: await deferToThread(outcome, tls_frame_exchange, port, client_context(pki, c))
               for c in (None, "self_signed", "other_ca", "right")}
    assert results["right"]["status"] == "ok"
    for client in (None, "self_signed", "other_ca"):
        assert results[client] is None or refused_by_server(results[client]), (client, results[client])
    assert await _stored(node) == 1


@pytest_twisted.ensureDeferred
async def test_tls_1_1_refused_on_every_listener(make_central, pki):
    """A client offering only TLS 1.0/1.1 (with the right certificate) gets the server's
    protocol_version alert on DICOM TLS, HTTPS and the TLS socket (BCP 195: TLS 1.2 or later)."""
    node = await _matrix_node(make_central, pki)
    alert = "tls error: TLSV1_ALERT_PROTOCOL_VERSION"

    def attempt(port: int) -> str:
        ctx = client_context(pki, "right", tls11=True)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
                with ctx.wrap_socket(raw, server_hostname="localhost"):
                    return "handshake completed"
        except ssl.SSLError as e:
            return f"tls error: {e.reason}"

    for key in ("dicom_tls", "https", "tls"):
        assert await deferToThread(attempt, listener_port(node, key)) == alert, key


# -- HTTPS with optional client certificates: the outbox ------------------------------------------------


def _https_get(port: int, ctx, path: str, token: str | None = None, method: str = "GET") -> tuple[int, object]:
    conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=20)
    try:
        conn.request(method, path, headers={"Authorization": f"Bearer {token}"} if token else {})
        response = conn.getresponse()
        body = response.read()
        return response.status, json.loads(body) if body else None
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_outbox_opens_with_the_client_certificate_issued_to_a_viewer(make_central, pki, tmp_path):
    """Over HTTPS (client certificates optional), /outbox opens for the certificate recorded for the
    viewer at its CN; a valid certificate for an unregistered CN, or one issued to the viewer before
    its current one, does not; without a certificate the bearer token still works."""
    central = await make_central({"https": LOOPBACK}, extra=pki.tls_section() + FAST)
    port = listener_port(central, "https")
    directory = central.central_storage.directory
    ca_key = pki.ca.with_name("ca.key").read_bytes()
    earlier, _ = issue_client_certificate(pki.ca.read_bytes(), ca_key, VIEWER)
    (tmp_path / "earlier.pem").write_bytes(earlier)
    _, fingerprint = _issued(pki.right)
    token = (await directory.add_viewer(VIEWER, None, [], client_certificate=fingerprint)).token
    nobody, _ = issue_client_certificate(pki.ca.read_bytes(), ca_key, "nobody@viewers.example")
    (tmp_path / "nobody.pem").write_bytes(nobody)

    def ctx(path: Path | None):
        c = ssl.create_default_context(cafile=str(pki.server_cert))
        if path is not None:
            c.load_cert_chain(str(path))
        return c

    assert await deferToThread(_https_get, port, ctx(pki.right), "/outbox") == (200, [])
    assert (await deferToThread(_https_get, port, ctx(None), "/outbox"))[0] == 401
    assert (await deferToThread(_https_get, port, ctx(tmp_path / "nobody.pem"), "/outbox"))[0] == 401
    assert (await deferToThread(_https_get, port, ctx(tmp_path / "earlier.pem"), "/outbox"))[0] == 401
    assert await deferToThread(_https_get, port, ctx(None), "/outbox", token) == (200, [])
    # A self-signed certificate is refused by the handshake itself, even where certificates are optional.
    got = await deferToThread(outcome, _https_get, port, ctx(pki.self_signed), "/outbox")
    assert refused_by_server(got), got


def _issued(pem_path: Path) -> tuple[bytes, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    pem = pem_path.read_bytes()
    return pem, x509.load_pem_x509_certificate(pem).fingerprint(hashes.SHA256()).hex()


@pytest_twisted.ensureDeferred
async def test_a_viewer_with_only_a_client_certificate_pulls_and_acknowledges_over_https(make_central, pki):
    """A pull viewer configured with [central] ca and client_cert and no token fetches an image from
    central's HTTPS outbox, stores it, and acknowledges it (central: delivered)."""
    central = await make_central({"dicom_tls": LOOPBACK, "https": LOOPBACK}, extra=pki.tls_section() + FAST,
                                 site="central")
    directory = central.central_storage.directory
    await directory.add_centre("centre-a", aes=["MODALITY1"], addresses=["ct1@centre-a.example"])
    await directory.add_viewer(VIEWER, None, ["centre-a"], client_certificate=_issued(pki.right)[1])
    viewer_extra = (f"[central]\nurl = https://127.0.0.1:{listener_port(central, 'https')}\nca = {pki.server_cert}\n"
                    f"client_cert = {pki.right}\npoll_interval = 30\ntimeout = 10\n")
    viewer = await make_central({}, extra=viewer_extra, site="viewer", role="viewer", name=VIEWER)
    await viewer.viewer.requestor.idle()

    ct = _with_recipient("CT_small.dcm", recipient=VIEWER)

    def store():
        ae = AE(ae_title="MODALITY1")
        ae.add_requested_context(ct.SOPClassUID, ct.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", listener_port(central, "dicom_tls"), ae_title="MEDD",
                             tls_args=(client_context(pki, "right"), "localhost"))
        try:
            return int(assoc.send_c_store(ct).Status)
        finally:
            assoc.release()

    assert await deferToThread(store) == 0
    await central.routing.router.kick()
    result = await viewer.viewer.requestor.kick()
    assert (result.error, result.stored, result.acknowledged) == (None, 1, 1), result
    assert await viewer.database.run(lambda c: index.object_by_uid(c, ct.SOPInstanceUID)) is not None
    assert await _state(central, ct.SOPInstanceUID, VIEWER) == "delivered"


# -- configuration ---------------------------------------------------------------------------------------


def _problems(tmp_path, listen, extra, role="central") -> list[tuple[str, str | None]]:
    path = write_config(tmp_path, listen, extra, role=role)
    try:
        validate(load_config(path), load_plugins())
    except ConfigError as e:
        return [(p.section, p.key) for p in e.problems]
    return []


def test_tls_listeners_need_the_tls_files(tmp_path, pki):
    """dicom_tls and https without [tls] certificate/private_key are refused at start, naming [listen] and the key;
    dicom_tls on a non-tcp endpoint too; with them the same config passes."""
    listen = {"dicom_tls": LOOPBACK, "https": LOOPBACK}
    assert sorted(_problems(tmp_path, listen, "")) == [("listen", "dicom_tls"), ("listen", "https")]
    assert _problems(tmp_path, listen, pki.tls_section()) == []
    assert _problems(tmp_path, {"dicom_tls": "unix:/tmp/x.sock"}, pki.tls_section()) == [("listen", "dicom_tls")]
    assert _problems(tmp_path, {"https": LOOPBACK}, pki.tls_section() + "[https]\nclient_certificates = maybe\n") == [
        ("https", "client_certificates")]


def test_viewer_refuses_clear_http_to_another_host(tmp_path, pki):
    """[central] url = http:// to a host other than loopback is a config error unless allow_http = yes;
    https:// with ca and client_cert needs no token."""
    base = "[central]\npoll_interval = 5\n"
    assert _problems(tmp_path, {}, base + "url = http://central.example:8080\ntoken = t\n", role="viewer") == [
        ("central", "url")]
    assert _problems(tmp_path, {}, base + "url = http://central.example:8080\ntoken = t\nallow_http = yes\n",
                     role="viewer") == []
    assert _problems(tmp_path, {}, base + "url = http://127.0.0.1:8080\ntoken = t\n", role="viewer") == []
    assert _problems(tmp_path, {}, base + f"url = https://central.example\nca = {pki.server_cert}\n"
                                          f"client_cert = {pki.right}\n", role="viewer") == []
    assert _problems(tmp_path, {}, base + "url = https://central.example\n", role="viewer") == [("central", "token")]


# -- the gateway's clients over TLS --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_results_to_a_pacs_over_dicom_tls(make_central, pki):
    """[gateway] results_tls: the C-STORE of a result to the PACS goes over DICOM TLS, verifying the
    PACS against [gateway] ca and presenting [gateway] client_cert (here a medd node's dicom_tls
    listener that requires one); without the certificate the PACS turns the association away."""
    from medd.gateway.results import c_store
    from medd.gateway.settings import PacsDestination

    pacs = await make_central({"dicom_tls": LOOPBACK}, extra=pki.tls_section())
    port = listener_port(pacs, "dicom_tls")
    sr = testdata("CT_small.dcm")
    destination = PacsDestination("MEDD", "127.0.0.1", port, "GATEWAY", tls=True, tls_ca=str(pki.server_cert),
                                  tls_client_cert=str(pki.right))
    assert (await deferToThread(c_store, destination, sr, 20)).outcome == "stored"
    assert await _stored(pacs) == 1
    anonymous = PacsDestination("MEDD", "127.0.0.1", port, "GATEWAY", tls=True, tls_ca=str(pki.server_cert))
    assert (await deferToThread(c_store, anonymous, sr, 20)).outcome == "retry"


@pytest_twisted.ensureDeferred
async def test_a_centre_posts_packages_over_https_with_its_client_certificate(make_central, pki, tmp_path):
    """A gateway forwarding to https://central/packages with [gateway] client_cert and no token is
    authenticated as the centre whose address is the certificate's CN (201); a registered viewer's
    certificate sending in that centre's name is refused (403) and nothing is stored."""
    from twisted.internet import reactor

    from medd.transports.push import HttpSender, PushRefused

    central = await make_central({"https": LOOPBACK}, extra=pki.tls_section() + FAST)
    ca_key = pki.ca.with_name("ca.key").read_bytes()
    centre_pem, fingerprint = issue_client_certificate(pki.ca.read_bytes(), ca_key, ORIGIN)
    (tmp_path / "centre.pem").write_bytes(centre_pem)
    await central.central_storage.directory.add_centre("centre-a", addresses=[ORIGIN], client_certificate=fingerprint)
    await central.central_storage.directory.add_viewer(VIEWER, None, [], client_certificate=_issued(pki.right)[1])
    url = f"https://127.0.0.1:{listener_port(central, 'https')}/packages"
    sender = HttpSender()

    with pytest.raises(PushRefused) as refused:  # pki.right is the viewer's certificate, not centre-a's
        await sender.send(reactor, url, image_package(), {"tls_ca": str(pki.server_cert),
                                                          "tls_client_cert": str(pki.right)})
    assert "403" in str(refused.value)
    assert await _stored(central) == 0
    code = await sender.send(reactor, url, image_package(), {"tls_ca": str(pki.server_cert),
                                                             "tls_client_cert": str(tmp_path / "centre.pem")})
    assert code == 201
    assert await _stored(central) == 1


def test_gateway_refuses_clear_http_to_another_host(tmp_path):
    """[gateway] central = http:// to a host other than loopback is a config error unless allow_http = yes."""
    base = "[gateway]\naddress = ct1@centre-a.example\ntoken = t\n"
    remote = "central = http://central.example/packages\n"
    assert _problems(tmp_path, {}, base + remote, role="gateway") == [("gateway", "central")]
    assert _problems(tmp_path, {}, base + remote + "allow_http = yes\n", role="gateway") == []
    assert _problems(tmp_path, {}, base + "central = http://127.0.0.1:8080/packages\n", role="gateway") == []


@pytest_twisted.ensureDeferred
async def test_a_centres_client_certificate_names_the_dicom_tls_association(make_central, pki, tmp_path):
    """Over DICOM TLS, the certificate `medd centres add --client-cert` recorded for centre-a, whose CN is
    centre-a's address, makes the association centre-a's whatever its calling AE title and network: the
    object is stored with that address as its origin, routed as centre-a's and audited with centre-a as
    its user. A certificate with the same CN that was not recorded, or a viewer's, names no one: the
    calling AE title stays the origin (quarantined as an unknown centre's, the AE being centre-a's only
    from its network)."""
    from sqlalchemy import select

    from medd.storage.audit import AuditFilter
    from medd.storage.routing_tables import routing_decisions

    node = await _matrix_node(make_central, pki, extra="[dicom]\ntimeout = 5\n" + FAST)
    port = listener_port(node, "dicom_tls")
    ca_key = pki.ca.with_name("ca.key").read_bytes()
    centre_pem, fingerprint = issue_client_certificate(pki.ca.read_bytes(), ca_key, ORIGIN)
    unrecorded_pem, _ = issue_client_certificate(pki.ca.read_bytes(), ca_key, ORIGIN)
    (tmp_path / "centre.pem").write_bytes(centre_pem)
    (tmp_path / "unrecorded.pem").write_bytes(unrecorded_pem)
    # The AE title is centre-a's only from a network this test does not come from.
    await node.central_storage.directory.add_centre("centre-a", aes=["CENTREA"], addresses=[ORIGIN],
                                                    networks=["192.0.2.0/24"], client_certificate=fingerprint)

    def store(pem: Path, calling: str, suffix: str):
        ct = _with_recipient("CT_small.dcm", recipient=VIEWER, uid_suffix=suffix)
        ctx = ssl.create_default_context(cafile=str(pki.server_cert))
        ctx.load_cert_chain(str(pem))
        ae = AE(ae_title=calling)
        ae.add_requested_context(ct.SOPClassUID, ct.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDD", tls_args=(ctx, "localhost"))
        assert assoc.is_established
        try:
            return int(assoc.send_c_store(ct).Status), ct.SOPInstanceUID
        finally:
            assoc.release()

    named = await deferToThread(store, tmp_path / "centre.pem", "WHOEVER", ".41")
    unrecorded = await deferToThread(store, tmp_path / "unrecorded.pem", "CENTREA", ".42")
    viewers = await deferToThread(store, pki.right, "CENTREA", ".43")
    assert [named[0], unrecorded[0], viewers[0]] == [0, 0, 0]
    await node.routing.router.kick()

    async def stored(uid):
        record = await node.database.run(lambda c: index.object_by_uid(c, uid))
        centre = await node.database.run(lambda c: c.execute(
            select(routing_decisions.c.centre).where(routing_decisions.c.uid == uid)).scalar())
        return record.origin, record.transport, centre

    assert await stored(named[1]) == (ORIGIN, "dicom_tls", "centre-a")
    assert await stored(unrecorded[1]) == ("CENTREA", "dicom", None)
    assert await stored(viewers[1]) == ("CENTREA", "dicom", None)
    stores = await node.audit.search(AuditFilter(event="store"), 10)
    users = {r.entry.sop_instance_uid: (r.entry.user, r.entry.credential) for r in stores}
    assert users[named[1]] == ("centre-a", ORIGIN)
    assert users[unrecorded[1]] == ("CENTREA", None)
