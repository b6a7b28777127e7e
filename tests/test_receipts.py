"""Receipts end to end, with real nodes on loopback: a modality C-STOREs an image into the gateway,
which forwards it to central over mutual TLS; central routes it to a pull viewer, which pulls it; the
reading room opens it and reports on the study; central queues the statuses and the report to the
centre's outbox, and the gateway pulls them with the centre's token."""
from __future__ import annotations

import json

import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.conftest import listener_port
from tests.test_gateway import GATEWAY_ADDRESS, _run_cli, central_extra, central_uids, cstore, gateway_extra, pki  # noqa: F401
from tests.test_routing import FAST, _with_recipient
from tests.test_viewer import LOOPBACK, VIEWER, _fake_clock, _viewer_extra

RADIOLOGIST = "dr-lee"


async def _site(make_central, pki):  # noqa: F811 (the fixture's value)
    """Central (TLS for the gateway, HTTP for the viewer's and the centre's outboxes), a pull viewer
    authorised for centre-a, and centre-a's gateway forwarding over mutual TLS and pulling its outbox
    with its token. The viewer and the gateway run on fake clocks: they act only when kicked."""
    central = await make_central({"tls": LOOPBACK, "http": LOOPBACK}, extra=central_extra(pki) + FAST,
                                 site="central", name="central.test")  # the gateway's central_name
    directory = central.central_storage.directory
    # The gateway's address first: the centre's outbox is at it.
    centre = await directory.add_centre("centre-a", aes=["CT1"], addresses=[GATEWAY_ADDRESS], token=True)
    viewer_token = (await directory.add_viewer(VIEWER, None, ["centre-a"])).token
    http = listener_port(central, "http")
    viewer = await make_central({"http": LOOPBACK}, extra=_viewer_extra(http, viewer_token), site="viewer",
                                role="viewer", name=VIEWER, clock=_fake_clock())
    await viewer.viewer.requestor.idle()  # the poll at start
    outbox = f"outbox = http://127.0.0.1:{http}\ntoken = {centre.token}\npoll_interval = 60\n"
    gateway = await make_central({"dicom": LOOPBACK}, extra=gateway_extra(pki, listener_port(central, "tls"), outbox),
                                 site="gateway", role="gateway", name="gateway.centre-a.test", clock=_fake_clock())
    await gateway.gateway.forwarder.resumed()
    await gateway.gateway.requestor.idle()  # the poll at start: nothing yet
    return central, viewer, gateway


@pytest_twisted.ensureDeferred
async def test_the_gateway_learns_every_receipt_and_gets_the_report(make_central, pki, tmp_path):  # noqa: F811
    """An image C-STOREd into the gateway goes to central over mutual TLS, is routed to a pull viewer,
    pulled, opened by a radiologist and reported on; the gateway's receipts for it say received,
    routed (to that viewer), delivered (to it), opened (by that radiologist) and reported (with the
    report's UID), and the report itself is in the gateway's index, attached to the study."""
    central, viewer, gateway = await _site(make_central, pki)
    ct = _with_recipient("CT_small.dcm", recipient=VIEWER, uid_suffix=".77")
    uid, study = ct.SOPInstanceUID, ct.StudyInstanceUID

    assert await deferToThread(cstore, listener_port(gateway, "dicom"), [ct]) == [0]
    await gateway.gateway.forwarder.kick()  # the C-STORE's own kick may have sent it already
    assert await central_uids(central) == [uid]
    await central.routing.router.kick()
    pulled = await viewer.viewer.requestor.kick()
    assert (pulled.error, pulled.stored, pulled.acknowledged) == (None, 1, 1), pulled

    room = viewer.reading_room
    await room.opened(uid, RADIOLOGIST)
    report_uid = await room.save_report(study, RADIOLOGIST, "No acute findings.")
    await viewer.viewer.outgoing.kick()  # the opened status and the report, to central
    await central.routing.router.kick()  # the report: attached to the study, queued for the centre

    back = await gateway.gateway.requestor.kick()
    assert back.error is None and back.stored >= 5, back

    receipts = await gateway.forwarding.receipts_of(uid)
    by_event = {r.event: r for r in receipts}
    assert {"received", "routed", "delivered", "opened", "reported"} <= set(by_event), receipts
    assert by_event["routed"].viewer == VIEWER and by_event["delivered"].viewer == VIEWER
    assert by_event["opened"].user == RADIOLOGIST and by_event["opened"].viewer == VIEWER

    report = await gateway.index.object_by_uid(report_uid)
    assert report is not None and report.object_type == "report" and report.transport == "pull"
    assert report.study_instance_uid == study

    # What `medd track` shows on the gateway is the same.
    tracked = json.loads(await deferToThread(
        _run_cli, ["track", uid, "--json", "--config", str(tmp_path / "gateway" / "gateway.ini")]))
    assert tracked["forwarding"]["state"] == "sent"
    events = [(r["event"], r["viewer"], r["user"]) for r in tracked["receipts"]]
    for expected in (("routed", VIEWER, None), ("delivered", VIEWER, None), ("opened", VIEWER, RADIOLOGIST)):
        assert expected in events, events
    assert {"received", "reported"} <= {e for e, _, _ in events}
