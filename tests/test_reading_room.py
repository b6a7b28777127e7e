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
from twisted.internet.defer import maybeDeferred
from twisted.internet.threads import deferToThread

from medd.transports.http import MeddSite
from medd.viewer import rendering
from medd.viewer.web import CSRF_HEADER, check_annotations, csrf_token, reading_room_resources, WebError
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
def test_render_every_kind_of_stored_image_to_png(name, size, mode, frames):
    """Compressed, multi-frame, RGB and MONOCHROME1 objects all render to a PNG of the image's size, every frame."""
    data = _testfile(name)
    facts = rendering.describe(data)
    assert facts.frames == frames
    assert (facts.columns, facts.rows) == size
    for frame in sorted({0, frames - 1}):
        image = _png(rendering.render_png(data, frame=frame))
        assert image.size == size and image.mode == mode


def test_render_window_level_changes_pixels_and_defaults_to_the_objects_window():
    """The default render uses WindowCenter/Width (or min/max); another window gives other pixels."""
    data = testdata("MR_small_RLE.dcm")  # WindowCenter 600, WindowWidth 1600
    default = np.asarray(_png(rendering.render_png(data)))
    own = np.asarray(_png(rendering.render_png(data, center=600, width=1600)))
    narrow = np.asarray(_png(rendering.render_png(data, center=600, width=200)))
    assert (default == own).all()
    assert not (narrow == default).all()
    # A narrower window around the same centre stretches contrast: more pixels saturate.
    assert ((narrow == 0) | (narrow == 255)).sum() > ((default == 0) | (default == 255)).sum()
    ct = testdata("CT_small.dcm")  # no window in the object: min/max of the rescaled pixels
    facts = rendering.describe(ct)
    pixels = np.asarray(_png(rendering.render_png(ct)))
    assert facts.window_width > 1 and pixels.min() == 0 and pixels.max() >= 254


def test_render_frames_differ_and_monochrome1_is_inverted():
    """Frame n of a multi-frame object is that frame; MONOCHROME1 renders dark where MONOCHROME2 would be bright."""
    data = _testfile("examples_ybr_color.dcm")
    first, last = (np.asarray(_png(rendering.render_png(data, frame=f))) for f in (0, 29))
    assert not (first == last).all()
    m1 = _testfile("6154")
    ds = pydicom.dcmread(BytesIO(m1))
    inverted = np.asarray(_png(rendering.render_png(m1)))
    ds.PhotometricInterpretation = "MONOCHROME2"
    out = BytesIO()
    ds.save_as(out)
    plain = np.asarray(_png(rendering.render_png(out.getvalue())))
    assert (inverted.astype(int) + plain.astype(int) == 255).all()


def test_render_refuses_what_it_cannot_do():
    """A frame past the end, a window narrower than 1 and an object without pixels are RenderErrors, not crashes."""
    with pytest.raises(rendering.RenderError, match="frame 3 does not exist"):
        rendering.render_png(_testfile("SC_rgb_rle_2frame.dcm"), frame=2)
    with pytest.raises(rendering.RenderError, match="window width"):
        rendering.render_png(testdata("CT_small.dcm"), center=10, width=0)
    ds = pydicom.dcmread(BytesIO(testdata("CT_small.dcm")))
    del ds.PixelData
    out = BytesIO()
    ds.save_as(out)
    with pytest.raises(rendering.RenderError, match="no pixel data"):
        rendering.describe(out.getvalue())


def test_frame_cache_serves_window_changes_without_the_bytes():
    """After one render, the decoded frame is cached: another window needs no stored bytes and no decode;
    the cache stays within its byte budget, oldest frame out first."""
    cache = rendering.FrameCache()
    data = testdata("JPEG2000.dcm")
    rendering.render_png(data, cache=cache, cache_key="1.2.3")
    again = _png(rendering.render_png(None, center=100, width=50, cache=cache, cache_key="1.2.3"))
    assert again.size == (256, 1024)
    small = rendering.FrameCache(max_bytes=100_000)  # one 128x128 float32 frame is 65,536 bytes
    ct = testdata("CT_small.dcm")
    rendering.render_png(ct, cache=small, cache_key="a")
    rendering.render_png(ct, cache=small, cache_key="b")
    assert ("b", 0) in small and ("a", 0) not in small


