"""Measurements saved in the reading room: an SR measurement report (TID 1500)
stored over the viewer's STOW-RS by a logged-in radiologist only, turned into
one GSPS per image (highdicom) and sent to central, where each new version
supersedes the image's previous overlay.

The SRs here are built with highdicom on pydicom's CT_small.dcm; the browser
test (tests/test_ohif.py) saves one from OHIF itself.
"""
from __future__ import annotations

import io
import json
import uuid

import highdicom as hd
import numpy as np
import pydicom
import pytest_twisted
import requests
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes
from twisted.internet.threads import deferToThread

from medd.objects import GSPS_SOP_CLASS as GSPS, SR_SOP_CLASS_PREFIX
from medd.viewer.measurements import read_measurement_report
from medd.viewer.overlays import build_presentation_state
from medd.viewer.users import add_user
from medd.viewer.web.session import csrf_token
from tests.conftest import listener_port
from tests.test_reading_room import _login
from tests.test_routing import _with_recipient

STOW_TYPE = 'multipart/related; type="application/dicom"; boundary={b}'


def measurement_report(drawings: list[tuple[pydicom.Dataset, str, list]], *, uid: str | None = None) -> bytes:
    """A TID 1500 Comprehensive 3D SR (highdicom) with one planar ROI group per drawing
    (image, SCOORD graphic type, points), each with a numeric measurement."""
    groups = []
    for n, (image, kind, points) in enumerate(drawings, 1):
        region = hd.sr.ImageRegion(graphic_type=getattr(hd.sr.GraphicTypeValues, kind),
                                   graphic_data=np.array(points, dtype=float),
                                   source_image=hd.sr.SourceImageForRegion.from_source_image(image))
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"ROI {n}"),
            referenced_region=region,
            measurements=[hd.sr.Measurement(name=codes.SCT.Area, value=12.5 * n, unit=codes.UCUM.SquareMillimeter)],
        ))
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_person_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Person,
                observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(name="Lee^Dr"))),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=groups,
    )
    images = list({d[0].SOPInstanceUID: d[0] for d in drawings}.values())
    sr = hd.sr.Comprehensive3DSR(evidence=images, content=content, series_instance_uid=hd.UID(), series_number=99,
                                 sop_instance_uid=uid or hd.UID(), instance_number=1, manufacturer="test")
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _part10(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


BOX = [[10.0, 10.0], [40.0, 10.0], [40.0, 30.0], [10.0, 30.0], [10.0, 10.0]]
ELLIPSE = [[20.0, 30.0], [50.0, 30.0], [35.0, 25.0], [35.0, 35.0]]


def test_a_measurement_report_becomes_a_presentation_state_per_image():
    """The SCOORDs of a TID 1500 report (a closed polyline, an ellipse, a point) on two images are read back
    as annotations of the right image with their measured value as the label, and highdicom builds a GSPS
    that references that image and carries each graphic with its type and coordinates."""
    ct = _with_recipient("CT_small.dcm")
    other = _with_recipient("CT_small.dcm", uid_suffix=".7")
    sr = measurement_report([(ct, "POLYLINE", BOX), (ct, "ELLIPSE", ELLIPSE), (other, "POINT", [[5.0, 6.0]])])
    drawn = read_measurement_report(sr)
    assert set(drawn.annotations) == {ct.SOPInstanceUID, other.SOPInstanceUID} and drawn.skipped == 0
    line, ellipse = drawn.annotations[ct.SOPInstanceUID]
    assert line.type == "line" and [list(p) for p in line.points] == BOX and "12.5 mm2" in line.text
    assert ellipse.type == "ellipse" and [list(p) for p in ellipse.points] == ELLIPSE and "25 mm2" in ellipse.text
    (point,) = drawn.annotations[other.SOPInstanceUID]
    assert point.type == "text" and point.points == ((5.0, 6.0),) and "37.5 mm2" in point.text

    gsps = pydicom.dcmread(io.BytesIO(build_presentation_state(
        _part10(ct), drawn.annotations[ct.SOPInstanceUID], user="dr-lee", overlay_uid=hd.UID(), device="viewer")))
    assert gsps.SOPClassUID == "1.2.840.10008.5.1.4.1.1.11.1"
    refs = [r.ReferencedSOPInstanceUID for s in gsps.ReferencedSeriesSequence for r in s.ReferencedImageSequence]
    assert refs == [ct.SOPInstanceUID]
    graphics = [g for item in gsps.GraphicAnnotationSequence for g in item.GraphicObjectSequence]
    assert [g.GraphicType for g in graphics] == ["POLYLINE", "ELLIPSE"]
    assert [float(v) for v in graphics[1].GraphicData] == [c for p in ELLIPSE for c in p]

    empty = pydicom.dcmread(io.BytesIO(build_presentation_state(
        _part10(ct), [], user="dr-lee", overlay_uid=hd.UID(), device="viewer", withdrawal=True)))
    assert "GraphicAnnotationSequence" not in empty and "withdrawn" in empty.ContentDescription


def test_a_measurement_report_is_an_overlay_of_its_evidence_images_and_other_srs_stay_reports():
    """A TID 1500 SR is carried as an overlay of the images its evidence lists (the first is its image-uid);
    one without evidence has nothing to attach to and stays a report, as does an SR of another title."""
    from medd.objects import classify, parse_part10
    from medd.plugins.objecttypes import OverlayType

    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    data = measurement_report([(ct, "POLYLINE", BOX)])
    content = parse_part10(data)
    assert classify(content.keyinfo) == "overlay" and content.keyinfo.referenced_image_uids == (ct.SOPInstanceUID,)
    assert OverlayType().identifier(content).get("image-uid") == ct.SOPInstanceUID
    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.CurrentRequestedProcedureEvidenceSequence
    assert classify(parse_part10(_part10(ds)).keyinfo) == "report"
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.ConceptNameCodeSequence[0].CodeValue = "18748-4"
    ds.ConceptNameCodeSequence[0].CodingSchemeDesignator = "LN"
    assert classify(parse_part10(_part10(ds)).keyinfo) == "report"


async def deliver(central, viewer, ds: pydicom.Dataset) -> None:
    """C-STORE ``ds`` to central, route it to the viewer and have the viewer pull it: in its inbox after the
    kick, whether the kick's pass or a poll of the viewer's own (on the reactor) fetched it."""
    from tests.test_routing import _cstore
    from tests.test_viewer import _local

    assert await deferToThread(_cstore, listener_port(central, "dicom"), [ds]) == [0]
    await central.routing.router.kick()
    assert (await viewer.viewer.requestor.kick()).error is None
    assert await _local(viewer, ds.SOPInstanceUID) is not None


def _stow(session, base: str, parts: list[bytes], headers: dict | None = None) -> requests.Response:
    boundary = uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n"
                    for p in parts) + f"--{boundary}--\r\n".encode()
    return session.post(base + "/dicomweb/studies", data=body,
                        headers={"Content-Type": STOW_TYPE.format(b=boundary), **(headers or {})})


