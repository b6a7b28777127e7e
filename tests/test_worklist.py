"""The worklist (medd.viewer.web.worklist) and the idle lock (medd.viewer.web.locking): priority and age
from the images, the registered centre and the expected image count from central's package headers, the
complete mark, sorting, auto-refresh, "next unread", "being read by", and central's study-level tracking.

The browser tests drive headless Debian Chromium (Playwright, never ``playwright install``) against a real
reading room on loopback whose clock is a ``Clock`` the test advances (so "complete after 60 s without a
new image" is decided by the clock, never by sleeping). They skip with the reason when Chromium or
Playwright is missing. ``MEDD_SCREENSHOTS=DIR`` saves the worklist into DIR.
"""
from __future__ import annotations

import dataclasses
import os
import re
from io import BytesIO

import pydicom
import pytest
import pytest_twisted
import requests
from pydicom.dataset import Dataset
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.threads import blockingCallFromThread, deferToThread

from medd.ingest import Ingest
from medd.objects import InvalidObject, extract_key_information, parse_part10
from medd.package import AttachmentId, build_package, read_package
from medd.plugins.api import IndexQueries, TLSSettings, TransportAPI
from medd.plugins.host import load_plugins
from medd.storage.accounts import Accounts
from medd.storage.blobstore import FileBlobStore
from medd.storage.database import Database
from medd.storage.inbox import Inbox, WorklistQuery
from medd.storage.index import ObjectIndex
from medd.storage.outgoing import OutgoingPackages
from medd.transports.http import MeddSite
from medd.viewer.access import ViewerAccess
from medd.viewer.outgoing import OutgoingService
from medd.viewer.reading import ReadingRoom
from medd.viewer.settings import CentralSettings, ReadingRoomSettings
from medd.viewer.users import add_user
from medd.viewer.web import reading_room_resources
from tests.conftest import listener_port
from tests.test_reading_room import (CENTRAL_ORIGIN, CHROMIUM, CHROMIUM_ARGS, VIEWER_NAME, RecordingCentral,
                                     _browser_login, _browser_or_skip)

COMPLETE_AFTER = 60.0


AGES = {"ALPHA": ("038Y", "F"), "BRAVO": ("045Y", "M"), "CHARLIE": ("071Y", "F"), "DELTA": ("062Y", "M"),
        "ECHO": ("029Y", "F")}


def _study_image(study: int, n: int, *, patient: str, priority: str = "", age: str = "") -> bytes:
    """CT_small.dcm as image ``n`` of study ``1.2.826.0.9.{study}``."""
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID = f"1.2.826.0.9.{study}"
    ds.SeriesInstanceUID = f"1.2.826.0.9.{study}.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.9.{study}.1.{n}"
    ds.PatientName, ds.PatientID = patient, f"ID-{patient[:5]}"
    ds.AccessionNumber = f"ACC{study}"
    ds.InstitutionName = "What the scanner says"
    if priority:
        item = Dataset()
        item.RequestedProcedurePriority = priority
        ds.RequestAttributesSequence = [item]
    ds.PatientAge, ds.PatientSex = AGES.get(patient.split("^")[0], ("050Y", "O"))
    if age:
        ds.PatientAge = age
    ds.StudyDescription = "CT HEAD"
    out = BytesIO()
    ds.save_as(out)
    return out.getvalue()


def _package(data: bytes, *, centre: str | None = "centre-a", expected: int | None = None) -> bytes:
    """The package central delivers: the image, with Medd-Centre and Medd-Study-Images."""
    content = parse_part10(data)
    return build_package(content, AttachmentId.of("image", uid=content.keyinfo.sop_instance_uid),
                         origin=CENTRAL_ORIGIN, destination=VIEWER_NAME, centre=centre, study_images=expected)


# --- what the worklist reads from the objects and the packages --------------------------------------------


