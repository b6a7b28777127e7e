"""The gateway on loopback: modalities C-STORE into it (pynetdicom, DCMTK's storescu), an unknown
calling AE is rejected at association, a watched folder is taken in, every object reaches a real
central exactly once over mutual TLS however long central is away, a full spool answers 0xA700,
central's receipts are pulled from its outbox, and `medd gateway status` / `medd track` say so."""
from __future__ import annotations

import json
import shutil
import subprocess

import pydicom
import pytest
import pytest_twisted
from pydicom.uid import generate_uid
from pynetdicom import AE
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

from medd.cli import main as medd_main
from medd.storage.forwarding import SENT, WAITING
from medd.tlscert import issue_client_certificate, make_self_signed
from tests.conftest import listener_port, testdata

GATEWAY_ADDRESS = "gateway@centre-a.test"


@pytest.fixture
def pki(tmp_path):
    """Central's certificate (also the CA of clients' certificates) and the centre's client certificate."""
    folder = tmp_path / "pki"
    cert, key = folder / "central.pem", folder / "central.key"
    make_self_signed(cert, key)
    client_pem, _ = issue_client_certificate(cert.read_bytes(), key.read_bytes(), GATEWAY_ADDRESS)
    client = folder / "centre-a.pem"
    client.write_bytes(client_pem)
    return {"cert": cert, "key": key, "client": client}


def central_extra(pki) -> str:
    return f"[tls]\ncertificate = {pki['cert']}\nprivate_key = {pki['key']}\nclient_ca = {pki['cert']}\n"


def gateway_extra(pki, central_port: int, more: str = "") -> str:
    return (f"[dicom]\nae_title = GATEWAY\n[gateway]\naddress = {GATEWAY_ADDRESS}\n"
            f"central = tls://127.0.0.1:{central_port}\ncentral_name = central.test\n"
            f"ca = {pki['cert']}\nclient_cert = {pki['client']}\nretry_base = 1\nretry_max_delay = 8\n{more}")


def datasets(n: int, name: str = "CT_small.dcm", study: str | None = None) -> list:
    """``n`` distinct objects of one study (new SOP Instance UIDs)."""
    study = study or generate_uid()
    out = []
    for _ in range(n):
        ds = pydicom.dcmread(pydicom.data.get_testdata_file(name))
        ds.StudyInstanceUID = study
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out.append(ds)
    return out


def cstore(port: int, dss: list, calling: str = "CT1") -> list[int]:
    """Blocking: one association, one C-STORE per dataset; the statuses."""
    ae = AE(ae_title=calling)
    for ds in dss[:1]:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="GATEWAY")
    assert assoc.is_established
    try:
        return [assoc.send_c_store(ds).Status for ds in dss]
    finally:
        assoc.release()


async def start_pair(make_central, pki, *, gateway_more: str = "", clock=None, central_up: bool = True):
    central = await make_central({"tls": "tcp:0:interface=127.0.0.1"}, extra=central_extra(pki), site="central")
    port = listener_port(central, "tls")
    if not central_up:
        await central.stopService()
    gateway = await make_central({"dicom": "tcp:0:interface=127.0.0.1"}, extra=gateway_extra(pki, port, gateway_more),
                                 site="gateway", role="gateway", name="gateway.centre-a.test", clock=clock)
    return central, gateway, port


async def central_uids(central) -> list[str]:
    from sqlalchemy import select

    from medd.storage.schema import objects

    rows = await central.database.run(lambda c: c.execute(select(objects.c.sop_instance_uid).order_by(objects.c.id)).all())
    return [r[0] for r in rows]


