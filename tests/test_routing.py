"""Central routing end to end on loopback: directory, verification, quarantine,
correction, push and pull delivery, tracking, status messages, restarts."""
from __future__ import annotations

import io

import pytest
import pytest_twisted
import requests
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE
from sqlalchemy import func, select
from twisted.internet.threads import deferToThread

from medd.objects import parse_part10
from medd.package import AttachmentId, build_package, read_package
from medd.plugins.host import load_plugins
from medd.plugins.objecttypes import ImageType, status_content
from medd.storage.routing_tables import deliveries
from tests.conftest import listener_port, testdata

FAST = "[delivery]\nretry_base = 0.05\nretry_multiplier = 2\nretry_max_delay = 0.3\npoll_interval = 0.2\n"
PUSH = "dr-push@viewers.example"
PULL = "dr-pull@viewers.example"
# centre-a's bearer token: its packages over HTTP are accepted only with it.
CENTRE_A_TOKEN = "centre-a-token-" + "x" * 32
# Central's [push] http_token, the [central] push_token of a medd viewer it pushes to over HTTP.
PUSH_TOKEN = "central-pushes-with-this-" + "p" * 32
PUSH_EXTRA = f"[push]\nhttp_token = {PUSH_TOKEN}\n"


def _cstore(port: int, datasets, calling="MODALITY1"):
    ae = AE(ae_title=calling)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDD")
    try:
        return [assoc.send_c_store(ds).Status for ds in datasets]
    finally:
        assoc.release()


def _with_recipient(name: str, recipient: str | None = None, uid_suffix: str = ""):
    ds = dcmread(get_testdata_file(name))
    if recipient:
        ds.NamesOfIntendedRecipientsOfResults = recipient
    if uid_suffix:
        ds.SOPInstanceUID = ds.SOPInstanceUID + uid_suffix
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _package(name: str, to: str, origin: str = "ct1@centre-a.example", uid_suffix: str = "") -> tuple[bytes, str]:
    ds = _with_recipient(name, uid_suffix=uid_suffix)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    content = parse_part10(buf.getvalue())
    return build_package(content, ImageType().identifier(content), origin=origin, destination=to), content.keyinfo.sop_instance_uid


async def _setup_directory(node, push_url: str = "smtp://127.0.0.1:9", push_viewer_token: str | None = None):
    directory = node.central_storage.directory
    await directory.add_centre("centre-a", aes=["MODALITY1"], addresses=["ct1@centre-a.example"], token=CENTRE_A_TOKEN)
    await directory.add_centre("centre-b", aes=["MODALITY2"])
    await directory.add_viewer(PUSH, push_url, ["centre-a"], token=push_viewer_token)
    pull = await directory.add_viewer(PULL, None, ["centre-a:CT"])
    await directory.add_rule(PUSH, centre="centre-a", modality="MR")
    return pull.token, await directory.add_admin("alice")


# The bearer token of the push viewer PUSH on central (its requests to central).
PUSH_VIEWER_TOKEN = "dr-push-sends-with-this-" + "v" * 32


async def _push_viewer(make_central, central):
    """A medd viewer node PUSH for ``central`` to push to at its ``POST /packages`` (the URL returned), which
    it takes by the token both know (central's [push] http_token, the viewer's [central] push_token).
    Register it with that URL and PUSH_VIEWER_TOKEN."""
    from tests.test_viewer import LOOPBACK, _fake_clock, _viewer_extra

    extra = _viewer_extra(listener_port(central, "http"), PUSH_VIEWER_TOKEN) + f"push_token = {PUSH_TOKEN}\n"
    viewer = await make_central({"http": LOOPBACK}, site="viewer-push", role="viewer", name=PUSH, clock=_fake_clock(),
                                extra=extra)
    return viewer, f"http://127.0.0.1:{listener_port(viewer, 'http')}/packages"


async def _state(node, uid, destination):
    """The state of the delivery of ``uid`` to ``destination``, or None if there is none."""
    rows = await node.central_storage.deliveries.of_object(uid)
    return next((d.state for d in rows if d.destination == destination), None)


async def _delivered(central) -> None:
    """Route what is stored, then wait until every push worker has done what is due: a push to a
    real viewer on loopback ends when the viewer has acknowledged the package as durable."""
    await central.routing.kick()
    await central.routing.outbox.settled()