@pytest.mark.parametrize("where, value, expected", [
    ("sequence", "STAT", "STAT"), ("top", "HIGH", "HIGH"), ("study", "LOW", "LOW"), ("top", "SOON", ""),
    (None, None, ""),
])
def test_priority_from_the_request_attributes(where, value, expected):
    """The priority is Requested Procedure Priority, in the Request Attributes Sequence or at the top level,
    else the retired Study Priority ID; a value DICOM does not define is no priority."""
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    if where == "sequence":
        item = Dataset()
        item.RequestedProcedurePriority = value
        ds.RequestAttributesSequence = [item]
    elif where == "top":
        ds.RequestedProcedurePriority = value
    elif where == "study":
        ds.StudyPriorityID = value
    ds.PatientAge = "045Y"
    keyinfo = extract_key_information(ds, ds.file_meta.TransferSyntaxUID)
    assert keyinfo.priority == expected and keyinfo.patient_age == "045Y"


def test_central_s_headers_travel_and_are_checked():
    """Medd-Centre and Medd-Study-Images are read back from the package; a malformed one refuses the package."""
    data = _package(_study_image(1, 1, patient="A^B"), centre="centre-a", expected=40)
    package = read_package(data, load_plugins().object_type)
    assert (package.centre, package.study_images) == ("centre-a", 40)
    plain = read_package(_package(_study_image(1, 1, patient="A^B"), centre=None), load_plugins().object_type)
    assert (plain.centre, plain.study_images) == (None, None)
    for header, value in (("Medd-Centre", "<script>"), ("Medd-Study-Images", "-3")):
        bad = data.replace(b"\r\nMIME-Version", f"\r\n{header}-X: 1\r\nMIME-Version".encode(), 1)
        bad = re.sub(rf"{header}: [^\r]*".encode(), f"{header}: {value}".encode(), bad)
        with pytest.raises(InvalidObject, match=header):
            read_package(bad, load_plugins().object_type)


# --- a reading room on loopback, on a Clock ------------------------------------------------------------


class ClockedRoom:
    """A viewer's reading room over a temporary SQLite database whose stamps and "now" come from one Clock;
    objects arrive as central's packages through the real Ingest; served on loopback."""

    async def start(self, tmp_path) -> "ClockedRoom":
        self.clock = Clock()
        self.clock.advance(reactor.seconds())
        self.database = Database(reactor, f"sqlite:///{tmp_path / 'viewer.sqlite'}")
        self.database.create_schema()
        self.database.start()
        index = ObjectIndex(self.database, self.clock)
        blobs = FileBlobStore(tmp_path / "store")
        self.ingest = Ingest(reactor, index, blobs, load_plugins(), max_object_size=64 * 1024 * 1024,
                             delivery_facts=True)
        settings = CentralSettings(url="http://central.invalid", token="t", poll_interval=60)
        self.outgoing = OutgoingService(OutgoingPackages(self.database, self.clock), self.ingest, blobs,
                                        RecordingCentral(), settings.backoff, self.clock)
        self.room = ReadingRoom(Inbox(self.database, self.clock), Accounts(self.database, self.clock), self.ingest,
                                self.outgoing, VIEWER_NAME, settings, self.clock,
                                room_settings=ReadingRoomSettings(complete_after=COMPLETE_AFTER, idle_lock=0))
        self.ingest.plugins.manager.register(ViewerAccess(self.room), name="medd-viewer-access")
        for user in ("alice", "bob"):
            await add_user(self.room.accounts, user, f"{user}-password")
        api = TransportAPI(reactor, self.ingest, transport="http", node_name=VIEWER_NAME, settings={},
                           tls=TLSSettings(), web_resources=reading_room_resources(self.room, self.ingest),
                           queries=IndexQueries(index, self.ingest))
        self.port = reactor.listenTCP(0, MeddSite(api), interface="127.0.0.1")
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"
        return self

    async def receive(self, data: bytes, **headers) -> None:
        await self.ingest.receive_package(_package(data, **headers), transport="pull")

    def receive_from_thread(self, data: bytes, **headers) -> None:
        blockingCallFromThread(reactor, lambda: ensureDeferred(self.receive(data, **headers)))

    def advance_from_thread(self, seconds: float) -> None:
        blockingCallFromThread(reactor, self.clock.advance, seconds)

    async def stop(self) -> None:
        await self.port.stopListening()
        await maybeDeferred(self.outgoing.stopService)
        self.ingest.stop()
        self.database.stop()