def test_annotations_are_checked_before_they_reach_the_backend():
    """Wrong types, wrong point counts, non-numbers and empty texts are refused with a message naming the annotation."""
    good = check_annotations({"annotations": [
        {"type": "arrow", "points": [[1, 2], [30.123, 40]]},
        {"type": "text", "points": [[5, 5]], "text": " hi ", "frame": 2},
    ]})
    assert good == [{"type": "arrow", "points": [[1.0, 2.0], [30.12, 40.0]]},
                    {"type": "text", "points": [[5.0, 5.0]], "text": "hi", "frame": 2}]
    for bad, message in [
        ({"annotations": [{"type": "polygon", "points": [[1, 1]]}]}, "type must be one of"),
        ({"annotations": [{"type": "line", "points": [[1, 1]]}]}, "a line has 2 point"),
        ({"annotations": [{"type": "line", "points": [[1, "x"], [2, 2]]}]}, "a point is"),
        ({"annotations": [{"type": "text", "points": [[1, 1]], "text": " "}]}, "needs its text"),
        ({"annotations": []}, "nothing to save"),
        ([], "send"),
    ]:
        with pytest.raises(WebError, match=message):
            check_annotations(bad)


# --- pages over an in-memory reading room -------------------------------------------------------------


STUDIES = {
    # study uid -> (patient name, patient id, date, centre, [(series uid, modality, [file names])])
    "1.2.826.0.1.1": ("DOE^JANE", "P001", "20240105", "ct1@centre-a.example",
                      [("1.2.826.0.1.1.1", "CT", ["CT_small.dcm"])]),
    "1.2.826.0.1.2": ("ROE^RICHARD", "P002", "20230611", "mr1@centre-b.example",
                      [("1.2.826.0.1.2.1", "MR", ["MR_small_RLE.dcm"]),
                       ("1.2.826.0.1.2.2", "OT", ["examples_ybr_color.dcm"])]),
}


class FakeReadingRoom:
    """The ReadingRoom contract over dicts, recording what the web layer asked of it."""

    def __init__(self):
        self.images: dict[str, tuple[str, bytes]] = {}
        self.users = {"alice": "s3cret"}
        self.sessions: dict[str, str] = {}
        self.opened_by: list[tuple[str, str]] = []
        self.saved_overlays: dict[str, list[dict]] = {}
        self.saved_reports: dict[str, list[dict]] = {}
        self.worklist_filters: list[dict] = []
        self.by_name: dict[str, str] = {}
        for study_uid, (_, _, _, _, series) in STUDIES.items():
            for _, _, names in series:
                for name in names:
                    data = _testfile(name)
                    uid = str(pydicom.dcmread(BytesIO(data), stop_before_pixels=True).SOPInstanceUID)
                    self.images[uid] = (study_uid, data)
                    self.by_name[name] = uid

    def uids_of(self, study_uid):
        return [uid for uid, (s, _) in self.images.items() if s == study_uid]

    async def worklist(self, filters):
        self.worklist_filters.append(filters)
        out = []
        for uid, (name, pid, when, centre, series) in STUDIES.items():
            out.append({"study_uid": uid, "patient_name": name, "patient_id": pid, "study_date": when,
                        "modalities": [m for _, m, _ in series], "centre": centre,
                        "images": sum(len(n) for _, _, n in series),
                        "unread": not any(u in self.uids_of(uid) for u, _ in self.opened_by),
                        "has_report": bool(self.saved_reports.get(uid))})
        return out

    async def study(self, study_uid, user=None):
        if study_uid not in STUDIES:
            raise KeyError(study_uid)
        name, pid, when, centre, series = STUDIES[study_uid]
        out = {"study_uid": study_uid, "patient_name": name, "patient_id": pid, "study_date": when, "centre": centre,
               "series": []}
        for series_uid, modality, names in series:
            instances = []
            for uid in self.uids_of(study_uid):
                ds = pydicom.dcmread(BytesIO(self.images[uid][1]), stop_before_pixels=True)
                if ds.Modality == modality or (modality == "OT" and ds.get("NumberOfFrames")):
                    instances.append({"uid": uid, "instance_number": ds.get("InstanceNumber", 1), "rows": ds.Rows,
                                      "columns": ds.Columns, "frames": int(ds.get("NumberOfFrames", 1) or 1),
                                      "transfer_syntax": str(ds.file_meta.TransferSyntaxUID)})
            out["series"].append({"series_uid": series_uid, "modality": modality, "instances": instances})
        return out

    async def instance_bytes(self, uid):
        return self.images[uid][1]

    async def header(self, uid):
        ds = pydicom.dcmread(BytesIO(self.images[uid][1]), stop_before_pixels=True)
        return [(str(e.tag), e.keyword, e.VR, str(e.value)[:80]) for e in ds if e.VR != "SQ"]

    async def opened(self, uid, user):
        self.opened_by.append((uid, user))

    async def save_overlay(self, image_uid, user, annotations):
        self.images[image_uid]  # KeyError for an unknown image, as the real one
        self.saved_overlays.setdefault(image_uid, []).extend(annotations)
        return f"2.25.{len(self.saved_overlays)}"

    async def overlays(self, image_uid):
        return [{"uid": "2.25.1", "annotations": self.saved_overlays[image_uid]}] if image_uid in self.saved_overlays else []

    async def save_report(self, study_uid, user, text):
        self.saved_reports.setdefault(study_uid, []).append({"author": user, "time": "2024-01-05T10:00:00", "text": text})
        return f"2.25.9{len(self.saved_reports[study_uid])}"

    async def reports(self, study_uid):
        return list(self.saved_reports.get(study_uid, []))

    async def check_password(self, name, password):
        return self.users.get(name) == password

    async def create_session(self, user):
        token = f"token-{len(self.sessions)}-{user}"
        self.sessions[token] = user
        return token

    async def user_for_session(self, token):
        return self.sessions.get(token)

    async def end_session(self, token):
        self.sessions.pop(token, None)


