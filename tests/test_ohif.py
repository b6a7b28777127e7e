"""The reading room's image viewer: OHIF Viewer 3 served by the viewer node
over the viewer's own DICOMweb, and that DICOMweb's frames, metadata and
thumbnails as OHIF asks for them.

The browser test drives headless Debian Chromium (Playwright, never
``playwright install``) against a real central and a real viewer on
loopback; it needs OHIF installed by ``make ohif`` and skips with the reason
otherwise. ``MEDD_SCREENSHOTS=DIR`` saves the worklist and the stack view
into DIR.
"""
from __future__ import annotations

import email
import os
import re
from io import BytesIO

import numpy as np
import pydicom
import pytest
import pytest_twisted
from PIL import Image
import requests
from pydicom.encaps import get_frame
from pydicom.uid import ExplicitVRLittleEndian, RLELossless
from twisted.internet.threads import deferToThread

from medd.demo import ct_stack as demo_stack
from medd.objects import GSPS_SOP_CLASS
from medd.viewer.users import add_user
from medd.viewer.web.ohif import default_dist
from tests.conftest import listener_port
from tests import test_reading_room
from tests.test_reading_room import CHROMIUM, CHROMIUM_ARGS, _browser_login, _browser_or_skip, _login

SLICES = 50
room_site = test_reading_room.room_site  # the fixture: a real reading room with three studies, served on loopback


def ct_stack(recipient: str) -> list[pydicom.Dataset]:
    """The demo's CT stack (:func:`medd.demo.ct_stack`) of :data:`SLICES` slices, for ``recipient``."""
    stack = demo_stack(SLICES)
    for ds in stack:
        ds.NamesOfIntendedRecipientsOfResults = recipient
    return stack


def _ohif_or_skip():
    if not (default_dist() / "index.html").is_file():
        pytest.skip(f"OHIF is not installed at {default_dist()}: run `make ohif` (make test does)")


def _viewport_pixels(page) -> np.ndarray:
    shot = page.locator(".cornerstone-canvas").first.screenshot()
    return np.asarray(Image.open(BytesIO(shot)).convert("L"), dtype=np.int16)


