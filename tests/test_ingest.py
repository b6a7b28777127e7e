"""The ingest path against every database backend: store, index, idempotency, refusals."""
from __future__ import annotations

import pytest
import pytest_twisted
from pydicom import dcmread

from medd.ingest import Refused
from medd.objects import parse_part10
from medd.package import AttachmentId, build_package
from medd.plugins.objecttypes import ImageType, OverlayType, ReportType, status_content, text_report_content
from medd.storage import index
from medd.storage.schema import receipts, status_events
from tests.conftest import testdata


def _blob_files(node):
    return [p for p in (node.config.storage_path / "blobs").rglob("*") if p.is_file()]


def _tmp_files(node):
    return [p for p in (node.config.storage_path / "tmp").iterdir()]


async def _count(node, table):
    from sqlalchemy import func, select

    return await node.database.run(lambda c: c.execute(select(func.count()).select_from(table)).scalar_one())


@pytest_twisted.ensureDeferred
async def test_package_stored_and_idempotent(make_central, db_url):
    """A package is indexed under its UID with its origin; resending it changes nothing."""
    node = await make_central(db_url=db_url)
    content = parse_part10(testdata("MR_small.dcm"))
    pkg = build_package(content, ImageType().identifier(content), origin="ct1@centre-a.example", destination="dr-lee@viewers.example")
    first = await node.ingest.receive_package(pkg, transport="test", peer="192.0.2.7")
    second = await node.ingest.receive_package(pkg, transport="test")
    assert first.created and not second.created
    from sqlalchemy import select

    assert await node.database.run(lambda c: c.execute(select(receipts.c.peer)).scalar_one()) == "192.0.2.7"
    assert first.uid == content.keyinfo.sop_instance_uid
    record = await node.database.run(lambda c: index.object_by_uid(c, first.uid))
    assert record.origin == "ct1@centre-a.example"
    assert record.intended_recipients is None  # the To stays in the receipt
    assert record.modality == "MR"
    assert await node.database.run(index.count_objects) == 1
    assert await _count(node, receipts) == 1
    assert len(_blob_files(node)) == 1


@pytest_twisted.ensureDeferred
async def test_same_object_in_new_package_is_not_duplicated(make_central, db_url):
    """The same object in two packages (two Message-IDs) is one row and one blob, two receipts."""
    node = await make_central(db_url=db_url)
    content = parse_part10(testdata("CT_small.dcm"))
    for _ in range(2):
        pkg = build_package(content, ImageType().identifier(content), origin="a@b.example", destination="c@d.example")
        await node.ingest.receive_package(pkg, transport="test")
    assert await node.database.run(index.count_objects) == 1
    assert await _count(node, receipts) == 2
    assert len(_blob_files(node)) == 1


def _gsps_for(image_bytes: bytes) -> bytes:
    """A minimal Grayscale Softcopy Presentation State referencing the image (pydicom only)."""
    import io

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    image = dcmread(io.BytesIO(image_bytes))
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.11.1"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = image.StudyInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "PR"
    ds.PatientID = image.PatientID
    ref_image = Dataset()
    ref_image.ReferencedSOPClassUID = image.SOPClassUID
    ref_image.ReferencedSOPInstanceUID = image.SOPInstanceUID
    ref_series = Dataset()
    ref_series.SeriesInstanceUID = image.SeriesInstanceUID
    ref_series.ReferencedImageSequence = [ref_image]
    ds.ReferencedSeriesSequence = [ref_series]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest_twisted.ensureDeferred
async def test_overlay_report_and_status_packages(make_central, db_url):
    """Overlay, text report and status packages from a registered viewer, sent with its token, are accepted
    and recorded with their identifiers."""
    node = await make_central(db_url=db_url)
    token = (await node.central_storage.directory.add_viewer("dr-lee@viewers.example")).token
    image = testdata("CT_small.dcm")
    image_uid = parse_part10(image).keyinfo.sop_instance_uid
    overlay = parse_part10(_gsps_for(image))
    ov_id = OverlayType().identifier(overlay)
    assert ov_id.get("image-uid") == image_uid
    stored = await node.ingest.receive_package(
        build_package(overlay, ov_id, origin="dr-lee@viewers.example", destination="central.test"), transport="test",
        credentials=token,
    )
    assert stored.object_type == "overlay"
    record = await node.database.run(lambda c: index.object_by_uid(c, overlay.keyinfo.sop_instance_uid))
    assert record.referenced_image_uid == image_uid

    report = text_report_content("No acute findings.", "2.25.1234", overlay.keyinfo.study_instance_uid)
    stored = await node.ingest.receive_package(
        build_package(report, ReportType().identifier(report), origin="dr-lee@viewers.example", destination="central.test"),
        transport="test", credentials=token,
    )
    record = await node.database.run(lambda c: index.object_by_uid(c, "2.25.1234"))
    assert (record.object_type, record.media_type, record.study_instance_uid) == (
        "report", "text/plain", overlay.keyinfo.study_instance_uid)
    assert node.blobs.get(record.digest) == b"No acute findings."

    status = status_content("opened", image_uid, "dr-lee")
    pkg = build_package(status, AttachmentId.of("status", event="opened", uid=image_uid),
                        origin="dr-lee@viewers.example", destination="central.test")
    first = await node.ingest.receive_package(pkg, transport="test", credentials=token)
    again = await node.ingest.receive_package(pkg, transport="test", credentials=token)
    assert first.created and not again.created
    assert await _count(node, status_events) == 1


