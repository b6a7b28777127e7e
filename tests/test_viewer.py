"""The viewer node: on loopback against a real central (the requestor pulls and acknowledges, the
reading room's status messages, overlays and reports reach central, central down and back), and
its background services on a fake clock (requestor polling and backoff, outgoing packages in order,
with backoff, across a restart); users, sessions and config."""
from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
import pytest_twisted
import requests
from pydicom import dcmread
from twisted.internet.defer import Deferred, ensureDeferred, fail, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

from medd.config import ConfigError, load_config
from medd.ingest import Stored, StoreFailed
from medd.plugins.host import load_plugins
from medd.scheduling import Backoff
from medd.service import check_against_plugins
from medd.storage.blobstore import FileBlobStore
from medd.storage.database import open_database
from medd.storage.inbox import WorklistQuery
from medd.objects import parse_part10
from medd.package import AttachmentId, build_package
from medd.storage.index import count_objects, object_by_uid
from medd.storage.outgoing import OutgoingPackages
from medd.viewer.annotations import check_annotations
from medd.pull import CentralRefused, CentralUnavailable
from medd.viewer.outgoing import OutgoingService
from medd.pull import Requestor
from medd.viewer.settings import CentralSettings
from tests.conftest import listener_port, testdata, write_config
from tests.test_routing import FAST, _cstore, _state, _with_recipient

VIEWER = "dr-lee@viewers.example"
LOOPBACK = "tcp:0:interface=127.0.0.1"
# 2026-01-01 00:00 UTC: where the viewers' fake clocks start.
START = 1_767_225_600
# The loopback viewers' poll interval and backoff (0.05, 0.1, 0.2, 0.3, ... s).
POLL = 0.2
RETRY = Backoff(base=0.05, max_delay=0.3)


def _viewer_extra(central_port: int, token: str) -> str:
    return (f"[central]\nurl = http://127.0.0.1:{central_port}\ntoken = {token}\npoll_interval = {POLL:g}\n"
            f"retry_base = {RETRY.base:g}\nretry_max_delay = {RETRY.max_delay:g}\ntimeout = 10\n")


def _fake_clock() -> Clock:
    clock = Clock()
    clock.advance(START)
    return clock


async def _directory(central) -> tuple[str, str]:
    directory = central.central_storage.directory
    await directory.add_centre("centre-a", aes=["MODALITY1"], addresses=["ct1@centre-a.example"])
    token = (await directory.add_viewer(VIEWER, None, ["centre-a"])).token
    return token, await directory.add_admin("alice")


async def _central_and_viewer(make_central, clock: Clock | None = None):
    """A central on loopback and a viewer pulling from it. With ``clock`` the viewer's services run
    on it (``viewer.clock``), so the viewer polls and retries only when a test kicks it or advances
    the clock; without, they run on the reactor every ``POLL`` seconds."""
    central = await make_central({"dicom": LOOPBACK, "http": LOOPBACK}, extra=FAST, site="central")
    token, admin = await _directory(central)
    viewer = await make_central({"http": LOOPBACK}, extra=_viewer_extra(listener_port(central, "http"), token),
                                site="viewer", role="viewer", name=VIEWER, clock=clock)
    await viewer.viewer.requestor.idle()  # the poll at start
    return central, viewer, admin


async def _routed(central) -> None:
    """Central's router has decided on everything stored so far (a pull viewer's delivery is queued)."""
    await central.routing.router.kick()


async def _send_to_viewer(central, viewer, ct) -> None:
    """C-STORE ``ct`` to central, route it, and have the viewer pull it now."""
    assert await deferToThread(_cstore, listener_port(central, "dicom"), [ct]) == [0]
    await _routed(central)
    result = await viewer.viewer.requestor.kick()
    assert result.error is None and result.stored == 1 and result.acknowledged == 1, result