@pytest.fixture
def clocked_room(tmp_path, monkeypatch):
    """A :class:`ClockedRoom` whose worklist page polls every second (the tests wait for its refreshes)."""
    monkeypatch.setattr("medd.viewer.web.worklist.REFRESH", 1)
    room = pytest_twisted.blockon(ensureDeferred(ClockedRoom().start(tmp_path)))
    yield room
    pytest_twisted.blockon(ensureDeferred(room.stop()))


ROUTINE, STAT, LATER = "1.2.826.0.9.1", "1.2.826.0.9.2", "1.2.826.0.9.3"


async def _three_studies(room: ClockedRoom) -> None:
    """ROUTINE (oldest, patient BRAVO), then STAT (CHARLIE, 2 images), then a later one without a priority
    (ALPHA); ten seconds apart."""
    await room.receive(_study_image(1, 1, patient="BRAVO^B", priority="ROUTINE", age="045Y"), expected=1)
    room.clock.advance(10)
    for n in (1, 2):
        await room.receive(_study_image(2, n, patient="CHARLIE^C", priority="STAT"), expected=2)
    room.clock.advance(10)
    await room.receive(_study_image(3, 1, patient="ALPHA^A"), expected=1)


@pytest_twisted.ensureDeferred
async def test_worklist_rows_sort_and_next_unread_in_the_inbox(clocked_room):
    """A worklist row carries the priority, the registered centre (not Institution Name), the age and the
    expected count; STAT sorts first by default; every column sorts both ways; "next unread" is the oldest
    STAT study, then the oldest unread one, skipping one someone is reading and one already opened."""
    room = clocked_room.room
    await _three_studies(clocked_room)
    page = await room.worklist(WorklistQuery(user="alice"))
    assert [s.study_uid for s in page.studies] == [STAT, ROUTINE, LATER]
    stat = page.studies[0]
    assert (stat.priority, stat.centre, stat.images, stat.expected_images) == ("STAT", "centre-a", 2, 2)
    assert page.studies[1].patient_age == "045Y" and page.studies[1].accession_number == "ACC1"

    async def order(sort, descending=False):
        found = await room.worklist(WorklistQuery(user="alice", sort=sort, descending=descending))
        return [s.study_uid for s in found.studies]

    assert await order("patient") == [LATER, ROUTINE, STAT]
    assert await order("patient", True) == [STAT, ROUTINE, LATER]
    assert await order("received") == [ROUTINE, STAT, LATER]
    assert await order("received", True) == [LATER, STAT, ROUTINE]
    assert (await order("images", True))[0] == STAT and (await order("images"))[-1] == STAT
    assert await room.next_unread("alice") == STAT
    assert await room.open_study(STAT, "bob") == []
    assert await room.next_unread("alice") == ROUTINE  # bob reads the STAT study
    assert await room.open_study(STAT, "alice") == ["bob"]  # refused: not confirmed
    assert room.being_read_by(STAT) == ["bob"]
    assert await room.open_study(STAT, "alice", confirmed=True) == ["bob"]
    assert room.being_read_by(STAT) == ["alice", "bob"]
    clocked_room.clock.advance(room.room_settings.being_read_for + 1)
    assert room.being_read_by(STAT) == []
    await room.opened(f"{ROUTINE}.1.1", "bob")
    assert await room.next_unread("alice") == STAT
    assert room.being_read_by(ROUTINE) == ["bob"]  # opening an image reads its study