@pytest_twisted.ensureDeferred
async def test_a_ct_stack_in_ohif_end_to_end(make_central):
    """A radiologist logs in, opens a 50-slice CT from the worklist in OHIF, scrolls through the whole stack
    with the mouse wheel (the slice indicator reaches 50/50), changes the window by dragging (the displayed
    pixels change) and sees the patient banner; every slice's pixel data was fetched by the viewer's DICOMweb
    for dr-lee, so central shows each image opened by dr-lee, and the viewer recorded each once."""
    _browser_or_skip()
    _ohif_or_skip()
    from tests.test_routing import _cstore
    from tests.test_viewer import VIEWER, _central_and_viewer, _history, _is, _local

    central, viewer, admin = await _central_and_viewer(make_central)
    await add_user(viewer.reading_room.accounts, "dr-lee", "correct horse")
    stack = ct_stack(recipient=VIEWER)
    assert await deferToThread(_cstore, listener_port(central, "dicom"), stack) == [0] * SLICES
    await central.routing.router.kick()
    pulled = await viewer.viewer.requestor.kick()
    assert pulled.error is None, pulled
    for ds in stack:
        assert await _local(viewer, ds.SOPInstanceUID)
    study_uid = stack[0].StudyInstanceUID
    base = f"http://127.0.0.1:{listener_port(viewer, 'http')}"
    shots = os.environ.get("MEDD_SCREENSHOTS")

    def scenario(page):
        _browser_login(page, "dr-lee", "correct horse")
        page.locator(f'tr[data-study-uid="{study_uid}"] a.open-images').click()
        page.wait_for_url("**/ohif/viewer?StudyInstanceUIDs=*")
        page.wait_for_selector(".cornerstone-canvas", timeout=60_000)
        _dismiss_notices(page)
        indicator = page.get_by_text(re.compile(rf"\(\d+/{SLICES}\)"))
        indicator.wait_for()
        assert f"(1/{SLICES})" in indicator.text_content()
        banner = " | ".join(page.locator(".viewport-overlay").all_inner_texts())
        viewport = page.locator(".cornerstone-canvas").first
        box = viewport.bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        first = _viewport_pixels(page)
        for n in range(2, SLICES + 1):
            page.mouse.wheel(0, 100)
            page.get_by_text(f"({n}/{SLICES})").wait_for()
        last = _viewport_pixels(page)
        window_before = _window_text(page)
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.8, box["y"] + box["height"] * 0.8, steps=10)
        page.mouse.up()
        page.wait_for_function("before => !document.body.innerText.includes(before)", arg=window_before)
        windowed = _viewport_pixels(page)
        if shots:
            page.screenshot(path=os.path.join(shots, "ohif-stack.png"))
        return banner, first, last, windowed, window_before, _window_text(page)

    banner, first, last, windowed, window_before, window_after = await deferToThread(_drive_ohif, base, scenario)
    for shown in ("STACK, TESSA", "P-STACK-1", "12-Apr-1961", "Sex: F", "05-Mar-2024", "ACC-4711"):
        assert shown in banner, (shown, banner)
    # Slice 50 is another image than slice 1 (its bright band is elsewhere); dragging changed the window.
    assert np.abs(first - last).mean() > 2
    assert window_before != window_after
    assert np.abs(last - windowed).mean() > 10
    # Every slice was shown, so every slice's frame was fetched by dr-lee's session: each is opened, once.
    uids = [ds.SOPInstanceUID for ds in stack]
    detail = await viewer.reading_room.study(study_uid, "dr-lee")
    assert all(i.opened for s in detail.series for i in s.instances)
    queued = [p.attachment for p in await viewer.viewer.outgoing.packages.packages() if p.attachment.startswith("status")]
    assert sorted(queued) == sorted(f"status; event=opened; uid={uid}" for uid in uids)
    await viewer.viewer.outgoing.kick()
    assert await viewer.viewer.outgoing.packages.count_waiting() == 0
    await central.routing.router.kick()
    for uid in uids:
        assert await _is(central, uid, "opened"), uid
    (delivery,) = (await _history(central, admin, uids[-1]))["deliveries"]
    assert delivery["state"] == "opened" and delivery["opened_by"] == "dr-lee"


def _dismiss_notices(page):
    """OHIF's first-visit tour and its investigational-use notice, which cover the viewport."""
    page.get_by_text("Skip all").click()
    page.get_by_text("Confirm and hide").click()


def _window_text(page) -> str:
    """The W/L the viewport's overlay shows (e.g. "W: 2057 L: 1162")."""
    text = page.locator("body").inner_text()
    match = re.search(r"W:\s*-?\d+\S*\s*L:\s*-?\d+\S*", text)
    assert match, text
    return match.group(0)