class FakeAPI:
    """The two things the reading room uses of a ReceiverAPI, recording the blocking calls."""

    max_object_size = 10 * 1024 * 1024

    def __init__(self):
        self.web_resources = {}
        self.blocking_calls = 0

    def run_blocking(self, fn, *args):
        self.blocking_calls += 1
        return deferToThread(fn, *args)


@pytest.fixture
def room_site():
    """A reading room over FakeReadingRoom on a loopback HTTP site: (base URL, fake room, fake api)."""
    room, api = FakeReadingRoom(), FakeAPI()
    api.web_resources.update(reading_room_resources(room, api))
    port = reactor.listenTCP(0, MeddSite(api), interface="127.0.0.1")
    yield f"http://127.0.0.1:{port.getHost().port}", room, api
    pytest_twisted.blockon(maybeDeferred(port.stopListening))


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
    """Without a session, pages redirect to the login form (keeping where to go next) and the JSON API answers 401."""
    base, room, _ = room_site
    uid = next(iter(room.images))

    def check():
        for path in ("/worklist", "/studies/1.2.826.0.1.1", f"/images/{uid}", f"/images/{uid}/render.png"):
            r = requests.get(base + path, allow_redirects=False)
            assert r.status_code == 303 and r.headers["Location"].startswith("/?next="), path
        r = requests.get(f"{base}/images/{uid}/overlays", allow_redirects=False)
        assert r.status_code == 401 and "log in" in r.json()["error"]
        r = requests.post(f"{base}/studies/1.2.826.0.1.1/report", data={"text": "x"}, allow_redirects=False)
        assert r.status_code == 401
        r = requests.get(base + "/worklist", cookies={"medd_session": "forged"}, allow_redirects=False)
        assert r.status_code == 303

    await _thread(check)
    assert room.opened_by == [] and room.worklist_filters == []


@pytest_twisted.ensureDeferred
async def test_login_form_cookie_rules_and_logout(room_site):
    """/ is a login form (username, password); a good login sets an HttpOnly SameSite=Strict session cookie;
    a wrong password or a form without its login cookie is refused; logout ends the session."""
    base, room, _ = room_site

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
        assert token not in room.sessions
        assert requests.get(base + "/worklist", cookies={"medd_session": token}, allow_redirects=False).status_code == 303

    await _thread(check)


def _login_next(base: str, next_path: str) -> str:
    s = requests.Session()
    nonce = re.search(r'name="csrf" value="([^"]+)"', s.get(base + "/").text).group(1)
    r = s.post(base + "/login", data={"username": "alice", "password": "s3cret", "csrf": nonce, "next": next_path},
               allow_redirects=False)
    return r.headers["Location"]