def _drive(base: str, scenario, *, contexts: int = 1, stub_ohif: bool = True):
    """Run ``scenario(*pages)`` in headless Chromium with ``contexts`` separate users' pages (in this worker
    thread: the reactor keeps serving). OHIF's page is answered by a stub: these tests check where the
    worklist sends the user, not OHIF (tests/test_ohif.py). With the real OHIF (``stub_ohif=False``), only
    policy violations and errors of medd's own scripts fail the run (OHIF logs its own troubles)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            pages, errors = [], []
            for _ in range(contexts):
                context = browser.new_context(viewport={"width": 1400, "height": 700}, base_url=base)
                if stub_ohif:
                    context.route("**/ohif/**", lambda route: route.fulfill(status=200, content_type="text/html",
                                                                             body="<title>OHIF stub</title>"))
                page = context.new_page()
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                pages.append(page)
            result = scenario(*pages)
            # A CSP violation is a console error too; a 409 or 423 the script handles is logged by Chromium
            # as a failed resource load, which is what the page was meant to get.
            if not stub_ohif:
                errors = [e for e in errors if re.search(r"Content Security Policy|idle-lock|medd", e)]
            assert [e for e in errors if not re.search(r"status of (409|423|401)", e)] == [], errors
            return result
        finally:
            browser.close()


def _row(page, study_uid: str):
    return page.locator(f'#worklist tr[data-study-uid="{study_uid}"]')


def _order(page) -> list[str]:
    return page.locator("#worklist tbody tr").evaluate_all("rows => rows.map(r => r.dataset.studyUid)")


@pytest_twisted.ensureDeferred
async def test_worklist_sorts_refreshes_and_marks_complete_in_chromium(clocked_room):
    """In Chromium: STAT first by default; a column heading sorts by it from the keyboard, again in reverse;
    a study that arrives while the page is open appears without a reload, shown receiving (2 / 3) while
    images still arrive and complete only once the clock has gone ``complete_after`` without a new image."""
    _browser_or_skip()
    await _three_studies(clocked_room)
    shots = os.environ.get("MEDD_SCREENSHOTS")
    clocked_room.clock.advance(COMPLETE_AFTER + 1)
    new_study = "1.2.826.0.9.4"

    def scenario(page):
        _browser_login(page, "alice", "alice-password")
        assert _order(page) == [STAT, ROUTINE, LATER]
        stat = _row(page, STAT)
        assert "STAT" in stat.text_content() and "centre-a" in stat.text_content()
        assert "2 / 2" in stat.text_content() and stat.get_attribute("data-complete") == "yes"
        assert "45 y M" in _row(page, ROUTINE).text_content() and "ACC1" in _row(page, ROUTINE).text_content()
        page.focus("#sort-patient")
        page.keyboard.press("Enter")
        page.wait_for_url("**/worklist?sort=patient&order=asc")
        assert _order(page) == [LATER, ROUTINE, STAT]
        assert page.get_attribute('th[data-sort="patient"]', "aria-sort") == "ascending"
        page.focus("#sort-patient")
        page.keyboard.press("Enter")
        page.wait_for_url("**/worklist?sort=patient&order=desc")
        assert _order(page) == [STAT, ROUTINE, LATER]
        page.goto("/worklist")
        page.evaluate("window.notReloaded = true")
        for n in (1, 2):
            clocked_room.receive_from_thread(_study_image(4, n, patient="DELTA^D", priority="HIGH"), expected=3)
        row = _row(page, new_study)
        row.wait_for()
        assert "2 / 3" in row.text_content() and "receiving" in row.text_content()
        assert row.get_attribute("data-complete") == "no"
        clocked_room.receive_from_thread(_study_image(4, 3, patient="DELTA^D", priority="HIGH"), expected=3)
        page.wait_for_function(f"""() => document.querySelector('tr[data-study-uid="{new_study}"]')
                                   .textContent.includes("3 / 3")""")
        assert _row(page, new_study).get_attribute("data-complete") == "no"  # the last image just arrived
        assert _order(page)[:2] == [STAT, new_study]  # HIGH after STAT
        clocked_room.advance_from_thread(COMPLETE_AFTER + 1)
        page.wait_for_selector(f'tr[data-study-uid="{new_study}"][data-complete="yes"]')
        assert "complete" in _row(page, new_study).text_content()
        assert page.evaluate("window.notReloaded") is True
        blockingCallFromThread(reactor, lambda: ensureDeferred(clocked_room.room.open_study(ROUTINE, "bob")))
        _row(page, ROUTINE).locator(".being-read").wait_for()
        if shots:
            page.screenshot(path=os.path.join(shots, "worklist.png"))

    await deferToThread(_drive, clocked_room.base, scenario)


@pytest_twisted.ensureDeferred
async def test_next_unread_and_being_read_by_in_chromium(clocked_room):
    """Two radiologists on one viewer node: alice's "Next unread" opens the STAT study; bob's worklist then shows
    it "being read by alice" (after a refresh, without a reload), his "Next unread" skips it for the oldest
    unread study, and opening alice's study asks him first: declined, he stays; confirmed, it opens."""
    _browser_or_skip()
    await _three_studies(clocked_room)

    def scenario(alice, bob):
        _browser_login(alice, "alice", "alice-password")
        _browser_login(bob, "bob", "bob-password")
        assert "being read" not in _row(bob, STAT).text_content()
        alice.click("#next-unread")
        alice.wait_for_url(f"**/ohif/viewer?StudyInstanceUIDs={STAT}")
        _row(bob, STAT).locator(".being-read").wait_for()
        assert "being read by alice" in _row(bob, STAT).text_content()
        asked = []

        def decline(dialog):
            asked.append(dialog.message)
            dialog.dismiss()

        bob.once("dialog", decline)
        _row(bob, STAT).locator("a.open-images").click()
        bob.wait_for_selector("#worklist-message:has-text('Left for alice')")
        assert "being read by alice" in asked[0] and bob.url.endswith("/worklist")
        bob.once("dialog", lambda dialog: dialog.accept())
        _row(bob, STAT).locator("a.open-images").click()
        bob.wait_for_url(f"**/ohif/viewer?StudyInstanceUIDs={STAT}")
        bob.goto("/worklist")
        bob.click("#next-unread")
        bob.wait_for_url(f"**/ohif/viewer?StudyInstanceUIDs={ROUTINE}")

    await deferToThread(_drive, clocked_room.base, scenario, contexts=2)
    assert clocked_room.room.being_read_by(STAT) == ["alice", "bob"]


