"""The reading room (medd.viewer.web): rendering, login/session/CSRF rules,
pages over a small in-memory reading room, and the whole flow in headless
Chromium against a real central and a real viewer on loopback.

The browser tests need Debian's ``chromium`` at /usr/bin/chromium and the
``playwright`` Python package (never ``playwright install``); they skip
with the reason when either is missing. ``MEDD_SCREENSHOTS=DIR`` makes the
end-to-end test save the README's screenshots into DIR.
"""
from __future__ import annotations

import os
import re
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
import pytest_twisted
import requests
from PIL import Image
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from zope.interface.verify import verifyObject

from medd.ingest import Ingest
from medd.plugins.api import IndexQueries, TLSSettings, TransportAPI
from medd.plugins.host import load_plugins
from medd.storage.accounts import Accounts
from medd.storage.blobstore import FileBlobStore
from medd.storage.database import Database
from medd.storage.inbox import Inbox
from medd.storage.index import ObjectIndex
from medd.storage.reporting import Reporting
from medd.transports.http import MeddSite
from medd import rendering
from medd.viewer.access import ViewerAccess, keep_report_sources
from medd.viewer.annotations import check_annotations
from medd.viewer.contract import CannotAnnotate, IReadingRoom
from medd.storage.outgoing import OutgoingPackages
from medd.viewer.outgoing import OutgoingService
from medd.viewer.reading import ReadingRoom
from medd.viewer.settings import CentralSettings
from medd.viewer.users import add_user
from medd.viewer.web import csrf_token, reading_room_resources
from medd.viewer.web.pages import _safe_next
from tests.conftest import testdata

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _testfile(name: str) -> bytes:
    return Path(pydicom.data.get_testdata_file(name)).read_bytes()


def _png(data: bytes) -> Image.Image:
    image = Image.open(BytesIO(data))
    image.load()
    return image


# --- rendering -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, size, mode, frames", [
    ("CT_small.dcm", (128, 128), "L", 1),                     # uncompressed, MONOCHROME2, rescaled CT
    ("JPEG2000.dcm", (256, 1024), "L", 1),                    # JPEG 2000 (pylibjpeg-openjpeg)
    ("MR_small_RLE.dcm", (64, 64), "L", 1),                   # RLE Lossless (pylibjpeg-rle)
    ("MR_small_jpeg_ls_lossless.dcm", (64, 64), "L", 1),      # JPEG-LS Lossless (pylibjpeg-libjpeg)
    ("SC_rgb_jpeg_gdcm.dcm", (100, 100), "RGB", 1),           # JPEG Lossless, RGB
    ("SC_jpeg_no_color_transform.dcm", (256, 256), "RGB", 1),  # JPEG Baseline, RGB
    ("SC_rgb_rle_2frame.dcm", (100, 100), "RGB", 2),          # multi-frame RGB, RLE
    ("examples_ybr_color.dcm", (320, 240), "RGB", 30),        # multi-frame JPEG Baseline YBR_FULL_422
    ("rtdose_rle.dcm", (10, 10), "L", 15),                    # multi-frame grayscale, RLE
    ("6154", (16, 16), "L", 1),                               # MONOCHROME1 CR
])
def test_render_every_kind_of_stored_image(name, size, mode, frames):
    """Compressed, multi-frame, RGB and MONOCHROME1 objects all render to an image of their size, every frame;
    a thumbnail is a JPEG that fits the size asked for."""
    data = _testfile(name)
    for frame in sorted({0, frames - 1}):
        image = rendering.render_image(data, frame=frame)
        assert image.size == size and image.mode == mode
    thumbnail = _png(rendering.render_thumbnail(data, 48))
    assert thumbnail.format == "JPEG" and max(thumbnail.size) <= 48 and thumbnail.mode == mode


def test_render_window_level_changes_pixels_and_defaults_to_the_objects_window():
    """The default render uses WindowCenter/Width (or min/max); another window gives other pixels."""
    data = testdata("MR_small_RLE.dcm")  # WindowCenter 600, WindowWidth 1600
    default = np.asarray(rendering.render_image(data))
    own = np.asarray(rendering.render_image(data, center=600, width=1600))
    narrow = np.asarray(rendering.render_image(data, center=600, width=200))
    assert (default == own).all()
    assert not (narrow == default).all()
    # A narrower window around the same centre stretches contrast: more pixels saturate.
    assert ((narrow == 0) | (narrow == 255)).sum() > ((default == 0) | (default == 255)).sum()
    ct = testdata("CT_small.dcm")  # no window in the object: min/max of the rescaled pixels
    pixels = np.asarray(rendering.render_image(ct))
    assert pixels.min() == 0 and pixels.max() >= 254


