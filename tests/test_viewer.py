"""The viewer node on loopback against a real central: the requestor pulls and acknowledges, the
reading room's status messages, overlays and reports reach central; users, sessions and config;
the requestor's backoff on a fake clock."""
from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
import requests
from pydicom import dcmread
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

from medd.central import directory
from medd.ingest import Stored, StoreFailed
from medd.config import ConfigError, load_config
from medd.plugins.host import load_plugins
from medd.service import check_against_plugins
from medd.storage.index import object_by_uid
from medd.storage.inbox import WorklistQuery
from medd.viewer.annotations import check_annotations
from medd.viewer.central_client import CentralUnavailable
from medd.viewer.outgoing import count_waiting, outgoing_packages
from medd.viewer.requestor import Requestor
from medd.viewer.settings import CentralSettings
from tests.conftest import listener_port, write_config
from tests.routing_helpers import eventually, free_port
from tests.test_routing import FAST, _cstore, _state, _with_recipient

VIEWER = "dr-lee@viewers.example"
LOOPBACK = "tcp:0:interface=127.0.0.1"


def _viewer_extra(central_port: int, token: str) -> str:
    return (f"[central]\nurl = http://127.0.0.1:{central_port}\ntoken = {token}\npoll_interval = 0.2\n"
            "retry_base = 0.05\nretry_max_delay = 0.3\ntimeout = 10\n")


async def _directory(central) -> tuple[str, str]:
    def setup(c):
        directory.add_centre(c, "centre-a", aes=["MODALITY1"], addresses=["ct1@centre-a.example"])
        _, token = directory.add_viewer(c, VIEWER, None, ["centre-a"])
        return token, directory.add_admin(c, "alice")

    return await central.database.run(setup)


async def _central_and_viewer(make_central, central_http: str = LOOPBACK):
    central = await make_central({"dicom": LOOPBACK, "http": central_http}, extra=FAST, site="central")
    token, admin = await _directory(central)
    viewer = await make_central({"http": LOOPBACK}, extra=_viewer_extra(listener_port(central, "http"), token),
                                site="viewer", role="viewer", name=VIEWER)
    return central, viewer, admin