async def _history(central, admin: str, uid: str) -> dict:
    url = f"http://127.0.0.1:{listener_port(central, 'http')}/api/objects/{uid}"
    r = await deferToThread(requests.get, url, headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 200, r.text
    return r.json()


async def _local(node, uid):
    return await node.database.run(lambda c: object_by_uid(c, uid))


async def _is(central, uid, state) -> bool:
    return await _state(central, uid, VIEWER) == state


@pytest_twisted.ensureDeferred
async def test_pulled_image_reaches_the_inbox_and_is_acknowledged(make_central):
    """An image C-STOREd to central for a pull viewer is fetched by the viewer's next poll; only once it
    is in the viewer's inbox is it acknowledged (central: delivered), and the reading room lists,
    describes and serves it."""
    central, viewer, _ = await _central_and_viewer(make_central, _fake_clock())
    ct = _with_recipient("CT_small.dcm", recipient=VIEWER)
    assert await deferToThread(_cstore, listener_port(central, "dicom"), [ct]) == [0]
    uid = ct.SOPInstanceUID
    await _routed(central)
    assert await _local(viewer, uid) is None

    viewer.clock.advance(POLL)
    await viewer.viewer.requestor.idle()  # the poll the clock started
    result = viewer.viewer.requestor.last_result
    assert (result.listed, result.stored, result.acknowledged, result.error) == (1, 1, 1, None)
    record = await _local(viewer, uid)
    assert record.transport == "pull" and record.origin == "central@central"
    assert record.received_at.timestamp() == pytest.approx(START + POLL)  # the viewer's clock stamps its inbox
    assert await _state(central, uid, VIEWER) == "delivered"

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
    assert dcmread(BytesIO(data)).SOPInstanceUID == uid

    # A kick after everything was acknowledged finds nothing more to do.
    result = await viewer.viewer.requestor.kick()
    assert result.error is None and result.listed == 0


@pytest_twisted.ensureDeferred
async def test_opened_overlay_and_report_reach_central(make_central):
    """opened() makes central track the image as opened by that user; save_overlay() stores a GSPS locally
    (read back with the line's length in mm) and central attaches it to the image; save_report() stores a
    Basic Text SR that central attaches to the study and the worklist shows."""
    central, viewer, admin = await _central_and_viewer(make_central, _fake_clock())
    ct = _with_recipient("CT_small.dcm", recipient=VIEWER)
    await _send_to_viewer(central, viewer, ct)
    uid = ct.SOPInstanceUID
    room, outgoing = viewer.reading_room, viewer.viewer.outgoing

    await room.opened(uid, "dr-lee")
    assert await outgoing.kick() == 0  # the pass queue() started sent it
    assert await _state(central, uid, VIEWER) == "opened"
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
    await outgoing.kick()
    await _routed(central)
    assert [o["uid"] for o in (await _history(central, admin, uid))["overlays"]] == [overlay_uid]

    report_uid = await room.save_report(ct.StudyInstanceUID, "dr-lee", "No acute findings.\nFollow-up in 6 months.")
    (report,) = await room.reports(ct.StudyInstanceUID)
    assert (report.uid, report.author, report.text) == (report_uid, "dr-lee", "No acute findings.\nFollow-up in 6 months.")
    assert (await room.worklist(WorklistQuery(user="dr-lee", has_report=True))).studies[0].has_report
    await outgoing.kick()
    await _routed(central)
    assert [r["uid"] for r in (await _history(central, admin, uid))["reports"]] == [report_uid]
    history = await _history(central, admin, report_uid)
    assert history["object"]["object_type"] == "report" and history["object"]["study_instance_uid"] == ct.StudyInstanceUID
    assert history["routing"]["outcome"] == "attached"  # addressed to central itself: kept, not quarantined
    assert await outgoing.packages.count_waiting() == 0
    assert {p.state for p in await outgoing.packages.packages()} == {"sent"}


@pytest_twisted.ensureDeferred
async def test_central_down_then_back(make_central):
    """While central is down the requestor retries with backoff on its clock and a status message
    waits in the outgoing table; once central is back on the same port the viewer catches up: the
    image arrives and is acknowledged, and the status message is delivered."""
    central, viewer, admin = await _central_and_viewer(make_central, _fake_clock())
    port = listener_port(central, "http")
    first = _with_recipient("CT_small.dcm", recipient=VIEWER)
    await _send_to_viewer(central, viewer, first)
    await central.stopService()

    clock, requestor, outgoing = viewer.clock, viewer.viewer.requestor, viewer.viewer.outgoing
    # (Each refused connection costs 0.3 s of real time in twisted's HostnameEndpoint: few of them.)
    result = await requestor.kick()
    assert result.error and requestor.failures == 1
    clock.advance(RETRY.delay(1) - 0.001)
    await requestor.idle()
    assert requestor.failures == 1  # not yet
    clock.advance(0.001)  # the retry is due
    await requestor.idle()
    assert requestor.failures == 2 and requestor.last_result.error

    await viewer.reading_room.opened(first.SOPInstanceUID, "dr-lee")
    await outgoing.idle()
    (pkg,) = await outgoing.packages.packages()
    assert pkg.state == "waiting" and pkg.attempts == 1 and "CentralUnavailable" in pkg.last_error

    central = await make_central({"dicom": LOOPBACK, "http": f"tcp:{port}:interface=127.0.0.1"}, extra=FAST, site="central")
    second = _with_recipient("CT_small.dcm", recipient=VIEWER, uid_suffix=".2")
    assert await deferToThread(_cstore, listener_port(central, "dicom"), [second]) == [0]
    await _routed(central)
    clock.advance(RETRY.max_delay)  # both the requestor's and the outgoing retry are due by then
    await requestor.idle()
    await outgoing.idle()
    assert requestor.failures == 0 and requestor.last_result.acknowledged == 1
    assert await _local(viewer, second.SOPInstanceUID) is not None
    assert await _state(central, second.SOPInstanceUID, VIEWER) == "delivered"
    assert await _state(central, first.SOPInstanceUID, VIEWER) == "opened"
    (pkg,) = await outgoing.packages.packages()
    assert pkg.state == "sent" and pkg.attempts == 2


# -- the requestor on a fake clock ------------------------------------------------------------------


class FakeCentral:
    """Central as the viewer's client sees it (the coroutines of CentralClient), on a fake clock:
    ``down`` makes every call fail; ``refuse`` holds packages it answers 422 to."""

    def __init__(self, clock):
        self.clock = clock
        self.down = False
        self.waiting = {1: b"package-1", 2: b"package-2"}
        self.acked: list[int] = []
        self.listed_at: list[float] = []  # clock times of the polls
        self.posted: list[tuple[float, bytes]] = []
        self.refuse: set[bytes] = set()

    def _check(self):
        if self.down:
            raise CentralUnavailable("connection refused")

    async def list_outbox(self):
        self.listed_at.append(self.clock.seconds())
        self._check()
        return [{"id": i, "message_id": f"<{i}@central>", "uid": f"1.2.{i}"} for i in sorted(self.waiting)]

    async def fetch(self, delivery_id):
        self._check()
        return self.waiting[delivery_id]

    async def ack(self, delivery_id):
        self._check()
        self.acked.append(delivery_id)
        self.waiting.pop(delivery_id)

    async def post_package(self, data):
        self._check()
        if data in self.refuse:
            raise CentralRefused(422, "not a package")
        self.posted.append((self.clock.seconds(), data))
        return 202


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


SETTINGS = CentralSettings(url="http://central.invalid", token="t", poll_interval=10, backoff=Backoff(base=1, max_delay=8))


def _run_clock(clock: Clock, until: float, step: float = 0.5) -> None:
    while clock.seconds() < until:
        clock.advance(step)


def test_requestor_polls_on_its_interval_and_backs_off_while_central_is_down():
    """Polls come every poll_interval of the injected clock; while central is down each failed poll
    doubles the wait (1, 2, 4, 8, 8 s, capped); the first poll after central is back fetches, stores
    and acknowledges everything, and polling returns to its interval."""
    clock = Clock()
    central, inbox = FakeCentral(clock), FakeInbox()
    central.down = True
    requestor = Requestor(central, inbox, SETTINGS, clock)
    requestor.startService()
    _run_clock(clock, 20)
    assert central.listed_at == [0, 1, 3, 7, 15] and requestor.failures == 5 and inbox.stored == []
    central.down = False
    _run_clock(clock, 50)
    assert central.listed_at == [0, 1, 3, 7, 15, 23, 33, 43]
    assert inbox.stored == [b"package-1", b"package-2"] and central.acked == [1, 2] and requestor.failures == 0
    requestor.stopService()
    assert not clock.getDelayedCalls()


def test_requestor_acknowledges_only_what_was_stored():
    """A package the inbox could not store is not acknowledged and is fetched again on the next pass; a
    re-fetch of something already stored (crash before the ack) is acknowledged without a duplicate."""
    clock = Clock()
    central, inbox = FakeCentral(clock), FakeInbox()
    inbox.failing = True
    requestor = Requestor(central, inbox, SETTINGS, clock)
    requestor.startService()
    assert central.acked == [] and requestor.failures == 1
    inbox.failing = False
    inbox.stored.append(b"package-1")  # stored before a crash, never acknowledged
    result = requestor.kick().result
    assert result.stored == 1 and result.acknowledged == 2
    assert inbox.stored == [b"package-1", b"package-2"] and central.acked == [1, 2]
    requestor.stopService()


def _gated(central: FakeCentral) -> Deferred:
    """Make central's next list_outbox wait for the returned Deferred."""
    gate = Deferred()
    original = central.list_outbox

    async def slow_list():
        central.list_outbox = original
        await gate
        return await original()

    central.list_outbox = slow_list
    return gate


def test_kick_during_a_pass_runs_another():
    """kick() while a pass is running is not lost: another pass follows, and its Deferred fires with it."""
    clock = Clock()
    central, inbox = FakeCentral(clock), FakeInbox()
    requestor = Requestor(central, inbox, SETTINGS, clock)
    gate = _gated(central)
    first = requestor.kick()
    second = requestor.kick()
    gate.callback(None)
    assert first.result.acknowledged == 2 and second.result.acknowledged == 0
    assert len(central.listed_at) == 2


def test_stopping_waits_for_the_pass_under_way():
    """stopService() fires once the pass under way has ended; that pass fetches nothing more, nothing
    is acknowledged, and no further poll is scheduled."""
    clock = Clock()
    central, inbox = FakeCentral(clock), FakeInbox()
    requestor = Requestor(central, inbox, SETTINGS, clock)
    gate = _gated(central)
    requestor.startService()
    stopped = requestor.stopService()
    assert not stopped.called
    gate.callback(None)
    assert stopped.called and central.acked == [] and not clock.getDelayedCalls()


# -- outgoing packages on a fake clock, over the real database ------------------------------------------


class InlineIngest:
    """The two Ingest calls the outgoing service makes, run at once on the calling thread."""

    def __init__(self, blobs):
        self.blobs = blobs

    def run_blocking(self, fn, *args):
        return maybeDeferred(fn, *args)

    def read_blob(self, digest):
        return maybeDeferred(self.blobs.get, digest)


def _outgoing(database, blobs, central, clock) -> OutgoingService:
    packages = OutgoingPackages(database, clock)
    return OutgoingService(packages, InlineIngest(blobs), blobs, central, Backoff(base=1, max_delay=8), clock)


def _queue(service: OutgoingService, n: int) -> bytes:
    data = f"package-{n}".encode()
    queued = ensureDeferred(service.queue(
        data, message_id=f"<{n}@viewer>", attachment=f"status; event=opened; uid=1.2.{n}", uid=f"1.2.{n}"))
    assert queued.called  # durable before queue() returned: the database runs inline here
    return data


def test_outgoing_packages_go_in_order_with_backoff_and_survive_restart(tmp_path, db_url):
    """Queued packages wait in the database behind the head of the line while central is down, the head
    retried after 1, 2, 4 s of the clock; a restart (a new service on a new connection) resumes at the
    stored next attempt; once central is back they go in the order queued, a refused one is set aside
    for good, and each sent package's bytes leave the blob store."""
    config = load_config(write_config(tmp_path, db_url=db_url))
    blobs = FileBlobStore(tmp_path / "blobs")
    clock = Clock()
    clock.advance(START)
    central = FakeCentral(clock)
    central.down = True
    database = open_database(config)
    service = _outgoing(database, blobs, central, clock)
    service.startService()
    first, second = _queue(service, 1), _queue(service, 2)
    _run_clock(clock, START + 4)
    (head, behind) = service.packages.packages().result
    assert (head.attempts, head.next_attempt_at.timestamp()) == (3, START + 7)
    assert (behind.state, behind.attempts) == ("waiting", 0)
    assert service.stopService().called
    database.stop()

    # The restart: what was queued is in the database, not in memory.
    database = open_database(config)
    service = _outgoing(database, blobs, central, clock)
    service.startService()
    third = _queue(service, 3)
    central.refuse.add(second)
    central.down = False
    assert central.posted == []
    _run_clock(clock, START + 6.5)
    assert central.posted == []  # the head is due at START + 7
    clock.advance(0.5)
    assert central.posted == [(START + 7, first), (START + 7, third)]
    states = [(p.state, p.attempts, p.sent_at and p.sent_at.timestamp()) for p in service.packages.packages().result]
    assert states == [("sent", 4, START + 7), ("refused", 1, None), ("sent", 1, START + 7)]
    assert service.packages.count_waiting().result == 0
    packages = service.packages.packages().result
    assert not blobs.exists(packages[0].digest) and blobs.exists(packages[1].digest)
    service.stopService()
    assert not clock.getDelayedCalls()
    database.stop()


# -- users, sessions, config -------------------------------------------------------------------------


def test_viewer_config_is_checked(tmp_path):
    """A viewer config without [central] url/token/poll_interval, or whose [reading_room] ohif holds no OHIF
    app, is refused, each problem naming its key; the shipped etc/viewer.ini passes."""
    ini = write_config(tmp_path, role="viewer", name=VIEWER,
                       extra="[central]\nurl = ftp://x\npoll_interval = soon\n[reading_room]\nohif = no-such-folder\n")
    with pytest.raises(ConfigError) as e:
        check_against_plugins(load_config(ini), load_plugins())
    found = {(p.section, p.key) for p in e.value.problems}
    assert found == {("central", "url"), ("central", "token"), ("central", "poll_interval"), ("reading_room", "ohif")}
    assert all(p.file == str(ini) for p in e.value.problems)
    shipped = load_config(Path(__file__).parent.parent / "etc" / "viewer.ini", check_files=False)
    check_against_plugins(shipped, load_plugins())


@pytest_twisted.ensureDeferred
async def test_viewer_serves_dicomweb_only_to_a_logged_in_radiologist_and_takes_no_packages(make_central):
    """A viewer's DICOMweb answers 401 without a reading-room session (or with one that has ended) and 200
    with one; its STOW-RS refuses everyone (403 with a session) and POST /packages anyone but central (401),
    storing nothing."""
    central, viewer, _ = await _central_and_viewer(make_central, _fake_clock())
    ct = _with_recipient("CT_small.dcm", recipient=VIEWER)
    await _send_to_viewer(central, viewer, ct)
    base = f"http://127.0.0.1:{listener_port(viewer, 'http')}"

    anonymous = await deferToThread(requests.get, f"{base}/dicomweb/studies", timeout=30)
    assert anonymous.status_code == 401 and anonymous.headers["Content-Type"] == "application/problem+json"
    stale = await deferToThread(requests.get, f"{base}/dicomweb/studies", cookies={"medd_session": "forged"}, timeout=30)
    assert stale.status_code == 401
    session = await viewer.reading_room.create_session("dr-lee")
    studies = await deferToThread(requests.get, f"{base}/dicomweb/studies", cookies={"medd_session": session}, timeout=30)
    assert studies.status_code == 200
    assert [s["0020000D"]["Value"][0] for s in studies.json()] == [ct.StudyInstanceUID]

    before = await viewer.database.run(count_objects)
    other = dcmread(BytesIO(testdata("MR_small.dcm")))
    data = BytesIO()
    other.save_as(data, enforce_file_format=True)
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + data.getvalue() + b"\r\n--b--\r\n"
    stow = await deferToThread(requests.post, f"{base}/dicomweb/studies", data=body, cookies={"medd_session": session},
                               headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'},
                               timeout=30)
    assert stow.status_code == 403
    content = parse_part10(data.getvalue())
    package = build_package(content, AttachmentId.of("image", uid=content.keyinfo.sop_instance_uid),
                            origin="ct1@centre-a.example", destination=VIEWER)
    posted = await deferToThread(requests.post, f"{base}/packages", data=package,
                                 headers={"Content-Type": "message/rfc822"}, timeout=30)
    assert posted.status_code == 401 and "only from central" in posted.json()["detail"]
    assert await viewer.database.run(count_objects) == before