@pytest_twisted.ensureDeferred
async def test_route_verify_quarantine_correct_deliver_and_open(make_central, db_url):
    """Objects are routed by To, by (0040,1010) and by rule; unknown and unauthorised destinations are
    quarantined with their reason, corrected by an administrator over the API, and delivered; the pull
    viewer fetches and acknowledges; its status package moves the object to opened. On SQLite and PostgreSQL."""
    viewer = await make_central({"smtp": "tcp:0:interface=127.0.0.1"}, site="viewer-push")
    central = await make_central({"dicom": "tcp:0:interface=127.0.0.1", "http": "tcp:0:interface=127.0.0.1"}, extra=FAST,
                                 db_url=db_url)
    pull_token, admin_token = await _setup_directory(central, f"smtp://127.0.0.1:{listener_port(viewer, 'smtp')}")
    http = f"http://127.0.0.1:{listener_port(central, 'http')}"
    dicom_port = listener_port(central, "dicom")

    ct = _with_recipient("CT_small.dcm", recipient=PULL)  # by (0040,1010) to the pull viewer
    mr = _with_recipient("MR_small.dcm")  # by rule centre-a MR -> push viewer
    assert await deferToThread(_cstore, dicom_port, [ct, mr]) == [0, 0]

    to_push, to_push_uid = _package("JPEG2000.dcm", PUSH)  # by To
    unknown, unknown_uid = _package("SC_rgb_rle.dcm", "nobody@viewers.example")
    unauthorised, unauth_uid = _package("MR_small.dcm", PULL, uid_suffix=".7")  # PULL may only see CT
    for pkg in (to_push, unknown, unauthorised):
        r = await deferToThread(requests.post, f"{http}/packages", data=pkg, headers={
            "Content-Type": "message/rfc822", "Authorization": f"Bearer {CENTRE_A_TOKEN}"})
        assert r.status_code == 201, r.text

    # push deliveries arrive in the push viewer's own store
    await _delivered(central)
    for uid in (mr.SOPInstanceUID, to_push_uid):
        assert await viewer.index.object_by_uid(uid) is not None
        assert await _state(central, uid, PUSH) == "delivered"

    # quarantine holds the two bad routes, with reasons
    headers = {"Authorization": f"Bearer {admin_token}"}
    held = (await deferToThread(requests.get, f"{http}/api/quarantine", headers=headers)).json()
    reasons = {e["uid"]: e["reason"] for e in held}
    assert "unknown destination nobody@viewers.example" in reasons[unknown_uid]
    assert f"viewer {PULL} is not authorised for centre centre-a modality MR" in reasons[unauth_uid]
    assert await _state(central, unknown_uid, "nobody@viewers.example") is None

    # the API is closed without a token, and a viewer token is not an admin token
    assert (await deferToThread(requests.get, f"{http}/api/quarantine")).status_code == 401
    assert (await deferToThread(requests.get, f"{http}/api/quarantine",
                                headers={"Authorization": f"Bearer {pull_token}"})).status_code == 403

    # correcting to another unauthorised viewer is refused and changes nothing
    entry = {e["uid"]: e["id"] for e in held}
    r = await deferToThread(requests.post, f"{http}/api/quarantine/{entry[unauth_uid]}/route", json={"to": PULL}, headers=headers)
    assert r.status_code == 409 and "not authorised" in r.json()["detail"]
    # correct both to the push viewer
    for uid in (unknown_uid, unauth_uid):
        r = await deferToThread(requests.post, f"{http}/api/quarantine/{entry[uid]}/route", json={"to": PUSH}, headers=headers)
        assert r.status_code == 200, r.text
    await _delivered(central)
    for uid in (unknown_uid, unauth_uid):
        assert await viewer.index.object_by_uid(uid) is not None

    # the pull viewer lists, fetches and acknowledges its CT
    vh = {"Authorization": f"Bearer {pull_token}"}
    waiting = (await deferToThread(requests.get, f"{http}/outbox", headers=vh)).json()
    assert [w["uid"] for w in waiting] == [ct.SOPInstanceUID]
    fetched = await deferToThread(requests.get, f"{http}{waiting[0]['url']}", headers=vh)
    assert fetched.headers["Content-Type"] == "message/rfc822"
    package = read_package(fetched.content, load_plugins().object_type)
    assert package.content.keyinfo.sop_instance_uid == ct.SOPInstanceUID and package.destination == PULL
    assert await _state(central, ct.SOPInstanceUID, PULL) == "sent"
    r = await deferToThread(requests.post, f"{http}{waiting[0]['url']}/ack", headers=vh)
    assert r.status_code == 200
    assert await _state(central, ct.SOPInstanceUID, PULL) == "delivered"
    assert (await deferToThread(requests.get, f"{http}/outbox", headers=vh)).json() == []

    # the radiologist opens it: a status package from the viewer
    status = build_package(status_content("opened", ct.SOPInstanceUID, "dr-pull"),
                           AttachmentId.of("status", event="opened", uid=ct.SOPInstanceUID), origin=PULL, destination="central.test")
    # a status in the viewer's name but without its token is refused and changes nothing: anonymous, 401;
    # with another's credential (centre-a's token), 403
    r = await deferToThread(requests.post, f"{http}/packages", data=status, headers={"Content-Type": "message/rfc822"})
    assert r.status_code == 401, r.text
    r = await deferToThread(requests.post, f"{http}/packages", data=status, headers={
        "Content-Type": "message/rfc822", "Authorization": f"Bearer {CENTRE_A_TOKEN}"})
    assert r.status_code == 403 and "authenticated as that viewer" in r.json()["detail"]
    assert await _state(central, ct.SOPInstanceUID, PULL) == "delivered"
    r = await deferToThread(requests.post, f"{http}/packages", data=status,
                            headers={"Content-Type": "message/rfc822", **vh})
    assert r.status_code == 201, r.text
    track = (await deferToThread(requests.get, f"{http}/api/objects/{ct.SOPInstanceUID}", headers=headers)).json()
    (delivery,) = track["deliveries"]
    assert delivery["state"] == "opened" and delivery["opened_by"] == "dr-pull"
    assert [e["state"] for e in delivery["history"]] == ["queued", "sent", "delivered", "opened"]
    assert track["object"]["modality"] == "CT" and track["routing"]["centre"] == "centre-a"

    # corrections are recorded: who, old and new route
    track = (await deferToThread(requests.get, f"{http}/api/objects/{unknown_uid}", headers=headers)).json()
    (q,) = track["quarantine"]
    assert q["state"] == "released"
    assert q["corrections"][0]["admin"] == "alice" and q["corrections"][0]["old_route"] == "nobody@viewers.example"
    assert q["corrections"][0]["new_route"] == PUSH