def test_render_frames_differ_and_monochrome1_is_inverted():
    """Frame n of a multi-frame object is that frame; MONOCHROME1 renders dark where MONOCHROME2 would be bright."""
    data = _testfile("examples_ybr_color.dcm")
    first, last = (np.asarray(rendering.render_image(data, frame=f)) for f in (0, 29))
    assert not (first == last).all()
    m1 = _testfile("6154")
    ds = pydicom.dcmread(BytesIO(m1))
    inverted = np.asarray(rendering.render_image(m1))
    ds.PhotometricInterpretation = "MONOCHROME2"
    out = BytesIO()
    ds.save_as(out)
    plain = np.asarray(rendering.render_image(out.getvalue()))
    assert (inverted.astype(int) + plain.astype(int) == 255).all()


def test_render_refuses_what_it_cannot_do():
    """A frame past the end, a window narrower than 1 and an object without pixels are RenderErrors, not crashes."""
    with pytest.raises(rendering.RenderError, match="frame 3 does not exist"):
        rendering.render_image(_testfile("SC_rgb_rle_2frame.dcm"), frame=2)
    with pytest.raises(rendering.RenderError, match="window width"):
        rendering.render_image(testdata("CT_small.dcm"), center=10, width=0)
    ds = pydicom.dcmread(BytesIO(testdata("CT_small.dcm")))
    del ds.PixelData
    out = BytesIO()
    ds.save_as(out)
    with pytest.raises(rendering.RenderError, match="no pixel data"):
        rendering.render_thumbnail(out.getvalue(), 64)


# --- pages over a real reading room: temporary SQLite, blob store, the real Ingest ------------------------


VIEWER_NAME = "dr-lee@viewers.example"
CENTRAL_ORIGIN = "central@central"

STUDIES = {
    # study uid -> (patient name, patient id, study date, institution, [(series uid, [file names])])
    "1.2.826.0.1.1": ("DOE^JANE", "P001", "20240105", "Centre A", [("1.2.826.0.1.1.1", ["CT_small.dcm"])]),
    "1.2.826.0.1.2": ("ROE^RICHARD", "P002", "20230611", "Centre B",
                      [("1.2.826.0.1.2.1", ["MR_small_RLE.dcm"]), ("1.2.826.0.1.2.2", ["examples_ybr_color.dcm"])]),
}


def study_object(name: str, study_uid: str, series_uid: str, patient: tuple[str, str], date: str, institution: str,
                 series_number: int) -> bytes:
    """One of pydicom's test files, made part of the given study and series."""
    ds = pydicom.dcmread(BytesIO(_testfile(name)))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = study_uid, series_uid, series_number
    ds.PatientName, ds.PatientID = patient
    ds.StudyDate, ds.InstitutionName = date, institution
    out = BytesIO()
    ds.save_as(out)
    return out.getvalue()


class RecordingCentral:
    """Central's end of the viewer's outgoing packages (the network peer, faked): records each package posted."""

    def __init__(self):
        self.posted: list[bytes] = []

    async def post_package(self, data: bytes) -> int:
        self.posted.append(data)
        return 201