@pytest_twisted.ensureDeferred
async def test_state_changing_posts_need_the_csrf_token(room_site):
    """A report or overlay POST without the session's CSRF token, or from another origin, changes nothing."""
    base, room, _ = room_site
    uid = next(u for u, (s, _) in room.images.items() if s == "1.2.826.0.1.1")

    def check():
        s = _login(base)
        token = csrf_token(s.cookies["medd_session"])
        report = f"{base}/studies/1.2.826.0.1.1/report"
        assert s.post(report, data={"text": "no token"}, allow_redirects=False).status_code == 403
        assert s.post(report, data={"text": "t", "csrf": "x" * 64}, allow_redirects=False).status_code == 403
        r = s.post(report, data={"text": "t", "csrf": token}, headers={"Origin": "http://evil.example"},
                   allow_redirects=False)
        assert r.status_code == 403 and "another site" in r.text
        body = {"annotations": [{"type": "arrow", "points": [[1, 1], [20, 20]]}]}
        r = s.post(f"{base}/images/{uid}/overlays", json=body)
        assert r.status_code == 403 and "reload" in r.json()["error"]
        assert room.saved_reports == {} and room.saved_overlays == {}
        r = s.post(f"{base}/images/{uid}/overlays", json=body, headers={CSRF_HEADER: token})
        assert r.status_code == 201 and r.json()["uid"].startswith("2.25.")
        r = s.post(report, data={"text": "No acute findings.", "csrf": token, "action": "sign"}, allow_redirects=False)
        assert r.status_code == 303 and "saved=signed" in r.headers["Location"]
        r = s.post(report, data={"text": "  ", "csrf": token}, allow_redirects=False)
        assert r.status_code == 400 and "empty" in r.text

    await _thread(check)
    assert room.saved_overlays[uid] == [{"type": "arrow", "points": [[1.0, 1.0], [20.0, 20.0]]}]
    assert [r["text"] for r in room.saved_reports["1.2.826.0.1.1"]] == ["No acute findings."]


@pytest_twisted.ensureDeferred
async def test_worklist_filters_and_study_page(room_site):
    """The worklist shows every column and filters by patient, modality and date on the server;
    a study lists its series with thumbnails, and its reports."""
    base, room, _ = room_site

    def check():
        s = _login(base)
        page = s.get(base + "/worklist").text
        assert "DOE, JANE" in page and "ROE, RICHARD" in page and "2024-01-05" in page
        assert "ct1@centre-a.example" in page and "unread" in page
        assert "ROE" not in s.get(base + "/worklist", params={"patient": "doe"}).text
        assert "DOE" not in s.get(base + "/worklist", params={"modality": "MR"}).text
        dated = s.get(base + "/worklist", params={"date_from": "2024-01-01", "date_to": "2024-12-31"}).text
        assert "DOE" in dated and "ROE, RICHARD" not in dated
        assert "No studies match" in s.get(base + "/worklist", params={"patient": "nobody"}).text
        bad = s.get(base + "/worklist", params={"date_from": "yesterday"})
        assert bad.status_code == 400 and "YYYY-MM-DD" in bad.text
        study = s.get(base + "/studies/1.2.826.0.1.2")
        assert study.status_code == 200 and "examples" not in study.text
        assert study.text.count('class="thumbnail"') == 2 and "30 frames" in study.text
        thumb = re.search(r'src="(/images/[0-9.]+/render.png\?size=160)"', study.text).group(1)
        image = _png(s.get(base + thumb).content)
        assert max(image.size) <= 160
        missing = s.get(base + "/studies/1.2.3.4")
        assert missing.status_code == 404 and "no study 1.2.3.4" in missing.text
        assert s.get(base + "/studies/not-a-uid").status_code == 404

    await _thread(check)
    assert {"patient": "doe", "user": "alice"} in room.worklist_filters
    assert {"study_date": "20240101-20241231", "user": "alice"} in room.worklist_filters