@pytest_twisted.ensureDeferred
async def test_unknown_centre_is_quarantined(make_central):
    """An object from a calling AE title that is no registered centre is quarantined, whatever its own
    Institution Name says, and nothing is queued."""
    central = await make_central({"dicom": "tcp:0:interface=127.0.0.1"}, extra=FAST)
    await _setup_directory(central)
    ds = _with_recipient("CT_small.dcm", recipient=PULL)
    ds.InstitutionName = "centre-a"
    assert await deferToThread(_cstore, listener_port(central, "dicom"), [ds], "STRANGER") == [0]
    await central.routing.kick()
    entries = await central.central_storage.routing.quarantined()
    assert "unknown imaging centre" in entries[0].reason and "STRANGER" in entries[0].reason
    assert await central.database.run(lambda c: c.execute(select(func.count()).select_from(deliveries)).scalar()) == 0


def test_medd_cli_directory_and_quarantine(tmp_path):
    """The admin CLI manages centres, viewers (printing a token), rules and shows an empty quarantine."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import write_config

    medd = str(Path(sys.executable).parent / "medd")
    ini = str(write_config(tmp_path))

    def run(*args):
        return subprocess.run([medd, *args, "--config", ini], capture_output=True, text=True)

    assert run("centres", "add", "centre-a", "--ae", "CT1").returncode == 0
    added = run("viewers", "add", PULL, "--pull", "--authorise", "centre-a:CT")
    assert added.returncode == 0 and len(added.stdout.strip()) >= 40
    assert "centre-a:CT" in run("viewers", "list").stdout
    assert run("viewers", "authorise", PULL, "nowhere").returncode == 2
    assert run("routes", "add", "--centre", "centre-a", "--to", PULL).returncode == 0
    assert "centre=centre-a" in run("routes", "list").stdout
    assert "(quarantine is empty)" in run("quarantine", "list").stdout
    assert run("viewers", "revoke", PULL, "centre-a:CT").returncode == 0
    assert "(no authorisation)" in run("viewers", "list").stdout


@pytest.mark.parametrize("scheme", ["tls", "http"])
@pytest_twisted.ensureDeferred
async def test_push_over_tls_and_http(make_central, tmp_path, scheme):
    """A push viewer reached over the TLS socket transport (server certificate verified against
    [push] tls_ca) or over HTTP POST /packages (a medd viewer node, taking central's push by the token both
    know) receives its object, and central records it delivered."""
    from medd.storage import index
    from medd.tlscert import make_self_signed

    listen = {"dicom": "tcp:0:interface=127.0.0.1"}
    if scheme == "tls":
        cert, key = tmp_path / "v-cert.pem", tmp_path / "v-key.pem"
        make_self_signed(cert, key, "127.0.0.1")
        central = await make_central(listen, extra=FAST + f"[push]\ntls_ca = {cert}\n")
        await central.central_storage.directory.add_centre("centre-a", aes=["MODALITY1"])
        viewer = await make_central({"tls": "tcp:0:interface=127.0.0.1"}, site="viewer-push",
                                    extra=f"[tls]\ncertificate = {cert}\nprivate_key = {key}\n")
        await central.central_storage.directory.add_viewer(PUSH, f"tls://127.0.0.1:{listener_port(viewer, 'tls')}",
                                                           ["centre-a"])
    else:
        central = await make_central({**listen, "http": "tcp:0:interface=127.0.0.1"}, extra=FAST + PUSH_EXTRA)
        await central.central_storage.directory.add_centre("centre-a", aes=["MODALITY1"])
        viewer, url = await _push_viewer(make_central, central)
        await central.central_storage.directory.add_viewer(PUSH, url, ["centre-a"], token=PUSH_VIEWER_TOKEN)

    ds = _with_recipient("CT_small.dcm", recipient=PUSH)
    assert await deferToThread(_cstore, listener_port(central, "dicom"), [ds]) == [0]
    await _delivered(central)
    record = await viewer.database.run(lambda c: index.object_by_uid(c, ds.SOPInstanceUID))
    assert record.transport == scheme and record.origin == "central@central.test"
    assert await _state(central, ds.SOPInstanceUID, PUSH) == "delivered"


@pytest_twisted.ensureDeferred
async def test_overlays_and_reports_attach_and_follow_rules(make_central):
    """An overlay and a report sent back by a viewer are attached to their image and study; the report is
    routed on because a rule for reports says so, the overlay (no rule) is only attached and goes home to
    the centre of its study (which has a token, hence an outbox). The push viewer is a medd viewer node."""
    from medd.plugins.objecttypes import OverlayType, ReportType, text_report_content
    from medd.storage import index
    from tests.test_ingest import _gsps_for

    central = await make_central({"dicom": "tcp:0:interface=127.0.0.1", "http": "tcp:0:interface=127.0.0.1"},
                                 extra=FAST + PUSH_EXTRA)
    viewer, url = await _push_viewer(make_central, central)
    pull_token, _ = await _setup_directory(central, url, PUSH_VIEWER_TOKEN)
    await central.central_storage.directory.add_rule(PUSH, centre="centre-a", object_type="report")
    ct = _with_recipient("CT_small.dcm", recipient=PULL)
    assert await deferToThread(_cstore, listener_port(central, "dicom"), [ct]) == [0]

    buf = io.BytesIO()
    ct.save_as(buf, enforce_file_format=True)
    overlay = parse_part10(_gsps_for(buf.getvalue()))
    report = text_report_content("No acute findings.", "2.25.4242", ct.StudyInstanceUID)
    for content, ident in ((overlay, OverlayType().identifier(overlay)), (report, ReportType().identifier(report))):
        await central.ingest.receive_package(build_package(content, ident, origin=PULL, destination="central.test"),
                                          transport="http", credentials=pull_token)

    await _delivered(central)
    assert await viewer.database.run(lambda c: index.object_by_uid(c, "2.25.4242")) is not None
    history = await central.central_storage.tracking.object_history(ct.SOPInstanceUID)
    assert [o.uid for o in history.overlays] == [overlay.keyinfo.sop_instance_uid]
    assert [r.uid for r in history.reports] == ["2.25.4242"]
    ov = await central.central_storage.tracking.object_history(overlay.keyinfo.sop_instance_uid)
    assert ov.routing.outcome == "attached" and ov.routing.centre == "centre-a"
    assert [d.destination for d in ov.deliveries] == ["ct1@centre-a.example"]


@pytest_twisted.ensureDeferred
async def test_router_floor_and_full_pass(make_central):
    """After a pass, the router only looks at newer objects; a full pass still finds an older object
    left without a decision (as a transaction committed out of order would leave it)."""
    from sqlalchemy import delete

    from medd.storage.routing_tables import routing_decisions

    central = await make_central()
    router = central.routing.router
    first = await central.ingest.receive_dicom(testdata("CT_small.dcm"), transport="dicom", origin="NOBODY")
    await central.ingest.receive_dicom(testdata("MR_small.dcm"), transport="dicom", origin="NOBODY")
    await router.kick(full=True)
    decisions = central.central_storage.routing
    assert await decisions.undecided() == []
    await central.database.run(lambda c: c.execute(delete(routing_decisions).where(routing_decisions.c.uid == first.uid)))
    await router.kick()
    assert await decisions.undecided() == [first.uid]
    await router.kick(full=True)
    assert await decisions.undecided() == []


@pytest_twisted.ensureDeferred
async def test_admin_api_manages_viewers_and_routes(make_central):
    """An administrator adds a viewer (getting its token once) and a routing rule over HTTP; a bad
    rule is refused with problem JSON; a viewer token cannot use the admin API. A centre is added with
    its networks and a token (only with an address), and listed with what credentials it holds."""
    central = await make_central({"http": "tcp:0:interface=127.0.0.1"})
    admin = await central.central_storage.directory.add_admin("alice")
    await central.central_storage.directory.add_centre("centre-a", aes=["CT1"])
    http = f"http://127.0.0.1:{listener_port(central, 'http')}/api"
    headers = {"Authorization": f"Bearer {admin}"}
    r = await deferToThread(requests.post, f"{http}/viewers", json={"address": PULL, "authorise": ["centre-a:CT"]}, headers=headers)
    assert r.status_code == 201 and r.json()["mode"] == "pull" and len(r.json()["token"]) >= 40
    viewer_token = r.json()["token"]
    r = await deferToThread(requests.post, f"{http}/viewers", json={"address": PULL}, headers=headers)
    assert r.status_code == 409 and r.headers["Content-Type"] == "application/problem+json"
    listed = (await deferToThread(requests.get, f"{http}/viewers", headers=headers)).json()
    assert [(v["address"], v["authorisations"]) for v in listed] == [(PULL, ["centre-a:CT"])]
    r = await deferToThread(requests.post, f"{http}/routes", json={"centre": "centre-a", "to": PULL}, headers=headers)
    assert r.status_code == 201
    r = await deferToThread(requests.post, f"{http}/routes", json={"to": PULL}, headers=headers)
    assert r.status_code == 400 and "at least one of" in r.json()["detail"]
    rules = (await deferToThread(requests.get, f"{http}/routes", headers=headers)).json()
    assert [(x["centre"], x["destination"]) for x in rules] == [("centre-a", PULL)]
    r = await deferToThread(requests.get, f"{http}/routes", headers={"Authorization": f"Bearer {viewer_token}"})
    assert r.status_code == 403

    r = await deferToThread(requests.post, f"{http}/centres", headers=headers,
                            json={"name": "centre-b", "ae": ["MR1"], "network": ["10.2.0.0/16"], "token": True})
    assert r.status_code == 409 and "give an address" in r.json()["detail"]
    r = await deferToThread(requests.post, f"{http}/centres", headers=headers,
                            json={"name": "centre-b", "address": ["gw@centre-b.example"], "network": ["10.2.0.0/16"],
                                  "token": True})
    assert r.status_code == 201 and len(r.json()["token"]) >= 40, r.text
    owner = await central.central_storage.directory.outbox_owner(r.json()["token"])
    assert (owner.kind, owner.address) == ("centre", "gw@centre-b.example")
    listed = (await deferToThread(requests.get, f"{http}/centres", headers=headers)).json()
    assert [(c["name"], c["network"], c["token"]) for c in listed] == [("centre-a", [], False),
                                                                       ("centre-b", ["10.2.0.0/16"], True)]


@pytest_twisted.ensureDeferred
async def test_viewer_packages_need_the_viewer_authenticated(make_central):
    """A report in a registered viewer's name is refused (and nothing stored) unless the sender proved to be
    that viewer: its bearer token, or over TLS a client certificate naming it; another viewer's token does not do."""
    from medd.ingest import Refused
    from medd.plugins.objecttypes import ReportType, text_report_content

    central = await make_central()
    pull_token, _ = await _setup_directory(central)
    other_token = (await central.central_storage.directory.add_viewer("other@viewers.example", None, [])).token

    def report(uid):
        content = text_report_content("fine", uid, "1.2.3.4")
        return build_package(content, ReportType().identifier(content), origin=PULL, destination="central.test")

    for kwargs in ({"transport": "http"}, {"transport": "http", "credentials": other_token},
                   {"transport": "tls", "peer": "other@viewers.example"}, {"transport": "smtp", "peer": "192.0.2.1"}):
        with pytest.raises(Refused) as info:
            await central.ingest.receive_package(report("2.25.1"), **kwargs)
        assert info.value.kind == "unauthenticated"
    assert await central.index.object_by_uid("2.25.1") is None
    assert not [p for p in (central.config.storage_path / "blobs").rglob("*") if p.is_file()]
    await central.ingest.receive_package(report("2.25.2"), transport="http", credentials=pull_token)
    await central.ingest.receive_package(report("2.25.3"), transport="tls", peer=PULL)
    for uid in ("2.25.2", "2.25.3"):
        assert await central.index.object_by_uid(uid) is not None