@pytest_twisted.ensureDeferred
async def test_cstore_into_the_gateway_reaches_central_over_mutual_tls(make_central, pki):
    """Objects C-STOREd into the gateway are stored there, then forwarded as packages From the centre's
    address over mutual TLS; central names the peer by the client certificate's CN."""
    central, gateway, _ = await start_pair(make_central, pki)
    dss = datasets(3)
    statuses = await deferToThread(cstore, listener_port(gateway, "dicom"), dss)
    assert statuses == [0, 0, 0]
    await gateway.gateway.forwarder.kick()
    assert await central_uids(central) == [ds.SOPInstanceUID for ds in dss]

    from sqlalchemy import select

    from medd.storage.schema import receipts

    rows = await central.database.run(lambda c: c.execute(select(receipts.c.origin, receipts.c.peer, receipts.c.transport)).all())
    assert set(rows) == {(GATEWAY_ADDRESS, GATEWAY_ADDRESS, "tls")}
    item = await gateway.forwarding.of_object(dss[0].SOPInstanceUID)
    assert item.state == SENT and item.attempts == 1


def _without_gateway_hooks(gateway):
    """Unregister the gateway's medd_object_stored & co. (as if the node died right after the index
    commit, before any notification ran); returns a function that registers them again."""
    hooks = gateway.plugins.manager.unregister(name="medd-gateway")
    return lambda: gateway.plugins.manager.register(hooks, name="medd-gateway")


@pytest_twisted.ensureDeferred
async def test_the_queue_row_is_committed_with_the_index_row(make_central, pki):
    """The object's place in the queue for central is written in the transaction that indexes it:
    once the ingest has answered (C-STORE Success), the object waits for central even if no
    notification ever ran after the commit."""
    _, gateway, _ = await start_pair(make_central, pki, central_up=False)
    restore = _without_gateway_hooks(gateway)
    try:
        ds = datasets(1)[0]
        stored = await gateway.ingest.receive_dicom(_part10(ds), transport="dicom", origin="CT1")
    finally:
        restore()
    assert stored.created
    item = await gateway.forwarding.of_object(ds.SOPInstanceUID)
    assert item is not None and item.state == WAITING and item.digest == stored.digest
    record = await gateway.index.object_by_uid(ds.SOPInstanceUID)
    assert item.queued_at.replace(tzinfo=None) == record.received_at.replace(tzinfo=None)


@pytest_twisted.ensureDeferred
async def test_objects_indexed_but_never_queued_are_forwarded_after_a_restart(make_central, pki):
    """An object in the gateway's index with no queue row (indexed by a medd that queued in a later
    transaction and stopped between the two) is queued when the gateway starts and reaches central."""
    central, gateway, port = await start_pair(make_central, pki)
    restore = _without_gateway_hooks(gateway)
    index_with, gateway.ingest._index_with = gateway.ingest._index_with, None
    ds = datasets(1)[0]
    try:
        await gateway.ingest.receive_dicom(_part10(ds), transport="dicom", origin="CT1")
    finally:
        gateway.ingest._index_with = index_with
        restore()
    assert await gateway.forwarding.of_object(ds.SOPInstanceUID) is None
    await gateway.stopService()

    again = await make_central({"dicom": "tcp:0:interface=127.0.0.1"}, extra=gateway_extra(pki, port),
                               site="gateway", role="gateway", name="gateway.centre-a.test")
    await again.gateway.forwarder.resumed()
    assert await central_uids(central) == [ds.SOPInstanceUID]
    assert (await again.forwarding.of_object(ds.SOPInstanceUID)).state == SENT


def _part10(ds) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest_twisted.ensureDeferred
async def test_unknown_calling_ae_is_rejected_at_association(make_central, pki):
    """With [gateway] accept_ae, a modality whose calling AE title is not listed gets A-ASSOCIATE-RJ
    (rejected permanent, calling AE title not recognised); a listed one associates."""
    _, gateway, _ = await start_pair(make_central, pki, gateway_more="accept_ae = CT1 MR1\n")
    port = listener_port(gateway, "dicom")

    def associate(calling):
        ae = AE(ae_title=calling)
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="GATEWAY")
        outcome = (assoc.is_established, assoc.is_rejected)
        rj = assoc.acceptor.primitive
        detail = (rj.result, rj.result_source, rj.diagnostic) if assoc.is_rejected else None
        if assoc.is_established:
            assoc.release()
        return outcome, detail

    assert await deferToThread(associate, "STRANGER") == ((False, True), (0x01, 0x01, 0x03))
    assert await deferToThread(associate, "MR1") == ((True, False), None)