@pytest_twisted.ensureDeferred
async def test_idle_lock_engages_and_unlocks_with_the_password_in_chromium(clocked_room):
    """With a short idle_lock the page locks itself after no input: an overlay asks for the password, the
    session is locked on the node (the API answers 423, DICOMweb refuses, a page sends to /unlock); a wrong
    password keeps it locked; the right one unlocks it and what the page held (a half-typed filter) is still
    there."""
    _browser_or_skip()
    await _three_studies(clocked_room)
    room = clocked_room.room
    room.room_settings = dataclasses.replace(room.room_settings, idle_lock=2.0)
    image = f"{STAT}.1.1"

    def scenario(page):
        _browser_login(page, "alice", "alice-password")
        page.fill("#f-patient", "half-typed")
        page.wait_for_selector("#idle-lock", timeout=60_000)
        assert page.request.get("/api/worklist").status == 423
        frames = page.request.get(f"/dicomweb/studies/{STAT}/series/{STAT}.1/instances/{image}/frames/1")
        assert frames.status in (401, 403)
        locked_page = page.request.get("/worklist", max_redirects=0)
        assert locked_page.status == 303 and locked_page.headers["location"].startswith("/unlock")
        page.fill("#idle-lock-password", "wrong")
        page.click("#idle-lock-unlock")
        page.wait_for_selector("#idle-lock-error:has-text('wrong password')")
        assert page.request.get("/api/worklist").status == 423
        page.fill("#idle-lock-password", "alice-password")
        page.click("#idle-lock-unlock")
        page.wait_for_selector("#idle-lock", state="detached")
        assert page.input_value("#f-patient") == "half-typed"
        assert page.request.get("/api/worklist").status == 200

    await deferToThread(_drive, clocked_room.base, scenario)