@pytest_twisted.ensureDeferred
async def test_image_page_render_endpoint_and_static_files(room_site):
    """The image page records the opening, carries size, spacing and saved overlays, and the header;
    render.png honours frame and window and runs off the reactor; bad parameters are 400; static files have
    their media types."""
    base, room, api = room_site
    ct, multi = room.by_name["CT_small.dcm"], room.by_name["examples_ybr_color.dcm"]
    room.saved_overlays[ct] = [{"type": "line", "points": [[0, 0], [10, 0]]}]

    def check():
        s = _login(base)
        page = s.get(f"{base}/images/{ct}").text
        assert 'data-rows="128"' in page and 'data-spacing="0.661468,0.661468"' in page
        assert "&quot;line&quot;" in page and "PatientName" in page and "(0010,0010)" in page
        calls = api.blocking_calls
        default = s.get(f"{base}/images/{ct}/render.png")
        assert default.headers["Content-Type"] == "image/png" and default.headers["Cache-Control"] == "no-store"
        windowed = s.get(f"{base}/images/{ct}/render.png", params={"wc": 40, "ww": 400})
        assert _png(windowed.content).size == (128, 128) and windowed.content != default.content
        assert api.blocking_calls >= calls + 2
        f1 = s.get(f"{base}/images/{multi}/render.png", params={"frame": 1}).content
        f30 = s.get(f"{base}/images/{multi}/render.png", params={"frame": 30}).content
        assert f1 != f30
        assert s.get(f"{base}/images/{multi}/render.png", params={"frame": 31}).status_code == 422
        assert s.get(f"{base}/images/{ct}/render.png", params={"wc": 40}).status_code == 400
        assert s.get(f"{base}/images/{ct}/render.png", params={"frame": "x"}).status_code == 400
        assert s.get(f"{base}/images/9.9.9").status_code == 404
        assert s.get(f"{base}/images/{ct}/overlays").json() == {"annotations": room.saved_overlays[ct]}
        js = s.get(base + "/static/reading-room.js")
        css = requests.get(base + "/static/reading-room.css")
        assert js.headers["Content-Type"].startswith("text/javascript")
        assert css.headers["Content-Type"].startswith("text/css")
        assert requests.get(base + "/static/").status_code == 404

    await _thread(check)
    assert (ct, "alice") in room.opened_by


# --- in the browser ----------------------------------------------------------------------------------


def _browser_or_skip():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent: apt-get install chromium (make test does it when run as root)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright is not installed: pip install -e '.[test]'")