BAD_PACKAGES = {
    "lying uid": lambda c: build_package(c, AttachmentId.of("image", uid="1.2.3.4"), origin="a@b.example", destination="c@d.example"),
    "overlay claim on an image": lambda c: build_package(
        c, AttachmentId.of("overlay", uid=c.keyinfo.sop_instance_uid, image_uid="1.2.3"), origin="a@b.example", destination="c@d.example"),
    "unknown type": lambda c: build_package(c, AttachmentId.of("xray", uid="1.2.3"), origin="a@b.example", destination="c@d.example"),
    "no attachment header": lambda c: build_package(c, AttachmentId.of("image", uid=c.keyinfo.sop_instance_uid),
                                                    origin="a@b.example", destination="c@d.example").replace(b"Medd-Attachment", b"X-Other"),
    "not MIME": lambda c: b"\x00\x01garbage" * 100,
    "truncated object": lambda c: build_package(
        _truncated(c), AttachmentId.of("image", uid=c.keyinfo.sop_instance_uid), origin="a@b.example", destination="c@d.example"),
}


def _truncated(content):
    from medd.objects import Content

    return Content(media_type="application/dicom", data=content.data[:-100], keyinfo=content.keyinfo)


@pytest.mark.parametrize("case", sorted(BAD_PACKAGES))
@pytest_twisted.ensureDeferred
async def test_bad_package_refused_changes_nothing(make_central, case):
    """Each kind of bad package is refused with a reason and leaves no row, receipt, blob or temp file."""
    node = await make_central()
    content = parse_part10(testdata("CT_small.dcm"))
    data = BAD_PACKAGES[case](content)
    with pytest.raises(Refused) as info:
        await node.ingest.receive_package(data, transport="test")
    assert info.value.reason
    assert await node.database.run(index.count_objects) == 0
    assert await _count(node, receipts) == 0
    assert _blob_files(node) == [] and _tmp_files(node) == []


@pytest.mark.parametrize("name", ["MR_truncated.dcm", "rtplan_truncated.dcm", "no_meta.dcm", "meta_missing_tsyntax.dcm"])
@pytest_twisted.ensureDeferred
async def test_bad_dicom_refused(make_central, name):
    """pydicom's broken test files are refused and leave nothing behind."""
    node = await make_central()
    with pytest.raises(Refused):
        await node.ingest.receive_dicom(testdata(name), transport="test", origin="MOD")
    assert await node.database.run(index.count_objects) == 0
    assert _blob_files(node) == []


@pytest_twisted.ensureDeferred
async def test_nonzero_preamble_is_zeroed(make_central):
    """A file with a non-zero preamble (a polyglot risk) is stored with the preamble zeroed."""
    node = await make_central()
    data = bytearray(testdata("CT_small.dcm"))
    data[:128] = b"MZ" + b"\x90" * 126
    stored = await node.ingest.receive_dicom(bytes(data), transport="test", origin="MOD")
    kept = node.blobs.get(stored.digest)
    assert kept[:128] == b"\0" * 128
    assert kept[128:] == bytes(data[128:])


@pytest_twisted.ensureDeferred
async def test_oversized_refused(make_central):
    """An object over [limits] max_object_size is refused as too large."""
    node = await make_central(extra="[limits]\nmax_object_size = 10K\n")
    with pytest.raises(Refused) as info:
        await node.ingest.receive_dicom(testdata("CT_small.dcm"), transport="test", origin="MOD")
    assert info.value.kind == "too-large"
    assert await node.database.run(index.count_objects) == 0
