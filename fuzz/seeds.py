"""Seed inputs for the fuzz targets: pydicom's bundled test files, and
packages built the way the tests build them (medd.package.build_package)."""
from __future__ import annotations

import struct
from pathlib import Path

from pydicom.data import get_testdata_file

from medd.objects import parse_part10
from medd.package import AttachmentId, build_package
from medd.plugins.objecttypes import ImageType, ReportType, status_content, text_report_content

# Small files of different shapes: implicit/explicit VR, big endian, deflated,
# compressed pixel data, a structured report.
DICOM_FILES = ("CT_small.dcm", "MR_small.dcm", "image_dfl.dcm", "MR_small_bigendian.dcm",
               "JPEG2000.dcm", "test-SR.dcm", "rtplan.dcm", "SC_rgb_rle.dcm")
ORIGIN, DESTINATION = "ct1@centre-a.example", "dr-lee@viewers.example"


def dicom_files() -> dict[str, bytes]:
    return {name: Path(get_testdata_file(name)).read_bytes() for name in DICOM_FILES}


def packages() -> dict[str, bytes]:
    """One package of each kind the nodes exchange."""
    out = {}
    for name, data in dicom_files().items():
        content = parse_part10(data)
        object_type = ReportType() if ReportType().recognise(content) else ImageType()
        out[f"{name}.eml"] = build_package(content, object_type.identifier(content), origin=ORIGIN,
                                           destination=DESTINATION, message_id=f"<{name}@centre-a.example>")
        if len(out) >= 4:
            break
    report = text_report_content("No acute findings.", "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2")
    out["report.eml"] = build_package(report, ReportType().identifier(report), origin=DESTINATION,
                                      destination="central.test", message_id="<report@viewers.example>")
    status = status_content("opened", "1.2.826.0.1.3680043.8.498.3", "dr-lee")
    out["status.eml"] = build_package(status, AttachmentId.of("status", event="opened",
                                                              uid="1.2.826.0.1.3680043.8.498.3"),
                                      origin=DESTINATION, destination="central.test",
                                      message_id="<status@viewers.example>")
    return out


def multiparts() -> dict[str, bytes]:
    """STOW-RS bodies (the boundary is the first line), and nested MIME packages."""
    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    stow = b"--b0\r\nContent-Type: application/dicom\r\n\r\n" + ct + b"\r\n--b0--\r\n"
    signed = (b"From: a@b.example\r\nTo: c@d.example\r\nMessage-ID: <x@b.example>\r\n"
              b"Medd-Attachment: report; uid=1.2.3; study-uid=1.2.4\r\nMIME-Version: 1.0\r\n"
              b'Content-Type: multipart/signed; boundary="s1"\r\n\r\n--s1\r\n'
              b"Content-Type: text/plain\r\n\r\nnote\r\n--s1\r\nContent-Type: application/pkcs7-signature\r\n\r\n"
              b"AAAA\r\n--s1--\r\n")
    return {"stow.mime": stow, "signed.eml": signed, **packages()}


def frames() -> dict[str, bytes]:
    """TLS frame streams: a chunking byte, then length-prefixed packages."""
    pkgs = list(packages().values())
    stream = b"".join(struct.pack(">I", len(p)) + p for p in pkgs[-2:])
    return {"two-frames": b"\x07" + stream, "one-frame-whole": b"\xff" + struct.pack(">I", len(pkgs[0])) + pkgs[0],
            "empty-frame": b"\x01" + b"\0\0\0\0", "huge-header": b"\x03" + b"\x7f\xff\xff\xff" + b"x" * 10}


def queries() -> dict[str, bytes]:
    return {
        "studies": b"PatientID=12345&StudyDate=20200101-20201231&limit=10&offset=0",
        "wildcards": b"PatientName=Doe*^J?hn&ModalitiesInStudy=CT%5CMR&includefield=all",
        "uids": b"StudyInstanceUID=1.2.3%5C1.2.4&0020000D=1.2.5&fuzzymatching=true",
        "instances": b"SOPClassUID=1.2.840.10008.5.1.4.1.1.2&SeriesInstanceUID=1.2.3",
        "huge-offset": b"offset=9223372036854775808&limit=99999999999999999999",
    }