@pytest_twisted.ensureDeferred
async def test_idle_lock_counts_input_in_ohif_and_locks_ohif_alone_in_chromium(clocked_room):
    """The idle lock runs in OHIF's page too (a same-origin script medd writes into OHIF's index.html, allowed
    by OHIF's policy). In the reading screen, input inside OHIF's iframe is the screen's activity: moving the
    mouse and typing over the images for three idle_lock periods does not lock it; once the input stops, the
    screen locks (the session too: the API answers 423). OHIF's page opened alone locks itself the same way
    and unlocks with the password."""
    from tests.test_ohif import _ohif_or_skip

    _browser_or_skip()
    _ohif_or_skip()
    await _three_studies(clocked_room)
    room = clocked_room.room
    idle = 2.0
    room.room_settings = dataclasses.replace(room.room_settings, idle_lock=idle)
    framed_ready = ("() => { const w = document.querySelector('#images').contentWindow;"
                    " return !!(w && w.medd && w.medd.isLocked); }")

    def unlock(page):
        page.fill("#idle-lock-password", "alice-password")
        page.click("#idle-lock-unlock")
        page.wait_for_selector("#idle-lock", state="detached")
        assert page.request.get("/api/worklist").status == 200

    def scenario(page):
        _browser_login(page, "alice", "alice-password")
        page.goto(f"/studies/{STAT}", wait_until="domcontentloaded")
        banner = page.locator(".patient-banner, header").first.bounding_box()
        for n in range(300):  # keep the screen itself active until OHIF's page in the frame has its script
            if page.evaluate(framed_ready):
                break
            page.mouse.move(banner["x"] + 10 + n % 50, banner["y"] + 5)
            page.wait_for_timeout(200)
        assert page.evaluate(framed_ready), "the idle lock's script never ran in OHIF's page"
        if page.locator("#idle-lock").count():  # OHIF took longer to load than idle_lock (a busy machine)
            unlock(page)
        box = page.locator("#images").bounding_box()
        for n in range(int(3 * idle / 0.2)):  # input only inside the iframe, three idle periods long
            page.mouse.move(box["x"] + 100 + (n % 20) * 10, box["y"] + box["height"] / 2)
            if n % 5 == 0:
                page.keyboard.press("Shift")
            page.wait_for_timeout(200)
        assert page.locator("#idle-lock").count() == 0, "input inside OHIF did not count as the screen's activity"
        page.wait_for_selector("#idle-lock", timeout=60_000)  # no input: it locks
        assert page.request.get("/api/worklist").status == 423
        unlock(page)

        page.goto(f"/ohif/viewer?StudyInstanceUIDs={STAT}")
        assert page.evaluate("() => !!(window.medd && window.medd.isLocked)")
        page.wait_for_selector("#idle-lock", timeout=60_000)
        assert page.request.get("/api/worklist").status == 423
        assert page.locator("#root").evaluate("root => root.inert")  # OHIF itself is out of reach
        unlock(page)
        assert not page.locator("#root").evaluate("root => root.inert")

    await deferToThread(_drive, clocked_room.base, scenario, stub_ohif=False)


# --- central: the registered centre and the expected count travel; study-level tracking --------------------