class Backend:
    """A viewer's reading room over a temporary SQLite database and blob store, objects ingested through
    the real Ingest, served on a loopback HTTP site."""

    async def start(self, tmp_path: Path, clock=reactor) -> "Backend":
        """``clock`` is the reading room's (its login throttle's); the database and the outbox run on the reactor."""
        self.database = Database(reactor, f"sqlite:///{tmp_path / 'viewer.sqlite'}")
        self.database.create_schema()
        self.database.start()
        self.blobs = FileBlobStore(tmp_path / "store")
        index = ObjectIndex(self.database, reactor)
        self.reporting = Reporting(self.database, reactor)
        self.ingest = Ingest(reactor, index, self.blobs, load_plugins(), max_object_size=64 * 1024 * 1024,
                             package_with=keep_report_sources(self.reporting.keeper()))
        settings = CentralSettings(url="http://central.invalid", token="t", poll_interval=60)
        self.central = RecordingCentral()
        self.outgoing = OutgoingService(OutgoingPackages(self.database, reactor), self.ingest, self.blobs, self.central,
                                        settings.backoff, reactor)
        self.room = ReadingRoom(Inbox(self.database, reactor), Accounts(self.database, reactor), self.ingest,
                                self.outgoing, VIEWER_NAME, settings, clock, reporting=self.reporting)
        # The viewer's access policy, as the node registers it: its DICOMweb serves a reading-room session.
        self.ingest.plugins.manager.register(ViewerAccess(self.room), name="medd-viewer-access")
        await add_user(self.room.accounts, "alice", "s3cret")
        self.by_name: dict[str, str] = {}
        for study_uid, (patient, pid, date, institution, series) in STUDIES.items():
            for number, (series_uid, names) in enumerate(series, 1):
                for name in names:
                    data = study_object(name, study_uid, series_uid, (patient, pid), date, institution, number)
                    stored = await self.ingest.receive_dicom(data, transport="pull", origin=CENTRAL_ORIGIN)
                    self.by_name[name] = stored.uid
        api = TransportAPI(reactor, self.ingest, transport="http", node_name=VIEWER_NAME, settings={},
                           tls=TLSSettings(), web_resources=reading_room_resources(self.room, self.ingest),
                           queries=IndexQueries(index, self.ingest))
        self.port = reactor.listenTCP(0, MeddSite(api), interface="127.0.0.1")
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"
        return self

    async def stop(self) -> None:
        await self.port.stopListening()
        await maybeDeferred(self.outgoing.stopService)
        self.ingest.stop()
        self.database.stop()

    async def queued(self):
        """The packages queued for central (status messages, overlays, reports), oldest first."""
        return await self.outgoing.packages.packages()


@pytest.fixture
def room_site(tmp_path):
    """A real reading room with two studies (three images) and the user alice, served on loopback."""
    backend = pytest_twisted.blockon(ensureDeferred(Backend().start(tmp_path)))
    yield backend
    pytest_twisted.blockon(ensureDeferred(backend.stop()))


def test_the_reading_room_provides_its_contract(room_site):
    """The viewer's ReadingRoom provides IReadingRoom, every method and attribute of it."""
    assert verifyObject(IReadingRoom, room_site.room)


def _thread(fn, *args, **kw):
    return deferToThread(fn, *args, **kw)


def _login(base: str, user="alice", password="s3cret") -> requests.Session:
    s = requests.Session()
    form = s.get(base + "/")
    nonce = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
    r = s.post(base + "/login", data={"username": user, "password": password, "csrf": nonce}, allow_redirects=False)
    assert r.status_code == 303, r.text
    return s


def _csrf(html: str) -> str:
    return re.search(r'<meta name="csrf-token" content="([^"]+)"', html).group(1)


@pytest_twisted.ensureDeferred
async def test_every_page_needs_a_session(room_site):
    """Without a session, pages (OHIF's too) redirect to the login form (keeping where to go next), DICOMweb
    answers 401, and nothing is recorded or sent."""
    base, uid = room_site.base, room_site.by_name["CT_small.dcm"]

    def check():
        for path in ("/worklist", "/studies/1.2.826.0.1.1", "/ohif/viewer?StudyInstanceUIDs=1.2.826.0.1.1"):
            r = requests.get(base + path, allow_redirects=False)
            assert r.status_code == 303 and r.headers["Location"].startswith("/?next="), path
        frame = f"{base}/dicomweb/studies/1.2.826.0.1.1/series/1.2.826.0.1.1.1/instances/{uid}/frames/1"
        r = requests.get(frame, allow_redirects=False)
        assert r.status_code == 401 and "log in" in r.json()["detail"]
        assert r.headers["Content-Type"] == "application/problem+json"
        r = requests.post(f"{base}/studies/1.2.826.0.1.1/report", data={"text": "x"}, allow_redirects=False)
        assert r.status_code == 401
        r = requests.get(base + "/worklist", cookies={"medd_session": "forged"}, allow_redirects=False)
        assert r.status_code == 303

    await _thread(check)
    assert await room_site.queued() == []
    assert (await room_site.room.study("1.2.826.0.1.1", "alice")).series[0].instances[0].opened is False