def _drive(base: str, scenario):
    """Run ``scenario(page)`` in headless Chromium (in this worker thread: the reactor keeps serving)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 860}, base_url=base)
            page = context.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            result = scenario(page)
            assert not [e for e in errors if "favicon" not in e], errors
            return result
        finally:
            browser.close()


def _browser_login(page, user: str, password: str):
    page.goto("/")
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url("**/worklist")


def _drag(page, selector: str, start: tuple[float, float], end: tuple[float, float]):
    """Drag across the element at fractions of its box."""
    box = page.locator(selector).bounding_box()
    page.mouse.move(box["x"] + box["width"] * start[0], box["y"] + box["height"] * start[1])
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * end[0], box["y"] + box["height"] * end[1], steps=8)
    page.mouse.up()


@pytest_twisted.ensureDeferred
async def test_browser_draws_in_image_pixels_and_scrolls_frames(room_site):
    """In Chromium, whatever the zoom, a drawn arrow is saved in image pixel coordinates; a line shows mm;
    the wheel scrolls frames of a multi-frame image."""
    _browser_or_skip()
    base, room, _ = room_site
    ct, multi = room.by_name["CT_small.dcm"], room.by_name["examples_ybr_color.dcm"]

    def scenario(page):
        _browser_login(page, "alice", "s3cret")
        page.goto(f"/images/{ct}")
        page.wait_for_selector("#viewport[data-ready=true]")
        page.click("#zoom-in")
        page.click("#tool-line")
        _drag(page, "#image", (0.25, 0.5), (0.75, 0.5))
        label = page.locator(".annotation.line text").text_content()
        page.click("#tool-arrow")
        _drag(page, "#image", (0.1, 0.1), (0.5, 0.5))
        page.click("#save-overlay")
        page.wait_for_selector("#overlay-status[data-overlay-uid]")
        page.goto(f"/images/{multi}")
        page.wait_for_selector("#viewport[data-ready=true]")
        page.hover("#viewport")
        page.mouse.wheel(0, 120)
        page.wait_for_function("document.getElementById('frame-label').textContent.startsWith('2 /')")
        page.wait_for_function("document.getElementById('image').getAttribute('src').includes('frame=2')")
        return label

    label = await _thread(_drive, base, scenario)
    # 64 pixels across at 0.661468 mm per pixel.
    assert re.fullmatch(r"4[12]\.\d mm", label), label
    line, arrow = room.saved_overlays[ct]
    assert line["type"] == "line" and arrow["type"] == "arrow"
    (x0, y0), (x1, y1) = arrow["points"]
    assert abs(x0 - 12.8) < 2 and abs(y0 - 12.8) < 2 and abs(x1 - 64) < 2 and abs(y1 - 64) < 2


# --- end to end: a real central and a real viewer ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_reading_room_end_to_end_in_chromium(make_central):
    """A radiologist logs in, sees the worklist, opens an image, draws an arrow, saves it, writes and signs a
    report; central's GET /api/objects/{uid} then shows the image opened by that user, with the overlay and the
    report attached. With MEDD_SCREENSHOTS=DIR, the worklist and the image view are saved as PNGs there."""
    _browser_or_skip()
    from medd.viewer import users
    from tests.routing_helpers import eventually
    from tests.test_routing import _cstore, _with_recipient
    from tests.test_viewer import VIEWER, _central_and_viewer, _history, _is, _local
    from tests.conftest import listener_port

    central, viewer, admin = await _central_and_viewer(make_central)
    await viewer.database.run(lambda c: users.add_user(c, "dr-lee", "correct horse"))
    images = [_with_recipient(name, recipient=VIEWER) for name in ("CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm")]
    assert await deferToThread(_cstore, listener_port(central, "dicom"), images) == [0, 0, 0]
    for ds in images:
        await eventually(lambda uid=ds.SOPInstanceUID: _local(viewer, uid))
    ct = images[0]
    uid, study_uid = ct.SOPInstanceUID, ct.StudyInstanceUID
    await eventually(lambda: _is(central, uid, "delivered"))
    base = f"http://127.0.0.1:{listener_port(viewer, 'http')}"
    shots = os.environ.get("MEDD_SCREENSHOTS")

    def scenario(page):
        _browser_login(page, "dr-lee", "correct horse")
        row = page.locator(f'tr[data-study-uid="{study_uid}"]')
        assert "unread" in row.text_content() and "CT" in row.text_content()
        assert page.locator("#worklist tbody tr").count() == len({d.StudyInstanceUID for d in images})
        row.locator("a").first.click()
        page.wait_for_url(f"**/studies/{study_uid}")
        page.click(f'a.thumbnail[data-uid="{uid}"]')
        page.wait_for_url(f"**/images/{uid}")
        page.wait_for_selector("#viewport[data-ready=true]")
        page.wait_for_function("document.getElementById('image').complete")
        page.click("#tool-arrow")
        _drag(page, "#image", (0.2, 0.2), (0.45, 0.45))
        page.click("#save-overlay")
        page.wait_for_selector("#overlay-status[data-overlay-uid]")
        overlay_uid = page.get_attribute("#overlay-status", "data-overlay-uid")
        # Opened again, the saved arrow is drawn from the viewer's stored overlay.
        page.reload()
        page.wait_for_selector("#viewport[data-ready=true]")
        assert page.locator(".annotation.saved.arrow").count() == 1
        if shots:
            page.locator("#header").evaluate("d => d.open = true")
            page.wait_for_timeout(200)  # the image refits the smaller viewport
            page.click("#tool-line")
            _drag(page, "#image", (0.3, 0.75), (0.8, 0.75))
            page.fill("#annotation-text", "compare with prior")
            page.click("#tool-text")
            box = page.locator("#image").bounding_box()
            page.mouse.click(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.15)
            page.click("#tool-pan")
            page.screenshot(path=os.path.join(shots, "image-view.png"))
            page.evaluate("window.onbeforeunload = null")
            page.locator("#undo").click()
            page.locator("#undo").click()
        page.goto(f"/studies/{study_uid}")
        page.fill("#report-text", "CT head: no acute intracranial abnormality.")
        page.click("#report-sign")
        page.wait_for_selector("#report-saved")
        assert "dr-lee" in page.locator("#reports").text_content()
        assert "signed" in page.locator("#reports").text_content()
        page.goto("/worklist")
        row = page.locator(f'tr[data-study-uid="{study_uid}"]')
        assert "reported" in row.text_content() and "unread" not in row.text_content()
        if shots:
            page.screenshot(path=os.path.join(shots, "worklist.png"))
        return overlay_uid

    overlay_uid = await deferToThread(_drive, base, scenario)

    await eventually(lambda: _is(central, uid, "opened"))

    async def attached():
        history = await _history(central, admin, uid)
        return history if history["overlays"] and history["reports"] else None

    history = await eventually(attached)
    (delivery,) = history["deliveries"]
    assert delivery["state"] == "opened" and delivery["opened_by"] == "dr-lee"
    assert [o["uid"] for o in history["overlays"]] == [overlay_uid]
    (report,) = history["reports"]
    report_history = await _history(central, admin, report["uid"])
    assert report_history["object"]["study_instance_uid"] == study_uid