@pytest_twisted.ensureDeferred
async def test_central_names_the_centre_and_tracks_the_study(make_central):
    """Central's packages tell the viewer the registered centre (not the image's Institution Name) and how
    many images of the study it routes there; central's GET /api/studies/{uid} and `medd track` show the
    study received, delivered, opened by whom and reported."""
    from medd.central.tracking import study_lines
    from tests.test_routing import _cstore
    from tests.test_viewer import VIEWER, _central_and_viewer, _local

    central, viewer, admin = await _central_and_viewer(make_central)
    images = []
    for n in (1, 2, 3):
        ds = pydicom.dcmread(BytesIO(_study_image(7, n, patient="ECHO^E", priority="STAT")))
        ds.NamesOfIntendedRecipientsOfResults = VIEWER
        images.append(ds)
    study_uid = images[0].StudyInstanceUID
    assert await deferToThread(_cstore, listener_port(central, "dicom"), images) == [0, 0, 0]
    await central.routing.router.kick()
    pulled = await viewer.viewer.requestor.kick()
    assert pulled.error is None, pulled
    local = await _local(viewer, images[-1].SOPInstanceUID)
    assert (local.centre, local.study_images, local.priority) == ("centre-a", 3, "STAT")
    (row,) = (await viewer.reading_room.worklist(WorklistQuery(user="dr-lee"))).studies
    assert (row.centre, row.images, row.expected_images, row.priority) == ("centre-a", 3, 3, "STAT")
    assert (await _local(central, images[0].SOPInstanceUID)).centre is None  # central's own row: its decision

    await viewer.reading_room.opened(images[0].SOPInstanceUID, "dr-lee")
    await viewer.reading_room.save_report(study_uid, "dr-lee", "No acute findings.")
    await viewer.viewer.outgoing.kick()
    await central.routing.router.kick()
    url = f"http://127.0.0.1:{listener_port(central, 'http')}/api/studies/{study_uid}"
    answer = await deferToThread(requests.get, url, headers={"Authorization": f"Bearer {admin}"})
    assert answer.status_code == 200, answer.text
    study = answer.json()
    assert (study["state"], study["centre"], study["images"]) == ("reported", "centre-a", 3)
    (to_viewer,) = study["destinations"]
    assert (to_viewer["destination"], to_viewer["delivered"], to_viewer["opened"]) == (VIEWER, 3, 1)
    assert to_viewer["opened_by"] == [{"user": "dr-lee", "images": 1}]
    assert len(study["reports"]) == 1 and study["reports"][0]["origin"] == VIEWER
    missing = await deferToThread(requests.get, url + "9", headers={"Authorization": f"Bearer {admin}"})
    assert missing.status_code == 404
    text = "\n".join(study_lines(await central.central_storage.tracking.study_state(study_uid)))
    assert "reported" in text and "3/3 delivered" in text and "opened by dr-lee (1)" in text


def test_reading_room_settings_are_checked(tmp_path):
    """[reading_room] complete_after, being_read_for and idle_lock are numbers (idle_lock 0 turns the lock off,
    being_read_for must be more than 0); each wrong one is named with its file and key; minutes become seconds."""
    from medd.config import ConfigError, load_config
    from medd.plugins.host import load_plugins as plugins
    from medd.service import check_against_plugins
    from medd.viewer.settings import reading_room_settings
    from tests.conftest import write_config
    from tests.test_viewer import VIEWER

    central = "[central]\nurl = http://central.example\ntoken = t\npoll_interval = 5\nallow_http = yes\n"
    ini = write_config(tmp_path, role="viewer", name=VIEWER, extra=central + "[reading_room]\ncomplete_after = soon\n"
                       "being_read_for = 0\nidle_lock = -1\n")
    with pytest.raises(ConfigError) as e:
        check_against_plugins(load_config(ini), plugins())
    assert {(p.section, p.key) for p in e.value.problems} == {
        ("reading_room", "complete_after"), ("reading_room", "being_read_for"), ("reading_room", "idle_lock")}
    assert all(p.file == str(ini) for p in e.value.problems)
    good = write_config(tmp_path, role="viewer", name=VIEWER, extra=central + "[reading_room]\ncomplete_after = 30\n"
                        "being_read_for = 5\nidle_lock = 0\n")
    settings = reading_room_settings(load_config(good))
    assert (settings.complete_after, settings.being_read_for, settings.idle_lock) == (30, 300, 0)