@pytest_twisted.ensureDeferred
async def test_measurements_stored_over_stow_reach_central_as_overlay_versions(make_central):
    """Only a logged-in radiologist's same-origin STOW-RS is taken (no session: 401; another site's Origin or
    Sec-Fetch-Site, or neither: 403), and only SR and presentation states (an image: 403, nothing stored).
    A saved report is stored on the viewer (QIDO-RS and WADO-RS serve it) and each image it draws on gets an
    overlay on central. Saving again makes a new version that supersedes the old one (both kept, the newest
    current); a report that no longer draws on an image withdraws its overlay with an empty version."""
    from tests.test_viewer import VIEWER, _central_and_viewer, _history, _local

    central, viewer, admin = await _central_and_viewer(make_central)
    await add_user(viewer.reading_room.accounts, "dr-lee", "correct horse")
    ct = _with_recipient("CT_small.dcm", recipient=VIEWER)
    other = _with_recipient("CT_small.dcm", recipient=VIEWER, uid_suffix=".7")
    await deliver(central, viewer, ct)
    await deliver(central, viewer, other)
    base = f"http://127.0.0.1:{listener_port(viewer, 'http')}"
    first = measurement_report([(ct, "POLYLINE", BOX), (other, "ELLIPSE", ELLIPSE)])
    same_site = {"Origin": base, "Sec-Fetch-Site": "same-origin"}

    def refusals():
        anonymous = _stow(requests.Session(), base, [first], same_site)
        s = _login(base, "dr-lee", "correct horse")
        cross = _stow(s, base, [first], {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"})
        forged = _stow(s, base, [first], {"Origin": base, "Sec-Fetch-Site": "same-site"})
        bare = _stow(s, base, [first])
        image = _stow(s, base, [_part10(_with_recipient("CT_small.dcm", uid_suffix=".9"))], same_site)
        return anonymous, cross, forged, bare, image

    anonymous, cross, forged, bare, image = await deferToThread(refusals)
    assert anonymous.status_code == 401
    for refused in (cross, forged, bare):
        assert refused.status_code == 403 and "reading room's own pages" in refused.json()["detail"], refused.text
    assert image.status_code == 403 and "may store only overlays and reports" in image.json()["detail"]
    assert await _local(viewer, ct.SOPInstanceUID + ".9") is None
    assert await _local(viewer, pydicom.dcmread(io.BytesIO(first)).SOPInstanceUID) is None

    def save(report, headers=same_site):
        s = _login(base, "dr-lee", "correct horse")
        return _stow(s, base, [report], headers)

    stored = await deferToThread(save, first, {"Origin": base})  # an Origin of this host is enough
    assert stored.status_code == 200, stored.text
    sr_uid = pydicom.dcmread(io.BytesIO(first)).SOPInstanceUID
    record = await _local(viewer, sr_uid)
    # A measurement report is an overlay of its images, never a report (the report panel does not list it).
    assert record.origin == "dr-lee" and record.object_type == "overlay"
    assert record.referenced_image_uid == ct.SOPInstanceUID
    assert await viewer.reading_room.inbox.reports_of(ct.StudyInstanceUID) == []

    def served():
        s = _login(base, "dr-lee", "correct horse")
        found = s.get(f"{base}/dicomweb/studies/{ct.StudyInstanceUID}/instances")
        metadata = s.get(f"{base}/dicomweb/studies/{ct.StudyInstanceUID}/series/{record.series_instance_uid}/metadata")
        return found.json(), metadata.json()

    found, metadata = await deferToThread(served)
    assert sr_uid in [i["00080018"]["Value"][0] for i in found]
    assert metadata[0]["00080018"]["Value"] == [sr_uid] and metadata[0]["0040A730"]["Value"]

    await viewer.viewer.outgoing.kick()
    await central.routing.router.kick()

    async def overlays(image_uid, sop_class=GSPS):
        """Central's overlays of the image: its presentation states, or its measurement reports (SR)."""
        history = await _history(central, admin, image_uid)
        assert sr_uid not in [r["uid"] for r in history["reports"]]  # never filed as a report on central
        return [o for o in history["overlays"] if o["sop_class_uid"].startswith(sop_class)]

    # The SR itself reached central, stored as an overlay attached to its (first) image, beside the GSPS.
    (sr1,) = await overlays(ct.SOPInstanceUID, SR_SOP_CLASS_PREFIX)
    assert sr1["uid"] == sr_uid and sr1["origin"] == VIEWER and sr1["current"]
    on_central = await _local(central, sr_uid)
    assert on_central.object_type == "overlay"
    assert await central.ingest.read_blob(on_central.digest) == await viewer.ingest.read_blob(record.digest)
    (v1,) = await overlays(ct.SOPInstanceUID)
    assert v1["origin"] == VIEWER and v1["current"] and v1["supersedes"] is None
    (w1,) = await overlays(other.SOPInstanceUID)

    # An edit: the length moved, the ellipse is gone; the image it was on gets an empty version.
    second = measurement_report([(ct, "POLYLINE", [[p[0] + 5, p[1]] for p in BOX])])
    assert (await deferToThread(save, second)).status_code == 200
    await viewer.viewer.outgoing.kick()
    await central.routing.router.kick()
    old_sr, new_sr = await overlays(ct.SOPInstanceUID, SR_SOP_CLASS_PREFIX)
    assert old_sr["uid"] == sr_uid and not old_sr["current"] and new_sr["supersedes"] == sr_uid and new_sr["current"]
    old, new = await overlays(ct.SOPInstanceUID)
    assert old["uid"] == v1["uid"] and not old["current"]
    assert new["supersedes"] == v1["uid"] and new["current"]
    old, withdrawal = await overlays(other.SOPInstanceUID)
    assert old["uid"] == w1["uid"] and not old["current"] and withdrawal["supersedes"] == w1["uid"]
    withdrawn = await _local(central, withdrawal["uid"])
    gsps = pydicom.dcmread(io.BytesIO(await central.ingest.read_blob(withdrawn.digest)))
    assert "GraphicAnnotationSequence" not in gsps and withdrawal["current"]
    moved = await _local(central, new["uid"])
    gsps = pydicom.dcmread(io.BytesIO(await central.ingest.read_blob(moved.digest)))
    (graphic,) = [g for item in gsps.GraphicAnnotationSequence for g in item.GraphicObjectSequence]
    assert float(graphic.GraphicData[0]) == BOX[0][0] + 5

    # Deleted in the reading room: with the session's CSRF token only, an empty version for what is still drawn.
    def withdraw():
        s = _login(base, "dr-lee", "correct horse")
        url = f"{base}/studies/{ct.StudyInstanceUID}/withdraw-measurements"
        forged = s.post(url)
        token = csrf_token(s.cookies["medd_session"])
        return forged, s.post(url, headers={"X-CSRF-Token": token}), s.post(url, headers={"X-CSRF-Token": token})

    forged, withdrawn, again = await deferToThread(withdraw)
    assert forged.status_code == 403
    assert withdrawn.status_code == 200 and len(withdrawn.json()["withdrawn"]) == 1, withdrawn.text
    assert again.json()["withdrawn"] == []  # nothing left to withdraw
    await viewer.viewer.outgoing.kick()
    await central.routing.router.kick()
    versions = await overlays(ct.SOPInstanceUID)
    assert [v["current"] for v in versions] == [False, False, True]
    assert versions[2]["uid"] == withdrawn.json()["withdrawn"][0] and versions[2]["supersedes"] == new["uid"]




METADATA_FILES = ["CT_small.dcm", "SC_rgb_rle_2frame.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm", "MR_small.dcm"]


@pytest_twisted.ensureDeferred
async def test_the_metadata_cache_serves_what_parsing_would(make_central):
    """Each object's WADO-RS metadata is cached on the viewer as it is stored, and is JSON-equal to the
    metadata parsed from the stored object (single- and multi-frame, native, RLE and JPEG 2000); a series'
    metadata is served from the cache, and an object whose cache row is missing is parsed and cached again."""
    from sqlalchemy import delete, select

    from medd.dicomjson import metadata_of
    from medd.storage.viewer_tables import object_metadata
    from tests.test_viewer import _central_and_viewer

    _, viewer, _ = await _central_and_viewer(make_central)
    await add_user(viewer.reading_room.accounts, "dr-lee", "correct horse")
    records = []
    for n, name in enumerate(METADATA_FILES, 1):
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.78.{n}"
        ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.8.498.79.{n}"
        ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.77"  # one study, one series per file
        stored = await viewer.ingest.receive_dicom(_part10(ds), transport="pull", origin="central@central")
        records.append(await viewer.index.object_by_uid(stored.uid))
    cache = viewer.viewer.metadata_cache
    cached = await cache.documents([r.digest for r in records])
    assert set(cached) == {r.digest for r in records}
    for record in records:
        parsed = metadata_of(await viewer.ingest.read_blob(record.digest))
        assert json.loads(cached[record.digest]) == parsed, record.sop_instance_uid
        assert "7FE00010" not in parsed
    multi = records[1]
    assert json.loads(cached[multi.digest])["00280008"]["Value"] == [int(pydicom.dcmread(
        get_testdata_file("SC_rgb_rle_2frame.dcm")).NumberOfFrames)]

    await viewer.database.run(lambda c: c.execute(delete(object_metadata).where(
        object_metadata.c.digest == multi.digest)))
    base = f"http://127.0.0.1:{listener_port(viewer, 'http')}"

    def fetch():
        s = _login(base, "dr-lee", "correct horse")
        return [s.get(f"{base}/dicomweb/studies/{r.study_instance_uid}/series/{r.series_instance_uid}/metadata").json()
                for r in records]

    served = await deferToThread(fetch)
    for record, (document,) in zip(records, served):
        assert document == metadata_of(await viewer.ingest.read_blob(record.digest))
    refilled = await viewer.database.run(lambda c: c.execute(select(object_metadata.c.document).where(
        object_metadata.c.digest == multi.digest)).scalar())
    assert json.loads(refilled) == served[1][0]