@pytest_twisted.ensureDeferred
async def test_viewer_client_certificate_issued_and_accepted(make_central, tmp_path):
    """`medd viewers add --client-cert` issues a certificate signed by central's client CA (its hash kept);
    with it the viewer sends a report in its own name over the TLS transport and central accepts it."""
    import subprocess
    import sys
    from pathlib import Path

    from medd.plugins.objecttypes import ReportType, text_report_content
    from medd.tlscert import make_self_signed
    from medd.transports.tls import send_packages
    from tests.conftest import write_config
    from twisted.internet import reactor

    ca_cert, ca_key = tmp_path / "ca.pem", tmp_path / "ca-key.pem"
    make_self_signed(ca_cert, ca_key, "medd test client CA")
    server_cert, server_key = tmp_path / "server.pem", tmp_path / "server-key.pem"
    make_self_signed(server_cert, server_key, "127.0.0.1")
    extra = (f"[tls]\ncertificate = {server_cert}\nprivate_key = {server_key}\n"
             f"client_ca = {ca_cert}\nclient_ca_key = {ca_key}\n")
    listen = {"tls": "tcp:0:interface=127.0.0.1"}
    ini = write_config(tmp_path, listen, extra)
    issued = tmp_path / "viewer" / "client.pem"
    medd = str(Path(sys.executable).parent / "medd")
    added = subprocess.run([medd, "viewers", "add", PULL, "--pull", "--client-cert", str(issued), "--config", str(ini)],
                           capture_output=True, text=True)
    assert added.returncode == 0, added.stderr
    assert issued.read_bytes().count(b"BEGIN") == 2  # certificate and key

    central = await make_central(listen, extra=extra)
    fingerprint = await central.central_storage.directory.client_certificate(PULL)
    assert fingerprint and len(fingerprint) == 64

    content = text_report_content("Signed over mutual TLS.", "2.25.777", "1.2.3.4")
    package = build_package(content, ReportType().identifier(content), origin=PULL, destination="central.test")
    (reply,) = await send_packages(reactor, "127.0.0.1", listener_port(central, "tls"), [package],
                                   ca_pem=server_cert.read_bytes(), client_cert=issued.read_bytes())
    assert reply["status"] == "ok", reply
    record = await central.index.object_by_uid("2.25.777")
    assert record.origin == PULL and record.transport == "tls"


def test_smtp_sender_line_conversion_keeps_every_byte():
    """The SMTP sender's chunked CRLF -> LF view never splits a CRLF, whatever the chunk size, and
    reproduces the package exactly once Twisted turns LF back into CRLF."""
    from medd.transports.push import LFLines

    package = b"From: a@b\r\nTo: c@d\r\n\r\n" + b"QUJD\r\n" * 1000 + b"\r\n"
    for size in (1, 2, 3, 7, 64, 8192, -1):
        reader, chunks = LFLines(package), []
        while chunk := reader.read(size):
            chunks.append(chunk)
        text = b"".join(chunks)
        assert b"\r" not in text
        assert text.replace(b"\n", b"\r\n") == package
