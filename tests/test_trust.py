"""Central knows who is sending (issue 8, central side), on loopback with a real central node: a
registered centre's address is accepted only from that centre authenticated (HTTP, SMTP, the TLS
socket); a calling AE title names a centre only from its networks; the centre's outbox carries its
receipts (status packages) and the results made on its studies, fetched with its own token."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest_twisted
import requests
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE
from sqlalchemy import func, select
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from medd.objects import parse_part10
from medd.package import build_package, read_package
from medd.plugins.host import load_plugins
from medd.plugins.objecttypes import ImageType, ReportType, status_content, text_report_content
from medd.storage import index
from medd.storage.routing_tables import deliveries
from medd.storage.schema import status_events
from medd.tlscert import make_self_signed
from medd.transports.tls import send_packages
from tests.conftest import listener_port, testdata, write_config
from tests.test_smtp import send as smtp_send

CENTRE = "centre-a"
ADDRESS = "gw@centre-a.example"
VIEWER = "dr-lee@viewers.example"
MEDD = str(Path(sys.executable).parent / "medd")
RFC822 = {"Content-Type": "message/rfc822"}


def _medd(ini, *args) -> subprocess.CompletedProcess:
    return subprocess.run([MEDD, *args, "--config", str(ini)], capture_output=True, text=True)


def _image_package(name: str, origin: str = ADDRESS, to: str = "central.test") -> tuple[bytes, str]:
    content = parse_part10(testdata(name))
    return build_package(content, ImageType().identifier(content), origin=origin, destination=to), \
        content.keyinfo.sop_instance_uid


def _cstore(port: int, ds, calling: str) -> int:
    ae = AE(ae_title=calling)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDD")
    try:
        return assoc.send_c_store(ds).Status
    finally:
        assoc.release()


def _ct(suffix: str = ""):
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID += suffix
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


async def _count(node, table) -> int:
    return await node.database.run(lambda c: c.execute(select(func.count()).select_from(table)).scalar())


def _blobs(node) -> list:
    return [p for p in (node.config.storage_path / "blobs").rglob("*") if p.is_file()]


@pytest_twisted.ensureDeferred
async def test_spoofed_centre_refused_over_http_smtp_and_tls(make_central, tmp_path):
    """A package whose From is a registered centre's address, sent with no credential or another's, is refused
    over HTTP (401 problem JSON without a credential or with one that is no one's, 403 with another's), SMTP (554) and the TLS socket (`refused`, the certificate's CN decides), and
    leaves no blob, no row and no delivery; with the centre's token or certificate it is accepted and routed."""
    ca_cert, ca_key = tmp_path / "ca.pem", tmp_path / "ca-key.pem"
    make_self_signed(ca_cert, ca_key, "medd test client CA")
    server_cert, server_key = tmp_path / "server.pem", tmp_path / "server-key.pem"
    make_self_signed(server_cert, server_key, "127.0.0.1")
    extra = (f"[tls]\ncertificate = {server_cert}\nprivate_key = {server_key}\n"
             f"client_ca = {ca_cert}\nclient_ca_key = {ca_key}\n")
    listen = {key: "tcp:0:interface=127.0.0.1" for key in ("http", "smtp", "tls")}
    ini = write_config(tmp_path, listen, extra)
    added = _medd(ini, "centres", "add", CENTRE, "--address", ADDRESS, "--token", "--client-cert", str(tmp_path / "a.pem"))
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip().splitlines()[-1]
    other = _medd(ini, "centres", "add", "centre-b", "--address", "gw@centre-b.example",
                  "--client-cert", str(tmp_path / "b.pem"))
    assert other.returncode == 0, other.stderr

    central = await make_central(listen, extra=extra)
    directory = central.central_storage.directory
    viewer_token = (await directory.add_viewer(VIEWER, None, [CENTRE])).token
    await directory.add_rule(VIEWER, centre=CENTRE)
    http = f"http://127.0.0.1:{listener_port(central, 'http')}/packages"
    tls_port = listener_port(central, "tls")

    spoof, _ = _image_package("CT_small.dcm")
    for headers in (RFC822, {**RFC822, "Authorization": "Bearer not-a-token"}):
        r = await deferToThread(requests.post, http, data=spoof, headers=headers)
        assert r.status_code == 401 and r.headers["Content-Type"] == "application/problem+json", r.text
    r = await deferToThread(requests.post, http, data=spoof, headers={**RFC822, "Authorization": f"Bearer {viewer_token}"})
    assert r.status_code == 403 and r.headers["Content-Type"] == "application/problem+json", r.text
    assert r.json()["type"].endswith("unauthenticated") and CENTRE in r.json()["detail"]
    code, reply = await deferToThread(smtp_send, listener_port(central, "smtp"), spoof)
    assert code == 554, reply
    (refused,) = await send_packages(reactor, "127.0.0.1", tls_port, [spoof], ca_pem=server_cert.read_bytes(),
                                     client_cert=(tmp_path / "b.pem").read_bytes())
    assert refused["status"] == "refused", refused
    await central.routing.kick()
    assert await central.database.run(index.count_objects) == 0 and not _blobs(central)
    assert await _count(central, deliveries) == 0

    by_token, token_uid = _image_package("CT_small.dcm")
    r = await deferToThread(requests.post, http, data=by_token, headers={**RFC822, "Authorization": f"Bearer {token}"})
    assert r.status_code == 201, r.text
    by_cert, cert_uid = _image_package("MR_small.dcm")
    (ok,) = await send_packages(reactor, "127.0.0.1", tls_port, [by_cert], ca_pem=server_cert.read_bytes(),
                                client_cert=(tmp_path / "a.pem").read_bytes())
    assert ok["status"] == "ok", ok
    await central.routing.kick()
    for uid in (token_uid, cert_uid):
        history = await central.central_storage.tracking.object_history(uid)
        assert history.routing.centre == CENTRE and history.routing.outcome == "routed"
        assert VIEWER in [d.destination for d in history.deliveries]


@pytest_twisted.ensureDeferred
async def test_ae_title_names_its_centre_only_from_its_networks(make_central):
    """Plain DIMSE: with networks listed, a C-STORE with the centre's calling AE title from elsewhere is
    quarantined as from an unknown centre, the peer address in the reason; from a listed network it is the
    centre's and is routed. The association's peer address is kept with the object."""
    central = await make_central({"dicom": "tcp:0:interface=127.0.0.1"})
    directory = central.central_storage.directory
    await directory.add_centre(CENTRE, aes=["CT1"], networks=["10.1.2.0/24"])
    await directory.add_viewer(VIEWER, None, [CENTRE])
    await directory.add_rule(VIEWER, centre=CENTRE)
    port = listener_port(central, "dicom")

    outside = _ct(".1")
    assert await deferToThread(_cstore, port, outside, "CT1") == 0
    await central.routing.kick()
    (held,) = await central.central_storage.routing.quarantined()
    assert held.uid == outside.SOPInstanceUID
    assert "unknown imaging centre" in held.reason and "127.0.0.1" in held.reason and "10.1.2.0/24" in held.reason
    assert (await central.index.object_by_uid(outside.SOPInstanceUID)).peer == "127.0.0.1"

    await directory.add_centre(CENTRE, networks=["127.0.0.0/8"])
    inside = _ct(".2")
    assert await deferToThread(_cstore, port, inside, "CT1") == 0
    await central.routing.kick()
    history = await central.central_storage.tracking.object_history(inside.SOPInstanceUID)
    assert history.routing.centre == CENTRE and [d.destination for d in history.deliveries] == [VIEWER]


def _outbox(base: str, token: str) -> list[dict]:
    r = requests.get(f"{base}/outbox", headers={"Authorization": f"Bearer {token}"})
    r.raise_for_status()
    return r.json()


def _fetch(base: str, token: str, item: dict) -> requests.Response:
    return requests.get(f"{base}{item['url']}", headers={"Authorization": f"Bearer {token}"})


def _ack(base: str, token: str, item: dict) -> requests.Response:
    return requests.post(f"{base}{item['url']}/ack", headers={"Authorization": f"Bearer {token}"})


@pytest_twisted.ensureDeferred
async def test_centre_outbox_carries_receipts_and_results(make_central):
    """After a C-STORE from a centre with a token, its image routed to a pull viewer that fetches, opens and
    reports it, the centre's own outbox (its token) lists the status packages received, routed, delivered,
    opened and reported, and the report itself; each status names the centre's object by UID only; acks
    empty it. Neither token sees the other's deliveries, and central records none of the statuses it sends
    as received."""
    central = await make_central({"dicom": "tcp:0:interface=127.0.0.1", "http": "tcp:0:interface=127.0.0.1"})
    directory = central.central_storage.directory
    centre_token = (await directory.add_centre(CENTRE, aes=["CT1"], addresses=[ADDRESS], token=True)).token
    viewer_token = (await directory.add_viewer(VIEWER, None, [CENTRE])).token
    await directory.add_rule(VIEWER, centre=CENTRE)
    base = f"http://127.0.0.1:{listener_port(central, 'http')}"
    ct = _ct()
    uid = ct.SOPInstanceUID
    assert await deferToThread(_cstore, listener_port(central, "dicom"), ct, "CT1") == 0
    await central.routing.kick()

    (image,) = await deferToThread(_outbox, base, viewer_token)
    assert image["uid"] == uid and image["object_type"] == "image"
    listed = await deferToThread(_outbox, base, centre_token)
    assert [(i["object_type"], i["event"], i["uid"]) for i in listed] == [("status", "received", uid),
                                                                          ("status", "routed", uid)]
    # A viewer's token never opens a centre's delivery, nor a centre's a viewer's.
    assert (await deferToThread(_fetch, base, viewer_token, listed[0])).status_code == 404
    assert (await deferToThread(_ack, base, centre_token, image)).status_code == 404

    assert (await deferToThread(_fetch, base, viewer_token, image)).status_code == 200
    assert (await deferToThread(_ack, base, viewer_token, image)).status_code == 200
    opened = build_package(status_content("opened", uid, "dr-lee"), _status_id("opened", uid), origin=VIEWER,
                           destination="central.test")
    await central.ingest.receive_package(opened, transport="http", credentials=viewer_token)
    report = text_report_content("No acute findings.", "2.25.8080", ct.StudyInstanceUID)
    await central.ingest.receive_package(
        build_package(report, ReportType().identifier(report), origin=VIEWER, destination="central.test"),
        transport="http", credentials=viewer_token)
    await central.routing.kick()

    listed = await deferToThread(_outbox, base, centre_token)
    statuses = {i["event"]: i for i in listed if i["object_type"] == "status"}
    assert list(statuses) == ["received", "routed", "delivered", "opened", "reported"]
    assert {i["uid"] for i in statuses.values()} == {uid}
    assert [(i["object_type"], i["uid"]) for i in listed if i["object_type"] != "status"] == [("report", "2.25.8080")]
    plugins = load_plugins()
    for item in listed:
        r = await deferToThread(_fetch, base, centre_token, item)
        assert r.status_code == 200 and r.headers["Content-Type"] == "message/rfc822"
        package = read_package(r.content, plugins.object_type)
        assert package.destination == ADDRESS and package.message_id == item["message_id"]
        if item["object_type"] == "status":
            assert str(package.attachment) == f"status; event={item['event']}; uid={uid}"
            assert str(ct.PatientName) not in r.content.decode("latin-1").partition("\r\n\r\n")[0]
            params = package.content.params
            assert params["event"] == item["event"] and params["uid"] == uid
    params = {i["event"]: read_package((await deferToThread(_fetch, base, centre_token, i)).content,
                                       plugins.object_type).content.params for i in statuses.values()}
    assert params["routed"]["viewer"] == VIEWER and params["delivered"]["viewer"] == VIEWER
    assert params["opened"]["user"] == "dr-lee" and params["opened"]["viewer"] == VIEWER
    assert params["reported"]["report"] == "2.25.8080"
    for item in listed:
        assert (await deferToThread(_ack, base, centre_token, item)).status_code == 200
    assert await deferToThread(_outbox, base, centre_token) == []
    # Acknowledging a result home tells nobody anything more; only the viewer's status was received.
    await central.routing.kick()
    assert await deferToThread(_outbox, base, centre_token) == []
    assert await _count(central, status_events) == 1


@pytest_twisted.ensureDeferred
async def test_a_report_that_came_before_the_images_goes_home_with_them(make_central):
    """A viewer's report on a study central holds no image of yet is attached to no centre; the first
    of the centre's images of that study then sends it home, and each image is told "reported"."""
    central = await make_central({"dicom": "tcp:0:interface=127.0.0.1", "http": "tcp:0:interface=127.0.0.1"})
    directory = central.central_storage.directory
    centre_token = (await directory.add_centre(CENTRE, aes=["CT1"], addresses=[ADDRESS], token=True)).token
    viewer_token = (await directory.add_viewer(VIEWER, None, [CENTRE])).token
    first, second = _ct(".1"), _ct(".2")
    report = text_report_content("Report before images.", "2.25.8181", first.StudyInstanceUID)
    await central.ingest.receive_package(
        build_package(report, ReportType().identifier(report), origin=VIEWER, destination="central.test"),
        transport="http", credentials=viewer_token)
    await central.routing.kick()
    assert await central.central_storage.deliveries.pull_waiting(ADDRESS) == []

    for ds in (first, second):
        assert await deferToThread(_cstore, listener_port(central, "dicom"), ds, "CT1") == 0
    await central.routing.kick()
    base = f"http://127.0.0.1:{listener_port(central, 'http')}"
    listed = await deferToThread(_outbox, base, centre_token)
    assert [(i["object_type"], i["uid"]) for i in listed if i["object_type"] != "status"] == [("report", "2.25.8181")]
    reported = sorted(i["uid"] for i in listed if i.get("event") == "reported")
    assert reported == sorted([first.SOPInstanceUID, second.SOPInstanceUID])


def _status_id(event: str, uid: str):
    from medd.package import AttachmentId

    return AttachmentId.of("status", event=event, uid=uid)


@pytest_twisted.ensureDeferred
async def test_quarantined_object_of_a_centre_is_reported_with_its_reason(make_central):
    """An object of a centre with an outbox that fails verification goes back to it as `quarantined`,
    with the reason, after `received`; an administrator's later correction adds `routed`."""
    central = await make_central({"dicom": "tcp:0:interface=127.0.0.1"})
    directory = central.central_storage.directory
    await directory.add_centre(CENTRE, aes=["CT1"], addresses=[ADDRESS], token=True)
    await directory.add_viewer(VIEWER, None, [])  # not authorised for the centre
    await directory.add_rule(VIEWER, centre=CENTRE)
    assert await deferToThread(_cstore, listener_port(central, "dicom"), _ct(), "CT1") == 0
    await central.routing.kick()
    waiting = await central.central_storage.deliveries.pull_waiting(ADDRESS)
    assert [w.delivery.status["event"] for w in waiting] == ["received", "quarantined"]
    assert "not authorised" in waiting[1].delivery.status["reason"]

    from medd.central.routing import correct_route

    await directory.authorise(VIEWER, CENTRE)
    (held,) = await central.central_storage.routing.quarantined()
    await correct_route(central.central_storage.routing, held.id, VIEWER, "alice")
    waiting = await central.central_storage.deliveries.pull_waiting(ADDRESS)
    assert [w.delivery.status["event"] for w in waiting] == ["received", "quarantined", "routed"]


def test_centres_cli_tokens_networks_and_admin(tmp_path):
    """`medd centres add --token` prints the token as its last line and `medd centres token` replaces it;
    a credential needs an address and a network must be a CIDR; `medd quarantine route|reject --admin`
    records the administrator in the correction (default: the OS user)."""
    import getpass

    from datetime import datetime, timezone

    from medd.config import load_config
    from medd.storage.database import WallClock, open_database, resolved
    from medd.storage.directory import Directory
    from medd.storage.schema import objects

    ini = write_config(tmp_path)
    assert _medd(ini, "centres", "add", CENTRE, "--ae", "CT1", "--token").returncode == 2  # no address
    assert _medd(ini, "centres", "add", CENTRE, "--network", "not-a-net").returncode == 2
    added = _medd(ini, "centres", "add", CENTRE, "--address", ADDRESS, "--network", "10.1.2.3/24", "--token")
    assert added.returncode == 0, added.stderr
    first = added.stdout.strip().splitlines()[-1]
    assert "network 10.1.2.0/24" in added.stdout and "[token]" in _medd(ini, "centres", "list").stdout
    rotated = _medd(ini, "centres", "token", CENTRE)
    assert rotated.returncode == 0, rotated.stderr
    second = rotated.stdout.strip().splitlines()[-1]
    assert second != first and len(second) >= 40

    db = open_database(load_config(ini))
    try:
        directory = Directory(db, WallClock())
        assert resolved(directory.outbox_owner(first)) is None
        owner = resolved(directory.outbox_owner(second))
        assert (owner.kind, owner.name, owner.address) == ("centre", CENTRE, ADDRESS)
    finally:
        db.stop()

    # A viewer may not take a centre's address, nor a centre a viewer's.
    assert _medd(ini, "viewers", "add", ADDRESS, "--pull").returncode == 2
    assert _medd(ini, "viewers", "add", VIEWER, "--pull").returncode == 0
    assert _medd(ini, "centres", "add", "centre-b", "--address", VIEWER).returncode == 2

    # Corrections record who made them.
    from medd.storage.routing_tables import corrections, quarantine

    db = open_database(load_config(ini))
    try:
        def hold(conn):
            for n in (1, 2):
                conn.execute(objects.insert().values(
                    sop_instance_uid=f"2.25.{n}", object_type="image", media_type="application/dicom",
                    study_instance_uid="2.25.9", digest="0" * 64, size=1, origin="STRANGER", transport="dicom",
                    received_at=datetime.now(timezone.utc)))
                conn.execute(quarantine.insert().values(uid=f"2.25.{n}", reason="test", state="held",
                                                        created_at=datetime.now(timezone.utc)))

        resolved(db.run(hold))
    finally:
        db.stop()
    assert _medd(ini, "quarantine", "reject", "1", "--reason", "wrong patient", "--admin", "bob").returncode == 0
    assert _medd(ini, "quarantine", "reject", "2", "--reason", "duplicate").returncode == 0
    db = open_database(load_config(ini))
    try:
        admins = resolved(db.run(lambda c: [r.admin for r in c.execute(select(corrections).order_by(corrections.c.id))]))
    finally:
        db.stop()
    assert admins == ["bob", getpass.getuser()]