@pytest_twisted.ensureDeferred
async def test_login_form_cookie_rules_and_logout(room_site):
    """/ is a login form (username, password); a good login sets an HttpOnly SameSite=Strict session cookie;
    a wrong password or a form without its login cookie is refused; logout ends the session."""
    base = room_site.base
    ended = []

    def check():
        s = requests.Session()
        form = s.get(base + "/")
        assert form.status_code == 200 and form.headers["Content-Type"].startswith("text/html")
        assert 'name="username"' in form.text and 'name="password"' in form.text and 'method="post"' in form.text
        assert "frame-ancestors 'none'" in form.headers["Content-Security-Policy"]
        nonce = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
        wrong = s.post(base + "/login", data={"username": "alice", "password": "nope", "csrf": nonce},
                       allow_redirects=False)
        assert wrong.status_code == 401 and "wrong password" in wrong.text and "medd_session" not in s.cookies
        nonce = re.search(r'name="csrf" value="([^"]+)"', wrong.text).group(1)
        no_cookie = requests.post(base + "/login", data={"username": "alice", "password": "s3cret", "csrf": nonce},
                                  allow_redirects=False)
        assert no_cookie.status_code == 403 and "cookie" in no_cookie.text
        other_site = s.post(base + "/login", data={"username": "alice", "password": "s3cret", "csrf": nonce},
                            headers={"Origin": "https://evil.example"}, allow_redirects=False)
        assert other_site.status_code == 403
        ok = s.post(base + "/login", data={"username": "alice", "password": "s3cret", "csrf": nonce,
                                           "next": "/studies/1.2.826.0.1.1"}, allow_redirects=False)
        assert ok.status_code == 303 and ok.headers["Location"] == "/studies/1.2.826.0.1.1"
        cookie = next(h for h in ok.raw.headers.getlist("Set-Cookie") if h.startswith("medd_session="))
        assert "HttpOnly" in cookie and "samesite=strict" in cookie.lower() and "Path=/" in cookie
        # An open redirect after login is not offered.
        evil = _login_next(base, "//evil.example/x")
        assert evil == "/worklist"
        page = s.get(base + "/worklist")
        assert page.status_code == 200 and "alice" in page.text
        assert s.get(base + "/", allow_redirects=False).headers["Location"] == "/worklist"
        token = s.cookies["medd_session"]
        assert s.post(base + "/logout", data={"csrf": "wrong"}, allow_redirects=False).status_code == 403
        out = s.post(base + "/logout", data={"csrf": csrf_token(token)}, allow_redirects=False)
        assert out.status_code == 303
        ended.append(token)
        assert requests.get(base + "/worklist", cookies={"medd_session": token}, allow_redirects=False).status_code == 303

    await _thread(check)
    assert await room_site.room.user_for_session(ended[0]) is None


def _login_next(base: str, next_path: str) -> str:
    s = requests.Session()
    nonce = re.search(r'name="csrf" value="([^"]+)"', s.get(base + "/").text).group(1)
    r = s.post(base + "/login", data={"username": "alice", "password": "s3cret", "csrf": nonce, "next": next_path},
               allow_redirects=False)
    return r.headers["Location"]


HOSTILE_NEXT = [
    "//evil.example/x", "/\\evil.example", "\\\\evil.example", "/%09/evil.example", "/\t/evil.example",
    "/%0d%0a//evil.example", "/\r\n//evil.example", "/%2F/evil.example", "/%5cevil.example", "/%252F%252Fevil.example",
    "https://evil.example", "HTTPS://evil.example/", "javascript:alert(1)", "JaVaScRiPt:alert(document.cookie)",
    " /worklist", "/worklist\x00", "/work list", "/\u2028/evil.example", "/%e2%80%a8/evil.example", "evil.example",
    "", "/" + "a" * 3000,
]
GOOD_NEXT = ["/", "/worklist", "/worklist?patient=Smith&status=unread", "/studies/1.2.826.0.1.1",
             "/images/1.2.3/render.png?frame=2", "/worklist?patient=M%C3%BCller", "/worklist?patient=a+b"]


@pytest.mark.parametrize("value", HOSTILE_NEXT)
def test_next_refuses_anything_but_a_path_on_this_site(value):
    """A ``next`` that a browser could take to another site (``//``, a backslash, tabs or newlines it drops,
    as sent or percent-decoded, a scheme) or that holds control characters or spaces goes to the worklist."""
    assert _safe_next(value) == "/worklist"