async def _history(central, admin: str, uid: str) -> dict:
    url = f"http://127.0.0.1:{listener_port(central, 'http')}/api/objects/{uid}"
    r = await deferToThread(requests.get, url, headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 200, r.text
    return r.json()


async def _local(node, uid):
    return await node.database.run(lambda c: object_by_uid(c, uid))


@pytest_twisted.ensureDeferred
async def test_pulled_image_reaches_the_inbox_and_is_acknowledged(make_central):
    """An image C-STOREd to central for a pull viewer arrives in the viewer's inbox by itself; only then is
    it acknowledged (central: delivered), and the reading room lists, describes and serves it."""
    central, viewer, _ = await _central_and_viewer(make_central)
    ct = _with_recipient("CT_small.dcm", recipient=VIEWER)
    assert await deferToThread(_cstore, listener_port(central, "dicom"), [ct]) == [0]
    uid = ct.SOPInstanceUID

    record = await eventually(lambda: _local(viewer, uid))
    assert record.transport == "pull" and record.origin == "central@central"
    await eventually(lambda: _state(central, uid, VIEWER))
    assert await eventually(lambda: (_state(central, uid, VIEWER))) in ("sent", "delivered")
    await eventually(lambda: _is(central, uid, "delivered"))

    room = viewer.reading_room
    (study,) = (await room.worklist(WorklistQuery(user="dr-lee"))).studies
    assert study.study_uid == ct.StudyInstanceUID and study.patient_id == ct.PatientID
    assert study.modalities == ("CT",) and study.images == 1 and study.unread and not study.has_report
    assert (await room.worklist(WorklistQuery(user="dr-lee", modality="MR"))).studies == ()
    detail = await room.study(ct.StudyInstanceUID)
    (instance,) = detail.series[0].instances
    assert (instance.uid, instance.rows, instance.columns, instance.frames) == (uid, 128, 128, 1)
    assert instance.transfer_syntax_uid == str(ct.file_meta.TransferSyntaxUID)
    data = await room.instance_bytes(uid)
    assert dcmread(__import__("io").BytesIO(data)).SOPInstanceUID == uid
    header = {e.keyword: e.value for e in await room.header(uid)}
    assert header["PatientID"] == ct.PatientID and header["TransferSyntaxUID"] == str(ct.file_meta.TransferSyntaxUID)

    # A kick after everything was acknowledged finds nothing more to do.
    result = await viewer.viewer.requestor.kick()
    assert result.error is None and result.listed == 0


async def _is(central, uid, state):
    return await _state(central, uid, VIEWER) == state


@pytest_twisted.ensureDeferred
async def test_opened_overlay_and_report_reach_central(make_central):
    """opened() makes central track the image as opened by that user; save_overlay() stores a GSPS locally
    (read back with the line's length in mm) and central attaches it to the image; save_report() stores a
    Basic Text SR that central attaches to the study and the worklist shows."""
    central, viewer, admin = await _central_and_viewer(make_central)
    ct = _with_recipient("CT_small.dcm", recipient=VIEWER)
    assert await deferToThread(_cstore, listener_port(central, "dicom"), [ct]) == [0]
    uid = ct.SOPInstanceUID
    await eventually(lambda: _is(central, uid, "delivered"))
    room = viewer.reading_room

    await room.opened(uid, "dr-lee")
    await eventually(lambda: _is(central, uid, "opened"))
    (delivery,) = (await _history(central, admin, uid))["deliveries"]
    assert delivery["opened_by"] == "dr-lee"
    (study,) = (await room.worklist(WorklistQuery(user="dr-lee"))).studies
    assert not study.unread
    (study,) = (await room.worklist(WorklistQuery(user="dr-other", status="unread"))).studies
    assert study.study_uid == ct.StudyInstanceUID

    annotations = [
        {"type": "arrow", "points": [[10, 10], [40, 40]]},
        {"type": "line", "points": [[0, 64], [100, 64]]},
        {"type": "ellipse", "points": [[20, 30], [60, 50]], "text": "lesion"},
        {"type": "text", "points": [[5, 120]], "text": "compare with prior"},
    ]
    overlay_uid = await room.save_overlay(uid, "dr-lee", check_annotations(annotations))
    local = await _local(viewer, overlay_uid)
    assert local.object_type == "overlay" and local.referenced_image_uid == uid
    (overlay,) = await room.overlays(uid)
    shown = overlay.annotations
    assert [a.type for a in shown] == ["arrow", "line", "ellipse", "text"]
    assert shown[1].text == "66.1 mm"  # 100 px at 0.661468 mm
    assert shown[2].points == ((20.0, 30.0), (60.0, 50.0)) and shown[2].text == "lesion"
    assert overlay.uid == overlay_uid and overlay.author == "dr-lee"

    async def overlay_attached():
        return [o["uid"] for o in (await _history(central, admin, uid))["overlays"]] == [overlay_uid]

    await eventually(overlay_attached)

    report_uid = await room.save_report(ct.StudyInstanceUID, "dr-lee", "No acute findings.\nFollow-up in 6 months.")
    (report,) = await room.reports(ct.StudyInstanceUID)
    assert (report.uid, report.author, report.text) == (report_uid, "dr-lee", "No acute findings.\nFollow-up in 6 months.")
    assert (await room.worklist(WorklistQuery(user="dr-lee", has_report=True))).studies[0].has_report

    async def report_attached():
        return [r["uid"] for r in (await _history(central, admin, uid))["reports"]] == [report_uid]

    await eventually(report_attached)
    # The report is attached on ingest; its routing decision is the router's next pass.
    await central.routing.router.kick()
    history = await _history(central, admin, report_uid)
    assert history["object"]["object_type"] == "report" and history["object"]["study_instance_uid"] == ct.StudyInstanceUID
    assert history["routing"]["outcome"] == "attached"  # addressed to central itself: kept, not quarantined
    await eventually(lambda: viewer.database.run(count_waiting).addCallback(lambda n: n == 0))
    assert {p.state for p in await viewer.database.run(outgoing_packages)} == {"sent"}


@pytest_twisted.ensureDeferred
async def test_central_down_then_back(make_central):
    """While central is down the requestor keeps retrying and a status message waits in the outgoing
    table; once central is back the viewer catches up: the image arrives and is acknowledged, and the
    status message is delivered."""
    port = free_port()
    central, viewer, admin = await _central_and_viewer(make_central, central_http=f"tcp:{port}:interface=127.0.0.1")
    first = _with_recipient("CT_small.dcm", recipient=VIEWER)
    assert await deferToThread(_cstore, listener_port(central, "dicom"), [first]) == [0]
    await eventually(lambda: _is(central, first.SOPInstanceUID, "delivered"))
    await central.stopService()

    requestor = viewer.viewer.requestor
    failures = requestor.failures
    await eventually(lambda: requestor.failures >= failures + 3)
    await viewer.reading_room.opened(first.SOPInstanceUID, "dr-lee")

    async def retried():
        (pkg,) = await viewer.database.run(outgoing_packages)
        return pkg.state == "waiting" and pkg.attempts >= 2

    await eventually(retried)

    central = await make_central({"dicom": LOOPBACK, "http": f"tcp:{port}:interface=127.0.0.1"}, extra=FAST, site="central")
    second = _with_recipient("CT_small.dcm", recipient=VIEWER, uid_suffix=".2")
    assert await deferToThread(_cstore, listener_port(central, "dicom"), [second]) == [0]
    await eventually(lambda: _local(viewer, second.SOPInstanceUID))
    await eventually(lambda: _is(central, second.SOPInstanceUID, "delivered"))
    await eventually(lambda: _is(central, first.SOPInstanceUID, "opened"))
    assert requestor.failures == 0


# -- the requestor on a fake clock ------------------------------------------------------------------


class FakeCentral:
    """Central's outbox as the requestor's client sees it; ``down`` makes every call fail."""

    def __init__(self):
        self.down = False
        self.waiting = {1: b"package-1", 2: b"package-2"}
        self.acked: list[int] = []
        self.calls = 0

    def _check(self):
        self.calls += 1
        if self.down:
            raise CentralUnavailable("connection refused")

    async def list_outbox(self):
        self._check()
        return [{"id": i, "message_id": f"<{i}@central>", "uid": f"1.2.{i}"} for i in sorted(self.waiting)]

    async def fetch(self, delivery_id):
        self._check()
        return self.waiting[delivery_id]

    async def ack(self, delivery_id):
        self._check()
        self.acked.append(delivery_id)
        self.waiting.pop(delivery_id)


class FakeInbox:
    """The node's ingest: idempotent by package; ``failing`` makes storing fail."""

    def __init__(self):
        self.stored: list[bytes] = []
        self.failing = False

    def receive_package(self, data, *, transport, peer=None):
        assert transport == "pull"
        if self.failing:
            return fail(StoreFailed("disk full"))
        created = data not in self.stored
        if created:
            self.stored.append(data)
        return succeed(Stored(uid=data.decode(), object_type="image", digest="d", created=created))


SETTINGS = CentralSettings(url="http://central.invalid", token="t", poll_interval=10, retry_base=1, retry_max_delay=8)


def test_requestor_backs_off_while_central_is_down_and_resumes():
    """Each failed pass doubles the wait (1, 2, 4, 8, 8 s, capped); when central is back the next pass
    fetches, stores and acknowledges everything, and polling returns to its interval."""
    clock, central, inbox = Clock(), FakeCentral(), FakeInbox()
    central.down = True
    requestor = Requestor(central, inbox, SETTINGS, clock)
    requestor.startService()
    delays = []
    for _ in range(5):
        call = requestor._next_call
        delays.append(call.getTime() - clock.seconds())
        clock.advance(delays[-1])
    assert delays == [1, 2, 4, 8, 8] and requestor.failures == 6  # the pass at start, then five retries
    central.down = False
    clock.advance(requestor._next_call.getTime() - clock.seconds())
    assert inbox.stored == [b"package-1", b"package-2"] and central.acked == [1, 2]
    assert requestor.failures == 0 and requestor._next_call.getTime() - clock.seconds() == 10
    requestor.stopService()
    assert not clock.getDelayedCalls()


def test_requestor_acknowledges_only_what_was_stored():
    """A package the inbox could not store is not acknowledged and is fetched again on the next pass; a
    re-fetch of something already stored (crash before the ack) is acknowledged without a duplicate."""
    clock, central, inbox = Clock(), FakeCentral(), FakeInbox()
    inbox.failing = True
    requestor = Requestor(central, inbox, SETTINGS, clock)
    requestor.startService()
    assert central.acked == [] and requestor.failures == 1
    inbox.failing = False
    inbox.stored.append(b"package-1")  # stored before a crash, never acknowledged
    result = []
    requestor.kick().addCallback(result.append)
    assert result[0].stored == 1 and result[0].acknowledged == 2
    assert inbox.stored == [b"package-1", b"package-2"] and central.acked == [1, 2]
    requestor.stopService()


def test_kick_during_a_pass_runs_another():
    """kick() while a pass is running is not lost: another pass follows, and its Deferred fires with it."""
    clock, central, inbox = Clock(), FakeCentral(), FakeInbox()
    requestor = Requestor(central, inbox, SETTINGS, clock)
    from twisted.internet.defer import Deferred

    gate = Deferred()
    original = central.list_outbox

    async def slow_list():
        await gate
        return await original()

    central.list_outbox = slow_list
    first = requestor.kick()
    second = requestor.kick()
    central.list_outbox = original
    gate.callback(None)
    results = []
    first.addCallback(results.append)
    second.addCallback(results.append)
    assert [r.acknowledged for r in results] == [2, 0]


# -- users, sessions, config -------------------------------------------------------------------------


def test_viewer_config_is_checked(tmp_path):
    """A viewer config without [central] url/token/poll_interval is refused, each problem naming its key;
    the shipped etc/viewer.ini passes."""
    ini = write_config(tmp_path, role="viewer", name=VIEWER, extra="[central]\nurl = ftp://x\npoll_interval = soon\n")
    with pytest.raises(ConfigError) as e:
        check_against_plugins(load_config(ini), load_plugins())
    found = {(p.section, p.key) for p in e.value.problems}
    assert found == {("central", "url"), ("central", "token"), ("central", "poll_interval")}
    assert all(p.file == str(ini) for p in e.value.problems)
    shipped = load_config(Path(__file__).parent.parent / "etc" / "viewer.ini", check_files=False)
    check_against_plugins(shipped, load_plugins())
