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

import copy
import os
import re
from io import BytesIO

import numpy as np
import pydicom
import pytest
import pytest_twisted
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from twisted.internet.threads import deferToThread

from medd.viewer.users import add_user
from medd.viewer.web.ohif import default_dist
from tests.conftest import listener_port
from tests.test_reading_room import _browser_login, _browser_or_skip, CHROMIUM, CHROMIUM_ARGS

SLICES = 50


def ct_stack(slices: int = SLICES, recipient: str | None = None) -> list[pydicom.Dataset]:
    """A CT series of ``slices`` axial slices made from pydicom's CT_small.dcm: new study, series and
    instance UIDs, consecutive slice positions 5 mm apart, and a patient the banner can show."""
    study, series = generate_uid(), generate_uid()
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    out = []
    for n in range(1, slices + 1):
        ds = copy.deepcopy(base)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = n
        z = f"{-75.7 + 5.0 * (n - 1):.2f}"
        ds.ImagePositionPatient = ["-158.135803", "-179.035797", z]
        ds.SliceLocation = z
        ds.SeriesDescription = "AXIAL STACK"
        ds.PatientName, ds.PatientID = "STACK^TESSA", "P-STACK-1"
        ds.PatientBirthDate, ds.PatientSex = "19610412", "F"
        ds.StudyDate, ds.AccessionNumber = "20240305", "ACC-4711"
        if recipient:
            ds.NamesOfIntendedRecipientsOfResults = recipient
        # A pattern that differs from slice to slice, so that scrolling shows another image.
        pixels = ds.pixel_array.copy()
        pixels[(n * 2) % 120:(n * 2) % 120 + 8, :] = pixels.max()
        ds.PixelData = pixels.tobytes()
        out.append(ds)
    return out


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
        if shots:
            page.screenshot(path=os.path.join(shots, "worklist.png"))
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
