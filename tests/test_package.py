"""The package format: Medd-Attachment identifiers taken from content, and `medd package`."""
from __future__ import annotations

import email
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from medd.objects import InvalidObject, parse_part10
from medd.package import AttachmentId, build_package, read_package
from medd.plugins.host import load_plugins
from medd.plugins.objecttypes import ImageType, ReportType, StatusType, status_content, text_report_content
from tests.conftest import testdata

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def lookup():
    return load_plugins().object_type


def test_attachment_id_round_trip():
    """An identifier prints in the DESIGN.md form and parses back, parameters and all."""
    a = AttachmentId.of("overlay", uid="1.2.3", image_uid="1.2.4")
    assert str(a) == "overlay; uid=1.2.3; image-uid=1.2.4"
    assert AttachmentId.parse(str(a)) == a
    assert AttachmentId.parse('Report; UID="1.2.5"; study-uid=1.2.6').get("study-uid") == "1.2.6"
    with pytest.raises(InvalidObject):
        AttachmentId.parse("; uid=1.2.3")


def test_image_package_round_trip(lookup):
    """A built package has the envelope headers, and reading it gives back the exact object bytes."""
    content = parse_part10(testdata("CT_small.dcm"))
    data = build_package(content, ImageType().identifier(content), origin="ct1@centre-a.example", destination="dr@v.example")
    msg = email.message_from_bytes(data)
    assert msg["Medd-Attachment"] == f"image; uid={content.keyinfo.sop_instance_uid}"
    assert msg.get_content_type() == "application/dicom" and msg["Message-ID"]
    package = read_package(data, lookup)
    assert package.content.data == content.data
    assert (package.origin, package.destination) == ("ct1@centre-a.example", "dr@v.example")


def test_header_uids_must_match_content(lookup):
    """A Medd-Attachment that lies about the UID is refused naming both UIDs."""
    content = parse_part10(testdata("CT_small.dcm"))
    data = build_package(content, AttachmentId.of("image", uid="1.2.3"), origin="a@b.example", destination="c@d.example")
    with pytest.raises(InvalidObject, match="uid=1.2.3 does not match"):
        read_package(data, lookup)


def test_report_identifiers():
    """A DICOM SR report is keyed by its UID and study; a text report needs explicit valid UIDs."""
    sr = parse_part10(testdata("test-SR.dcm"))
    assert ReportType().recognise(sr)
    ident = ReportType().identifier(sr)
    assert ident.get("study-uid") == sr.keyinfo.study_instance_uid
    text = text_report_content("fine", "2.25.9", "not-a-uid")
    with pytest.raises(InvalidObject):
        ReportType().validate(AttachmentId.of("report", uid="2.25.9", study_uid="not-a-uid"), text)


def test_status_validation():
    """A status header must agree with the status part's event and uid."""
    content = status_content("opened", "1.2.3", "dr-lee")
    StatusType().validate(AttachmentId.of("status", event="opened", uid="1.2.3"), content)
    with pytest.raises(InvalidObject):
        StatusType().validate(AttachmentId.of("status", event="opened", uid="1.2.4"), content)


def test_medd_package_cli(lookup, tmp_path):
    """`medd package FILE --to ADDR` writes a valid package to stdout; a non-DICOM file is refused with exit 2."""
    path = get_testdata_file("CT_small.dcm")
    out = subprocess.run([str(BIN / "medd"), "package", path, "--to", "dr-lee@viewers.example"],
                         capture_output=True, check=True).stdout
    package = read_package(out, lookup)
    assert package.destination == "dr-lee@viewers.example"
    assert package.attachment.type == "image"
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    proc = subprocess.run([str(BIN / "medd"), "package", str(bad), "--to", "x@y.example"], capture_output=True, text=True)
    assert proc.returncode == 2 and "not a DICOM Part 10 file" in proc.stderr


def test_text_package_keeps_exact_bytes_and_headers_cannot_be_injected(lookup):
    """A text report travels in base64 (its CRLFs and missing final newline survive); a header value
    with a line break (which would smuggle a header) is refused when the package is built."""
    text = "Impression:\r\nno acute findings"
    content = text_report_content(text, "2.25.10", "2.25.11")
    data = build_package(content, ReportType().identifier(content), origin="dr@v.example", destination="central.test")
    msg = email.message_from_bytes(data)
    assert msg.get_content_type() == "text/plain" and msg.get_param("charset") == "utf-8"
    assert msg["Content-Transfer-Encoding"] == "base64"
    assert read_package(data, lookup).content.data == text.encode()
    with pytest.raises(ValueError, match="line break"):
        build_package(content, ReportType().identifier(content), origin="dr@v.example",
                      destination="central.test\r\nMedd-Attachment: image; uid=1.2.3")


def test_multipart_packages_are_still_read(lookup):
    """A package wrapped by a mail client (multipart/mixed with a note beside the object) is read by the
    full MIME parser; the object part's bytes come back exact."""
    from email.mime.application import MIMEApplication
    from email.mime.multipart import MIMEMultipart
    from email.mime.text import MIMEText

    content = parse_part10(testdata("CT_small.dcm"))
    outer = MIMEMultipart()
    for name, value in (("From", "ct1@centre-a.example"), ("To", "dr@v.example"), ("Message-ID", "<1@centre-a.example>"),
                        ("Medd-Attachment", str(ImageType().identifier(content)))):
        outer[name] = value
    outer.attach(MIMEText("CT from centre A"))
    outer.attach(MIMEApplication(content.data, "dicom"))
    package = read_package(outer.as_bytes(), lookup)
    assert package.content.data == content.data and package.origin == "ct1@centre-a.example"