@pytest.mark.parametrize("value", GOOD_NEXT)
def test_next_keeps_a_path_on_this_site(value):
    """A same-site absolute path, with its query, is where the login goes next, unchanged."""
    assert _safe_next(value) == value


@pytest_twisted.ensureDeferred
async def test_login_next_with_a_tab_does_not_leave_the_site(room_site):
    """The reported ``?next=/%09/host/path`` (and its form field twin) lands on the worklist after login."""
    base = room_site.base

    def check():
        s = requests.Session()
        form = s.get(base + "/?next=/%09/evil.example/path")
        assert 'value="/worklist"' in form.text and "evil" not in form.text
        return [_login_next(base, value) for value in ("/\t/evil.example/path", "/%09/evil.example/path",
                                                       "/studies/1.2.826.0.1.1")]

    assert await _thread(check) == ["/worklist", "/worklist", "/studies/1.2.826.0.1.1"]


class LoginForm:
    """A browser at the login form: keeps the form's nonce (its cookie is in the session) for the next POST."""

    def __init__(self, base: str):
        self.base, self.session = base, requests.Session()
        self.nonce = re.search(r'name="csrf" value="([^"]+)"', self.session.get(base + "/").text).group(1)

    def post(self, password: str, user: str = "alice", **headers) -> requests.Response:
        r = self.session.post(self.base + "/login", data={"username": user, "password": password, "csrf": self.nonce},
                              headers=headers, allow_redirects=False)
        found = re.search(r'name="csrf" value="([^"]+)"', r.text)
        if found:
            self.nonce = found.group(1)
        return r


@pytest_twisted.ensureDeferred
async def test_thirty_wrong_passwords_are_throttled_until_the_clock_passes_retry_after(tmp_path):
    """30 wrong passwords for one user: the first five are 401, the rest 429 with Retry-After and a message on the
    form (problem JSON for a client asking for JSON), and no password is checked while throttled, so the right one
    is refused too; once the reading room's clock has passed Retry-After, the right password logs in."""
    clock = Clock()
    backend = await Backend().start(tmp_path, clock=clock)
    try:
        form = await _thread(LoginForm, backend.base)
        answers = await _thread(lambda: [form.post(f"guess-{i}") for i in range(30)])
        assert [r.status_code for r in answers] == [401] * 5 + [429] * 25
        throttled = answers[-1]
        wait = int(throttled.headers["Retry-After"])
        assert 1 <= wait <= 60
        assert "Too many failed logins" in throttled.text and throttled.headers["Content-Type"].startswith("text/html")
        right_too_soon = await _thread(form.post, "s3cret")
        assert right_too_soon.status_code == 429 and "medd_session" not in form.session.cookies
        as_json = await _thread(form.post, "s3cret", Accept="application/json")
        assert as_json.status_code == 429 and as_json.headers["Content-Type"] == "application/problem+json"
        assert as_json.json()["status"] == 429 and as_json.json()["type"] == "urn:medd:problem:login-throttled"
        assert as_json.headers["Retry-After"] == str(wait)

        clock.advance(wait - 0.5)
        assert (await _thread(form.post, "s3cret")).status_code == 429
        clock.advance(1)
        ok = await _thread(form.post, "s3cret")
        assert ok.status_code == 303 and "medd_session" in form.session.cookies
        # A successful login starts the user's count again: five more wrong passwords before a 429.
        again = await _thread(lambda: [LoginForm(backend.base).post("nope").status_code for _ in range(6)])
        assert again == [401] * 5 + [429]
    finally:
        await backend.stop()


def _without(name: str, sop_uid: str, **changes) -> bytes:
    """One of pydicom's test files as a new instance of study 1.2.826.0.1.1, with ``changes`` (None deletes)."""
    ds = pydicom.dcmread(BytesIO(study_object(name, "1.2.826.0.1.1", "1.2.826.0.1.1.9", ("DOE^JANE", "P001"),
                                              "20240102", "Centre A", 9)))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    out = BytesIO()
    ds.save_as(out)
    return out.getvalue()