@pytest_twisted.ensureDeferred
async def test_dcmtk_storescu_into_the_gateway(make_central, pki, tmp_path):
    """DCMTK's storescu, a modality-grade SCU, stores into the gateway and the object reaches central."""
    storescu = shutil.which("storescu")
    if storescu is None:
        pytest.skip("DCMTK storescu is not installed (make test-tools)")
    central, gateway, _ = await start_pair(make_central, pki)
    (ds,) = datasets(1)
    path = tmp_path / "one.dcm"
    ds.save_as(path, enforce_file_format=True)
    proc = await deferToThread(subprocess.run, [storescu, "-aet", "CT1", "-aec", "GATEWAY", "127.0.0.1",
                                                str(listener_port(gateway, "dicom")), str(path)],
                               capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    await gateway.gateway.forwarder.kick()
    assert await central_uids(central) == [ds.SOPInstanceUID]


@pytest_twisted.ensureDeferred
async def test_store_and_forward_while_central_is_down(make_central, pki):
    """Central is down while 50 objects arrive: the gateway keeps them, retries with backoff on its
    clock, and once central is back every object is on central exactly once, in arrival order; a
    resend after a lost acknowledgement (same Message-ID) changes nothing there."""
    clock = Clock()
    clock.advance(1_000_000)
    central, gateway, port = await start_pair(make_central, pki, clock=clock, central_up=False)
    forwarder = gateway.gateway.forwarder
    dss = datasets(50)
    assert await deferToThread(cstore, listener_port(gateway, "dicom"), dss) == [0] * 50
    await forwarder.idle()
    waiting = await gateway.forwarding.spooled()
    assert waiting[0] == 50
    head = await gateway.forwarding.head_of_line()
    assert head.uid == dss[0].SOPInstanceUID and head.attempts >= 1 and "Error" in head.last_error
    # Backoff: nothing is tried before the delay is up; then it is tried again and fails again.
    attempts = head.attempts
    clock.advance(0.5)
    await forwarder.idle()
    assert (await gateway.forwarding.head_of_line()).attempts == attempts
    clock.advance(8)
    await forwarder.idle()
    assert (await gateway.forwarding.head_of_line()).attempts == attempts + 1

    central = await make_central({"tls": f"tcp:{port}:interface=127.0.0.1"}, extra=central_extra(pki), site="central")
    clock.advance(8)
    await forwarder.idle()
    await forwarder.kick()
    assert await central_uids(central) == [ds.SOPInstanceUID for ds in dss]
    assert (await gateway.forwarding.spooled()) == (0, 0)

    # The acknowledgement of the first was lost: it is sent again with its Message-ID; central keeps one.
    from sqlalchemy import func, select, update

    from medd.storage.gateway_tables import gateway_forwarding
    from medd.storage.schema import receipts

    await gateway.database.run(lambda c: c.execute(update(gateway_forwarding).where(
        gateway_forwarding.c.uid == dss[0].SOPInstanceUID).values(state=WAITING)))
    assert await forwarder.kick() == 1
    assert len(await central_uids(central)) == 50
    count = await central.database.run(lambda c: c.execute(select(func.count()).select_from(receipts)).scalar_one())
    assert count == 50


@pytest_twisted.ensureDeferred
async def test_full_spool_answers_out_of_resources(make_central, pki, tmp_path):
    """Beyond [gateway] max_spool bytes waiting for central, a C-STORE is answered 0xA700 (retry later)
    and nothing of it is stored; `medd gateway status --json` shows what waits."""
    size = len(testdata("CT_small.dcm"))
    _, gateway, _ = await start_pair(make_central, pki, central_up=False,
                                     gateway_more=f"max_spool = {size * 2 + size // 2}\n")
    dss = datasets(3)
    assert await deferToThread(cstore, listener_port(gateway, "dicom"), dss) == [0, 0, 0xA700]
    await gateway.gateway.forwarder.idle()
    assert (await gateway.forwarding.spooled())[0] == 2
    assert await gateway.index.object_by_uid(dss[2].SOPInstanceUID) is None

    status = await deferToThread(_run_cli, ["gateway", "status", "--json", "--config", str(tmp_path / "gateway" / "gateway.ini")])
    doc = json.loads(status)
    assert doc["waiting"]["count"] == 2 and doc["waiting"]["bytes"] > 2 * size - 1000
    assert doc["oldest_waiting"]["uid"] == dss[0].SOPInstanceUID
    assert doc["last_success"] is None and "Error" in doc["last_error"]["last_error"]


def _run_cli(argv: list[str]) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert medd_main(argv) == 0
    return out.getvalue()


@pytest_twisted.ensureDeferred
async def test_watched_folder(make_central, pki, tmp_path):
    """Files dropped into [gateway] watch are taken once stable over a poll, moved to .done/ once durable;
    a refused one goes to .refused/ with its reason beside it; a file still being written, or under a
    .part name, is left alone."""
    incoming = tmp_path / "incoming"
    (incoming / "cd" / "DIR1").mkdir(parents=True)
    clock = Clock()
    central, gateway, _ = await start_pair(make_central, pki, clock=clock,
                                           gateway_more=f"watch = {incoming}\nwatch_interval = 5\n")
    watch = gateway.gateway.watch
    (good,) = datasets(1)
    good.save_as(incoming / "cd" / "DIR1" / "IM1", enforce_file_format=True)
    (incoming / "cd" / "DICOMDIR").write_bytes(b"an index, not an object")
    (incoming / "junk.dcm").write_bytes(b"not DICOM at all")
    growing = incoming / "growing.dcm"
    growing.write_bytes(testdata("CT_small.dcm")[:1000])
    (incoming / "copying.dcm.part").write_bytes(testdata("MR_small.dcm"))

    first = await watch.kick()
    assert first.stored == 0 and first.waiting == 3  # seen once: not yet stable
    growing.write_bytes(testdata("CT_small.dcm")[:2000])  # still being written
    second = await watch.kick()
    assert (second.stored, second.refused) == (1, 1)
    assert (incoming / ".done" / "cd" / "DIR1" / "IM1").exists() and not (incoming / "cd" / "DIR1" / "IM1").exists()
    assert (incoming / ".refused" / "junk.dcm").exists()
    assert (incoming / ".refused" / "junk.dcm.reason.txt").read_text().strip()
    assert growing.exists() and (incoming / "copying.dcm.part").exists() and (incoming / "cd" / "DICOMDIR").exists()
    assert await gateway.index.object_by_uid(good.SOPInstanceUID) is not None
    await gateway.gateway.forwarder.kick()
    assert await central_uids(central) == [good.SOPInstanceUID]


class FakeCentralOutbox:
    """Central's /outbox for one centre, as the contract with central says (list, fetch, ack, bearer token)."""

    def __init__(self, token: str):
        self.token = token
        self.packages: dict[int, tuple[str, bytes]] = {}
        self.acked: list[int] = []

    def add(self, package: bytes, uid: str) -> None:
        self.packages[len(self.packages) + 1] = (uid, package)

    def resource(self):
        from twisted.web.resource import Resource

        outbox = self

        class Outbox(Resource):
            isLeaf = True

            def render(self, request):
                if request.getHeader(b"authorization") != f"Bearer {outbox.token}".encode():
                    request.setResponseCode(401)
                    return b"{}"
                path = [p for p in request.postpath if p]
                if request.method == b"GET" and not path:
                    waiting = [{"id": i, "uid": uid, "message_id": f"<{i}@central.test>"}
                               for i, (uid, _) in outbox.packages.items() if i not in outbox.acked]
                    return json.dumps(waiting).encode()
                delivery = int(path[0])
                if request.method == b"GET":
                    request.setHeader(b"content-type", b"message/rfc822")
                    return outbox.packages[delivery][1]
                outbox.acked.append(delivery)
                return b"{}"

        root = Resource()
        root.putChild(b"outbox", Outbox())
        return root


def status_package(event: str, uid: str, **params: str) -> bytes:
    from medd.objects import Content
    from medd.package import AttachmentId, build_package

    params = {"event": event, "uid": uid, **params}
    content = Content(media_type="application/json", data=json.dumps(params).encode(), params=params)
    return build_package(content, AttachmentId.of("status", event=event, uid=uid), origin="central@central.test",
                         destination=GATEWAY_ADDRESS)


async def gateway_with_outbox(make_central, pki, outbox: FakeCentralOutbox):
    from twisted.web.server import Site

    port = reactor.listenTCP(0, Site(outbox.resource()), interface="127.0.0.1")
    more = f"outbox = http://127.0.0.1:{port.getHost().port}\ntoken = {outbox.token}\npoll_interval = 60\n"
    central, gateway, _ = await start_pair(make_central, pki, gateway_more=more)
    return central, gateway, port


@pytest_twisted.ensureDeferred
async def test_receipts_are_pulled_from_central_and_tracked(make_central, pki, tmp_path):
    """The gateway pulls central's outbox with the centre's token, records each status as a receipt of
    its object and acknowledges it; `medd track UID --json` shows the forwarding state and the receipts."""
    outbox = FakeCentralOutbox("centre-a-token")
    central, gateway, port = await gateway_with_outbox(make_central, pki, outbox)
    try:
        await gateway.gateway.requestor.idle()  # the pass at start has seen an empty outbox
        (ds,) = datasets(1)
        assert await deferToThread(cstore, listener_port(gateway, "dicom"), [ds]) == [0]
        await gateway.gateway.forwarder.kick()
        uid = ds.SOPInstanceUID
        outbox.add(status_package("opened", uid, user="dr-who", viewer="reader@viewer.test",
                                  time="2025-01-02T03:04:05+00:00"), uid)
        result = await gateway.gateway.requestor.kick()
        assert (result.error, result.acknowledged) == (None, 1) and outbox.acked == [1]
        doc = json.loads(await deferToThread(_run_cli, ["track", uid, "--json", "--config",
                                                         str(tmp_path / "gateway" / "gateway.ini")]))
        assert doc["forwarding"]["state"] == "sent"
        assert [(r["event"], r["viewer"], r["user"]) for r in doc["receipts"]] == [("opened", "reader@viewer.test", "dr-who")]
        status = json.loads(await deferToThread(_run_cli, ["gateway", "status", "--json", "--config",
                                                            str(tmp_path / "gateway" / "gateway.ini")]))
        assert status["latest_receipts"][0]["event"] == "opened" and status["last_success"]["uid"] == uid
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_every_receipt_event_of_the_contract_is_recorded(make_central, pki):
    """Every status event of the contract with central is taken in and recorded with its parameters."""
    outbox = FakeCentralOutbox("centre-a-token")
    _, gateway, port = await gateway_with_outbox(make_central, pki, outbox)
    try:
        await gateway.gateway.requestor.idle()  # the pass at start has seen an empty outbox
        uid = generate_uid()
        outbox.add(status_package("received", uid), uid)
        outbox.add(status_package("routed", uid, viewer="reader@viewer.test"), uid)
        outbox.add(status_package("quarantined", uid, reason="no route for CT from centre-a"), uid)
        outbox.add(status_package("delivered", uid, viewer="reader@viewer.test"), uid)
        outbox.add(status_package("reported", uid, viewer="reader@viewer.test", user="dr-who"), uid)
        result = await gateway.gateway.requestor.kick()
        assert result.acknowledged == 5
        receipts = await gateway.forwarding.receipts_of(uid)
        assert [r.event for r in receipts] == ["received", "routed", "quarantined", "delivered", "reported"]
        assert receipts[2].reason == "no route for CT from centre-a"
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_forwarding_sends_a_batch_over_one_connection(make_central, pki):
    """What waits goes to central in batches of up to 32 packages, each batch pipelined over one TLS
    connection, in arrival order."""
    clock = Clock()
    central, gateway, port = await start_pair(make_central, pki, clock=clock, central_up=False)
    forwarder = gateway.gateway.forwarder
    batches = []
    send_batch = forwarder.sender.send_batch

    def spy(reactor_, url, packages, settings):
        batches.append(len(packages))
        return send_batch(reactor_, url, packages, settings)

    forwarder.sender = type("Spy", (), {"send_batch": staticmethod(spy), "schemes": ("tls",)})()
    from zope.interface import alsoProvides

    from medd.plugins.interfaces import IBatchSender

    alsoProvides(forwarder.sender, IBatchSender)
    dss = datasets(40)
    assert await deferToThread(cstore, listener_port(gateway, "dicom"), dss) == [0] * 40
    await forwarder.idle()
    batches.clear()
    central = await make_central({"tls": f"tcp:{port}:interface=127.0.0.1"}, extra=central_extra(pki), site="central")
    clock.advance(10)
    await forwarder.idle()
    await forwarder.kick()
    assert batches == [32, 8]
    assert await central_uids(central) == [ds.SOPInstanceUID for ds in dss]


@pytest_twisted.ensureDeferred
async def test_each_package_of_a_batch_is_marked_by_its_own_reply(make_central, pki):
    """In a batch answered ok, refused, retry, ok: the first is sent, the second refused for good, the
    third waits for a retry after backoff and the fourth, behind it, is sent again later (same
    Message-ID) rather than out of order."""
    from zope.interface import implementer

    from medd.plugins.interfaces import IBatchSender
    from medd.storage.forwarding import REFUSED

    @implementer(IBatchSender)
    class Scripted:
        schemes = ("tls",)

        def __init__(self):
            self.answers = [[{"status": "ok"}, {"status": "refused", "reason": "invalid: bad"},
                             {"status": "retry", "reason": "disk full"}, {"status": "ok"}]]

        def send(self, *a):
            raise AssertionError("batches only")

        def send_batch(self, reactor_, url, packages, settings):
            from twisted.internet.defer import succeed

            return succeed(self.answers.pop(0) if self.answers else [{"status": "ok"}] * len(packages))

    clock = Clock()
    clock.advance(1000)
    _, gateway, _ = await start_pair(make_central, pki, clock=clock, central_up=False)
    forwarder = gateway.gateway.forwarder
    forwarder.sender = Scripted()
    forwarder.stopService()
    await forwarder.idle()
    dss = datasets(4)
    assert await deferToThread(cstore, listener_port(gateway, "dicom"), dss) == [0] * 4
    forwarder.startService()
    await forwarder.kick()
    states = [(await gateway.forwarding.of_object(ds.SOPInstanceUID)) for ds in dss]
    assert [(s.state, s.attempts) for s in states] == [(SENT, 1), (REFUSED, 1), (WAITING, 1), (WAITING, 0)]
    assert states[2].last_error == "disk full"
    clock.advance(1)
    await forwarder.idle()
    states = [(await gateway.forwarding.of_object(ds.SOPInstanceUID)) for ds in dss]
    assert [s.state for s in states] == [SENT, REFUSED, SENT, SENT]


@pytest_twisted.ensureDeferred
async def test_a_report_from_a_modality_is_forwarded_as_a_report(make_central, pki):
    """The forwarder names a package's attachment from the gateway's index row (it does not open the
    object again): an SR sent by the centre reaches central as a report of its study, which central
    accepts only if the Medd-Attachment tells the truth about the content."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    central, gateway, _ = await start_pair(make_central, pki)
    # Reports are taken only from a registered centre (here by its client certificate), for its own studies.
    fingerprint = x509.load_pem_x509_certificate(pki["client"].read_bytes()).fingerprint(hashes.SHA256()).hex()
    await central.central_storage.directory.add_centre("centre-a", addresses=[GATEWAY_ADDRESS],
                                                       client_certificate=fingerprint)
    sr = pydicom.dcmread(pydicom.data.get_testdata_file("test-SR.dcm"))
    # A centre reports only on a study of its own: the study's image goes first, as a modality sends it.
    [image] = datasets(1, study=sr.StudyInstanceUID)
    for ds in (image, sr):
        assert (await gateway.ingest.receive_dicom(_part10(ds), transport="dicom", origin="CT1")).created
    await gateway.gateway.forwarder.kick()
    assert (await gateway.forwarding.of_object(sr.SOPInstanceUID)).state == SENT
    record = await central.index.object_by_uid(sr.SOPInstanceUID)
    assert (record.object_type, record.study_instance_uid, record.origin) == ("report", sr.StudyInstanceUID,
                                                                            GATEWAY_ADDRESS)