def _drive_ohif(base: str, scenario):
    """Run ``scenario(page)`` in headless Chromium; every page error, console error and CSP violation fails."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 900}, base_url=base)
            page = context.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            result = scenario(page)
            # A Content-Security-Policy violation is a console error too ("Refused to load ...").
            assert errors == []
            return result
        finally:
            browser.close()


# --- the viewer's DICOMweb as OHIF uses it, over a real reading room on loopback ----------------------

ANY_SYNTAX = "multipart/related; type=application/octet-stream; transfer-syntax=*"


def _parts(response) -> list[tuple[str, bytes]]:
    """The (Content-Type, body) of each part of a multipart/related response."""
    message = email.message_from_bytes(
        b"Content-Type: " + response.headers["Content-Type"].encode() + b"\r\n\r\n" + response.content)
    assert message.is_multipart()
    return [(part["Content-Type"], part.get_payload(decode=True)) for part in message.get_payload()]


def _frames_url(base: str, ds) -> str:
    return (f"{base}/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}/frames")


@pytest_twisted.ensureDeferred
async def test_frames_in_the_stored_syntax_or_decoded_and_each_image_opened_once_per_user(room_site):
    """WADO-RS frames: with transfer-syntax=* each frame comes in its stored syntax (native bytes, an RLE
    fragment), with octet-stream alone it is decoded to Explicit VR Little Endian (pydicom's own decoding); a
    frame list gives one part per frame; no such frame is 404, a bad list 400, a type medd cannot make 406.
    Metadata and thumbnails open nothing; frames open their image once per user, whatever the number of fetches."""
    base, room = room_site.base, room_site.room
    stored = {name: pydicom.dcmread(BytesIO(await room.instance_bytes(uid))) for name, uid in room_site.by_name.items()}
    ct, rle, ybr = stored["CT_small.dcm"], stored["MR_small_RLE.dcm"], stored["examples_ybr_color.dcm"]

    def browse():
        s = _login(base)
        series = f"{base}/dicomweb/studies/{rle.StudyInstanceUID}/series/{rle.SeriesInstanceUID}"
        metadata = s.get(series + "/metadata")
        assert metadata.status_code == 200 and metadata.headers["Content-Type"] == "application/dicom+json"
        (document,) = metadata.json()
        assert document["00020010"]["Value"] == [RLELossless] and "7FE00010" not in document
        thumbnail = s.get(series + "/thumbnail", params={"viewport": "64,64"}, headers={"Accept": "image/jpeg"})
        assert thumbnail.headers["Content-Type"] == "image/jpeg" and max(Image.open(BytesIO(thumbnail.content)).size) == 64
        return s

    s = await deferToThread(browse)
    assert await room_site.queued() == []

    def fetch():
        answers = {}
        native = s.get(_frames_url(base, ct) + "/1", headers={"Accept": ANY_SYNTAX})
        assert native.status_code == 200 and native.headers["Content-Type"].startswith("multipart/related")
        ((kind, data),) = _parts(native)
        assert kind == f"application/octet-stream; transfer-syntax={ExplicitVRLittleEndian}"
        assert data == ct.PixelData
        for _ in range(3):
            ((kind, data),) = _parts(s.get(_frames_url(base, rle) + "/1", headers={"Accept": ANY_SYNTAX}))
        assert kind == f"application/octet-stream; transfer-syntax={RLELossless}"
        assert data == get_frame(rle.PixelData, 0, number_of_frames=1)
        ((kind, data),) = _parts(s.get(_frames_url(base, rle) + "/1",
                                       headers={"Accept": 'multipart/related; type="application/octet-stream"'}))
        assert kind == f"application/octet-stream; transfer-syntax={ExplicitVRLittleEndian}"
        assert (np.frombuffer(data, dtype=rle.pixel_array.dtype.newbyteorder("<")).reshape(64, 64)
                == rle.pixel_array).all()
        parts = _parts(s.get(_frames_url(base, ybr) + "/1,30", headers={"Accept": ANY_SYNTAX}))
        assert [kind for kind, _ in parts] == [f"application/octet-stream; transfer-syntax={ybr.file_meta.TransferSyntaxUID}"] * 2
        assert parts[0][1] == get_frame(ybr.PixelData, 0, number_of_frames=30)
        assert parts[1][1] == get_frame(ybr.PixelData, 29, number_of_frames=30)
        answers["past the end"] = s.get(_frames_url(base, ybr) + "/31", headers={"Accept": ANY_SYNTAX})
        answers["frame 0"] = s.get(_frames_url(base, ybr) + "/0", headers={"Accept": ANY_SYNTAX})
        answers["not a list"] = s.get(_frames_url(base, ybr) + "/1;2", headers={"Accept": ANY_SYNTAX})
        answers["png"] = s.get(_frames_url(base, rle) + "/1", headers={"Accept": "multipart/related; type=image/png"})
        bob = _login(base, "bob", "hunter22")
        answers["bob"] = bob.get(_frames_url(base, ct) + "/1", headers={"Accept": ANY_SYNTAX})
        return answers

    await add_user(room.accounts, "bob", "hunter22")
    answers = await deferToThread(fetch)
    assert [answers[k].status_code for k in ("past the end", "frame 0", "not a list", "png", "bob")] == [
        404, 400, 400, 406, 200]
    assert "the image has 30 frame(s)" in answers["past the end"].json()["detail"]
    queued = [p.attachment for p in await room_site.queued()]
    uids = [room_site.by_name[n] for n in ("CT_small.dcm", "MR_small_RLE.dcm", "examples_ybr_color.dcm")]
    assert sorted(queued) == sorted([f"status; event=opened; uid={uid}" for uid in uids]
                                    + [f"status; event=opened; uid={uids[0]}"])
    assert (await room.study("1.2.826.0.1.1", "bob")).series[0].instances[0].opened
    assert not (await room.study("1.2.826.0.1.2", "bob")).series[0].instances[0].opened


@pytest_twisted.ensureDeferred
async def test_ohif_is_served_behind_the_login_with_its_policy_and_configuration(room_site):
    """/ohif/... is OHIF's page for a logged-in user, with a Content-Security-Policy that allows only this site,
    its own inline scripts (by hash) and WebAssembly, and without the service worker; app-config.js points the
    data source at this node's /dicomweb; the bundle's assets come with the media types their loaders check.
    A STOW-RS from the session but not from the reading room's own pages (no Origin, no Sec-Fetch-Site) is
    refused (tests/test_measurements.py has the rest)."""
    _ohif_or_skip()
    base = room_site.base

    def check():
        s = _login(base)
        page = s.get(base + "/ohif/viewer", params={"StudyInstanceUIDs": "1.2.826.0.1.1"})
        assert page.status_code == 200 and "app.bundle" in page.text and "init-service-worker" not in page.text
        policy = page.headers["Content-Security-Policy"]
        assert "default-src 'none'" in policy and "'wasm-unsafe-eval'" in policy and "'unsafe-eval'" not in policy
        assert "'sha256-" in policy and "frame-ancestors 'self'" in policy and "connect-src 'self' data: blob:" in policy
        assert page.headers["X-Frame-Options"] == "SAMEORIGIN"  # framed by the reading screen only
        config = s.get(base + "/app-config.js")
        assert config.headers["Content-Type"].startswith("text/javascript")
        assert "wadoRoot: window.location.origin + '/dicomweb'" in config.text
        wasm = next(p.name for p in default_dist().iterdir() if p.suffix == ".wasm")
        assert s.get(f"{base}/{wasm}").headers["Content-Type"] == "application/wasm"
        assert requests.get(base + "/sw.js").status_code == 404
        stow = s.post(base + "/dicomweb/studies", data=b"--x--",
                      headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=x'})
        assert stow.status_code == 403 and "reading room's own pages" in stow.json()["detail"]

    await deferToThread(check)


@pytest_twisted.ensureDeferred
async def test_a_length_saved_in_ohif_reaches_central_and_comes_back(make_central):
    """dr-lee draws a length on a CT in OHIF and saves it (OHIF's "Create SR"): OHIF stores its SR over the
    viewer's STOW-RS, the viewer sends central a GSPS on that image, so central's GET /api/objects/{uid}
    shows the overlay attached to the image (current, from this viewer) with the length's two points; the
    image is opened by dr-lee too. Reopening the study, the saved SR is listed and its measurement is back."""
    _browser_or_skip()
    _ohif_or_skip()
    from tests.test_routing import _with_recipient
    from tests.test_measurements import deliver
    from tests.test_viewer import VIEWER, _central_and_viewer, _history, _local

    central, viewer, admin = await _central_and_viewer(make_central)
    await add_user(viewer.reading_room.accounts, "dr-lee", "correct horse")
    ct = _with_recipient("CT_small.dcm", recipient=VIEWER)
    await deliver(central, viewer, ct)
    base = f"http://127.0.0.1:{listener_port(viewer, 'http')}"
    shots = os.environ.get("MEDD_SCREENSHOTS")

    def scenario(page):
        _browser_login(page, "dr-lee", "correct horse")
        page.goto(f"/ohif/viewer?StudyInstanceUIDs={ct.StudyInstanceUID}")
        page.wait_for_selector(".cornerstone-canvas", timeout=60_000)
        _dismiss_notices(page)
        page.locator('[data-cy="Length-btn"]').click()
        box = page.locator(".cornerstone-canvas").first.bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.4)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.55, steps=10)
        page.mouse.up()
        page.get_by_text("Track measurements for this series?").wait_for()
        page.get_by_role("button", name="Yes", exact=True).click()
        page.locator('[data-cy="trackedMeasurements-btn"]').click()
        page.get_by_role("button", name="Create SR").click()
        dialog = page.locator("[role=dialog]")
        dialog.locator("input").fill("Lengths")
        with page.expect_response(lambda r: r.request.method == "POST" and "/dicomweb/studies" in r.url) as stow:
            dialog.get_by_role("button", name="Save").click()
        saved = stow.value.status, stow.value.request.headers.get("content-type", "")
        # Reopened: the saved report is one of the study's series; shown, its length is back.
        page.goto(f"/ohif/viewer?StudyInstanceUIDs={ct.StudyInstanceUID}")
        page.wait_for_selector(".cornerstone-canvas", timeout=60_000)
        page.get_by_text("Lengths").first.dblclick()
        page.get_by_text(re.compile(r"\d+\.\d+ mm")).first.wait_for(timeout=30_000)
        shown = page.locator("body").inner_text()
        if shots:
            page.screenshot(path=os.path.join(shots, "ohif-measurement.png"))
        return saved, shown

    (status, content_type), shown = await deferToThread(_drive_ohif, base, scenario)
    assert status == 200 and content_type.startswith("multipart/related")
    # OHIF's SR is a measurement report: filed as an overlay of the image, not as a report of the study.
    assert await viewer.reading_room.inbox.reports_of(ct.StudyInstanceUID) == []
    measurements = [r for r in await viewer.reading_room.inbox.measurements_of(ct.StudyInstanceUID)]
    (report,) = [await _local(viewer, r.uid) for r in measurements]
    assert report.origin == "dr-lee" and report.transport == "http" and report.object_type == "overlay"
    length = re.search(r"(\d+\.\d+) mm", shown).group(1)
    await viewer.viewer.outgoing.kick()
    await central.routing.router.kick()
    history = await _history(central, admin, ct.SOPInstanceUID)
    # Central has both, attached to the image: the SR itself and the GSPS drawn from it; no report.
    assert history["reports"] == []
    (sr,) = [o for o in history["overlays"] if o["sop_class_uid"] != GSPS_SOP_CLASS]
    assert sr["uid"] == report.sop_instance_uid and sr["origin"] == VIEWER and sr["current"]
    (overlay,) = [o for o in history["overlays"] if o["sop_class_uid"] == GSPS_SOP_CLASS]
    assert overlay["origin"] == VIEWER and overlay["current"] and overlay["supersedes"] is None
    gsps = pydicom.dcmread(BytesIO(await central.ingest.read_blob((await _local(central, overlay["uid"])).digest)))
    (item,) = gsps.GraphicAnnotationSequence
    assert item.ReferencedImageSequence[0].ReferencedSOPInstanceUID == ct.SOPInstanceUID
    (line,) = item.GraphicObjectSequence
    assert line.GraphicType == "POLYLINE" and line.NumberOfGraphicPoints == 2
    # The GSPS labels the line with its length from the image's pixel spacing: the length OHIF showed.
    label = " ".join(t.UnformattedTextValue for t in item.TextObjectSequence)
    assert f"{float(length):.1f} mm" in label, (label, length)


def _shown_image(page, rows: int, columns: int) -> np.ndarray:
    """The part of the viewport's screenshot (RGB) where OHIF drew the image: it fits the image to the viewport,
    centred; the inner 80% of it, so that no edge or corner text counts."""
    shot = np.asarray(Image.open(BytesIO(page.locator(".cornerstone-canvas").first.screenshot())).convert("RGB"),
                      dtype=np.float64)
    height, width = shot.shape[:2]
    scale = min(width / columns, height / rows)
    h, w = rows * scale, columns * scale
    top, left = (height - h) / 2, (width - w) / 2
    return shot[int(top + 0.1 * h):int(top + 0.9 * h), int(left + 0.1 * w):int(left + 0.9 * w)]


def _expected(values: np.ndarray, shape) -> np.ndarray:
    """pydicom's decoded values (H×W or H×W×3), resized to ``shape`` and cut to their inner 80% as shown."""
    values = values.astype(np.float64)
    rows, columns = values.shape[:2]
    inner = values[int(0.1 * rows):int(0.9 * rows), int(0.1 * columns):int(0.9 * columns)]
    channels = inner if inner.ndim == 3 else inner[..., None]
    out = [np.asarray(Image.fromarray(channels[..., c].astype(np.float32), mode="F").resize((shape[1], shape[0])))
           for c in range(channels.shape[2])]
    return np.stack(out, axis=-1)


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest_twisted.ensureDeferred
async def test_palette_monochrome1_multiframe_and_jpeg2000_render_in_ohif(make_central):
    """pydicom's palette-colour ultrasound, a MONOCHROME1 image (CT_small marked MONOCHROME1), a multi-frame RLE
    RGB image and a JPEG 2000 image each open in OHIF and show pydicom's own decoding: the screenshot's pixels
    correlate with it (the palette image in colour, channel by channel; MONOCHROME1 inverted, so that it
    correlates negatively with the stored values)."""
    _browser_or_skip()
    _ohif_or_skip()
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_color_lut

    from tests.test_measurements import deliver
    from tests.test_viewer import VIEWER, _central_and_viewer

    central, viewer, _ = await _central_and_viewer(make_central)
    await add_user(viewer.reading_room.accounts, "dr-lee", "correct horse")
    cases = {}
    for name in ("examples_palette.dcm", "CT_small.dcm", "SC_rgb_rle_2frame.dcm", "JPEG2000.dcm"):
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.NamesOfIntendedRecipientsOfResults = VIEWER
        ds.StudyInstanceUID = f"1.2.826.0.1.3680043.8.498.90.{len(cases) + 1}"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.91.{len(cases) + 1}"
        if name == "CT_small.dcm":
            ds.PhotometricInterpretation = "MONOCHROME1"
        for keyword in ("WindowCenter", "WindowWidth"):  # OHIF then windows by the pixel range, as pydicom's is
            if keyword in ds:
                delattr(ds, keyword)
        await deliver(central, viewer, ds)
        pixels = ds.pixel_array
        if name == "examples_palette.dcm":
            pixels = apply_color_lut(pixels, ds)
        elif name == "SC_rgb_rle_2frame.dcm":
            pixels = pixels[0]
        cases[name] = (ds.StudyInstanceUID, int(ds.Rows), int(ds.Columns), pixels)
    base = f"http://127.0.0.1:{listener_port(viewer, 'http')}"

    def scenario(page):
        _browser_login(page, "dr-lee", "correct horse")
        shown = {}
        for n, (name, (study, rows, columns, _)) in enumerate(cases.items()):
            page.goto(f"/ohif/viewer?StudyInstanceUIDs={study}")
            page.wait_for_selector(".cornerstone-canvas", timeout=60_000)
            if n == 0:
                _dismiss_notices(page)
            page.locator("[data-cy='viewport-overlay-bottom-right']").first.wait_for()
            page.wait_for_timeout(1500)  # the frame drawn after it arrived
            shown[name] = _shown_image(page, rows, columns)
        return shown

    shown = await deferToThread(_drive_ohif, base, scenario)
    for name, (_, _, _, pixels) in cases.items():
        expected = _expected(pixels, shown[name].shape[:2])
        if expected.shape[2] == 3:
            for c in range(3):
                assert _correlation(shown[name][..., c], expected[..., c]) > 0.8, (name, c)
            # In colour, not grey: the red-blue difference follows pydicom's too.
            difference = _correlation(shown[name][..., 0] - shown[name][..., 2], expected[..., 0] - expected[..., 2])
            assert difference > 0.8, (name, difference)
        else:
            grey = shown[name].mean(axis=2)
            correlation = _correlation(grey, expected[..., 0])
            if name == "CT_small.dcm":
                assert correlation < -0.8, (name, correlation)  # MONOCHROME1: high values dark
            else:
                assert correlation > 0.8, (name, correlation)