@pytest_twisted.ensureDeferred
async def test_overlay_on_an_image_without_patient_birth_date_or_sex_is_saved(room_site):
    """An image that leaves out Type 2 patient and study attributes (PatientBirthDate, PatientSex, AccessionNumber …)
    takes an overlay (read back, queued for central) with those attributes empty in the GSPS; one whose header
    holds a value a presentation state cannot copy is refused as such (CannotAnnotate)."""
    room, ingest = room_site.room, room_site.ingest
    bare = (await ingest.receive_dicom(_without("CT_small.dcm", "1.2.826.0.1.1.9.1", PatientBirthDate=None,
                                                PatientSex=None, AccessionNumber=None, StudyID=None),
                                       transport="pull", origin=CENTRAL_ORIGIN)).uid
    odd = (await ingest.receive_dicom(_without("CT_small.dcm", "1.2.826.0.1.1.9.2", PatientSex="Q"),
                                      transport="pull", origin=CENTRAL_ORIGIN)).uid

    line = check_annotations([{"type": "line", "points": [[1, 1], [20, 20]], "text": "here"}])
    saved = await room.save_overlay(bare, "alice", line)
    (overlay,) = await room.overlays(bare)
    assert overlay.uid == saved and overlay.annotations[0].type == "line"
    gsps = pydicom.dcmread(BytesIO(await room.instance_bytes(overlay.uid)))
    assert "PatientBirthDate" in gsps and not gsps.PatientBirthDate and gsps.PatientID == "P001"
    assert [p.attachment.split(";")[0] for p in await room_site.queued()] == ["overlay"]
    with pytest.raises(CannotAnnotate, match="PatientSex"):
        await room.save_overlay(odd, "alice", line)
    assert await room.overlays(odd) == []


@pytest_twisted.ensureDeferred
async def test_state_changing_posts_need_the_csrf_token(room_site):
    """A report POST without the session's CSRF token, or from another origin, changes nothing; with it, the
    signed report is stored in the inbox and queued for central."""
    base, room = room_site.base, room_site.room

    def refused():
        s = _login(base)
        token = csrf_token(s.cookies["medd_session"])
        report = f"{base}/studies/1.2.826.0.1.1/report"
        assert s.post(report, data={"text": "no token"}, allow_redirects=False).status_code == 403
        assert s.post(report, data={"text": "t", "csrf": "x" * 64}, allow_redirects=False).status_code == 403
        r = s.post(report, data={"text": "t", "csrf": token}, headers={"Origin": "http://evil.example"},
                   allow_redirects=False)
        assert r.status_code == 403 and "another site" in r.text
        return s, token

    s, token = await _thread(refused)
    assert await room_site.queued() == [] and await room.reports("1.2.826.0.1.1") == []

    def accepted():
        report = f"{base}/studies/1.2.826.0.1.1/report"
        r = s.post(report, data={"text": "No acute findings.", "csrf": token, "kind": "final"}, allow_redirects=False)
        assert r.status_code == 303 and "signed=final" in r.headers["Location"]
        r = s.post(report, data={"text": "  ", "csrf": token}, allow_redirects=False)
        assert r.status_code == 400 and "empty" in r.text

    await _thread(accepted)
    (report,) = await room.reports("1.2.826.0.1.1")
    assert (report.author, report.text, report.verified) == ("alice", "No acute findings.", True)
    assert (report.kind, report.signed_by, report.vouched, report.node) == ("final", "alice", "viewer", VIEWER_NAME)
    assert [p.attachment.split(";")[0] for p in await room_site.queued()] == ["report"]


@pytest_twisted.ensureDeferred
async def test_worklist_filters_and_study_page(room_site):
    """The worklist shows every column, newest study first, and filters by patient, modality, date and read
    status in the database, and links each study to OHIF and its report; a study opens on the reading screen
    (banner, OHIF framed, report panel); the node's thumbnails open nothing."""
    base = room_site.base

    def check():
        s = _login(base)
        page = s.get(base + "/worklist").text
        assert "DOE, JANE" in page and "ROE, RICHARD" in page and "2024-01-05" in page
        assert page.index("DOE, JANE") < page.index("ROE, RICHARD")
        assert "Centre A" in page and "unread" in page
        assert 'href="/ohif/viewer?StudyInstanceUIDs=1.2.826.0.1.1" class="open-images button"' in page
        assert re.search(r'data-study-uid="1.2.826.0.1.2".*?<td class="images num">2 / 2 ', page, re.S)
        assert "ROE" not in s.get(base + "/worklist", params={"patient": "doe"}).text
        assert "ROE" not in s.get(base + "/worklist", params={"patient": "p00?1"}).text
        assert "DOE" not in s.get(base + "/worklist", params={"modality": "mr"}).text
        assert re.findall(r'<option value="([A-Z]+)">', page) == ["CT", "MR", "US"]
        dated = s.get(base + "/worklist", params={"date_from": "2024-01-01", "date_to": "2024-12-31"}).text
        assert "DOE" in dated and "ROE, RICHARD" not in dated
        assert "No studies match" in s.get(base + "/worklist", params={"patient": "nobody"}).text
        assert "No studies match" in s.get(base + "/worklist", params={"status": "read"}).text
        bad = s.get(base + "/worklist", params={"date_from": "yesterday"})
        assert bad.status_code == 400 and "YYYY-MM-DD" in bad.text
        assert s.get(base + "/worklist", params={"offset": "-1"}).status_code == 400
        study = s.get(base + "/studies/1.2.826.0.1.2")
        assert study.status_code == 200 and "ROE, RICHARD" in study.text and 'id="patient-banner"' in study.text
        assert '<iframe src="/ohif/viewer?StudyInstanceUIDs=1.2.826.0.1.2"' in study.text
        assert "frame-src 'self'" in study.headers["Content-Security-Policy"]
        # The node's thumbnail (which OHIF's series list shows) is a small JPEG and opens nothing.
        thumb = "/dicomweb/studies/1.2.826.0.1.2/series/1.2.826.0.1.2.1/thumbnail?viewport=160,160"
        image = _png(s.get(base + thumb).content)
        assert image.format == "JPEG" and max(image.size) <= 160
        missing = s.get(base + "/studies/1.2.3.4")
        assert missing.status_code == 404 and "no study 1.2.3.4" in missing.text
        assert s.get(base + "/studies/not-a-uid").status_code == 404

    await _thread(check)


STATIC_MISSES = ["/static/%00", "/static/a%00b.js", "/static/%00/x", "/static/..%2F..%2Fetc%2Fpasswd", "/static/%2e%2e",
                 "/static/no-such.js", "/static/%ff%fe", "/static/", "/static/reading-room.css/x"]


@pytest_twisted.ensureDeferred
async def test_static_file_names_that_cannot_be_files_are_404_problem_json(room_site):
    """A static name with a NUL byte, a traversal, bytes that are not UTF-8 or no such file is 404 problem JSON,
    never a 500 with a traceback; the real files are still served."""
    base = room_site.base

    def check():
        answers = {path: requests.get(base + path, allow_redirects=False) for path in STATIC_MISSES}
        assert requests.get(base + "/static/reading-room.css").status_code == 200
        return answers

    for path, r in (await _thread(check)).items():
        assert r.status_code == 404, (path, r.status_code, r.text[:200])
        assert r.headers["Content-Type"] == "application/problem+json", path
        assert r.json()["status"] == 404 and "Traceback" not in r.text, path


@pytest_twisted.ensureDeferred
async def test_worklist_offset_out_of_range_is_400(room_site):
    """A worklist offset past what SQL can hold, or digits int() does not read, is a 400 page, not a 500."""
    base = room_site.base

    def check():
        s = _login(base)
        return [s.get(base + "/worklist", params={"offset": value}).status_code
                for value in ("9223372036854775808", "2147483648", "\u00b2", "9" * 5000, "1e3")]

    assert await _thread(check) == [400] * 5


@pytest_twisted.ensureDeferred
async def test_static_files_have_their_media_types(room_site):
    """The reading room's stylesheet is text/css; the static folder lists nothing."""
    base = room_site.base

    def check():
        css = requests.get(base + "/static/reading-room.css")
        assert css.headers["Content-Type"].startswith("text/css")
        assert requests.get(base + "/static/").status_code == 404

    await _thread(check)


# --- in the browser ----------------------------------------------------------------------------------


def _browser_or_skip():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent: apt-get install chromium (make test does it when run as root)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright is not installed: pip install -e '.[test]'")


def _drive(base: str, scenario, *, viewport=(1280, 860), fails=lambda error: "favicon" not in error):
    """Run ``scenario(page)`` in headless Chromium (in this worker thread: the reactor keeps serving); a page
    error or console error for which ``fails`` is true fails the test."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]}, base_url=base)
            page = context.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            result = scenario(page)
            assert not [e for e in errors if fails(e)], errors
            return result
        finally:
            browser.close()


def _browser_login(page, user: str, password: str):
    page.goto("/")
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url("**/worklist")
