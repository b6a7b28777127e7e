"""Limits on what received data becomes, not only on its size on the wire:
deflated datasets are measured before they are inflated, and a package's MIME
structure is bounded before the parser builds it. Every such refusal is
permanent (Refused), never "try again"."""
from __future__ import annotations

import base64
import io
import subprocess
import sys
import textwrap
import zlib

import pydicom
import pytest
import pytest_twisted
from pydicom.uid import DeflatedExplicitVRLittleEndian

from medd.ingest import Refused
from medd.objects import InvalidObject, parse_part10
from medd.config import PartLimits
from medd.package import parse_package
from medd.storage import index
from tests.conftest import testdata

MAX_MIME_PARTS = PartLimits().max_mime_parts

BOMB_SOURCE = textwrap.dedent(
    '''
    import io, struct, zlib
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

    def deflate_bomb(inflated: int) -> bytes:
        """A deflated Part 10 file whose dataset inflates to ``inflated`` bytes of pixel data."""
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        head = io.BytesIO()
        head.write(b"\\0" * 128 + b"DICM")
        write_file_meta_info(head, meta, enforce_standard=True)
        deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        out = [head.getvalue()]
        # (7FE0,0010) OB with a 4-byte length, then zeros.
        out.append(deflater.compress(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, inflated)))
        chunk = bytes(1 << 20)
        for _ in range(inflated >> 20):
            out.append(deflater.compress(chunk))
        out.append(deflater.flush())
        return b"".join(out)
    '''
)


def deflate_bomb(inflated: int) -> bytes:
    scope: dict = {}
    exec(BOMB_SOURCE, scope)
    return scope["deflate_bomb"](inflated)


def deflated(name: str) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(testdata(name)))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_a_deflated_object_is_read_and_checked_like_any_other():
    """A real deflated object is accepted with its key information; its inflated dataset is held to
    the truncation checks (pixel data claiming more bytes than are present is refused)."""
    content = parse_part10(deflated("CT_small.dcm"))
    assert content.keyinfo.modality == "CT" and content.keyinfo.rows == 128
    ds = pydicom.dcmread(io.BytesIO(testdata("CT_small.dcm")))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    data = out.getvalue()
    # Re-deflate the dataset with the pixel data's length raised far beyond what is there.
    meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")
    inflated = zlib.decompress(data[meta_end:], -zlib.MAX_WBITS)
    at = inflated.index(b"\xe0\x7f\x10\x00")
    lying = inflated[: at + 8] + (100_000).to_bytes(4, "little") + inflated[at + 12 : at + 12 + 128]
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    truncated = data[:meta_end] + deflater.compress(lying) + deflater.flush()
    with pytest.raises(InvalidObject, match="ends after the end"):
        parse_part10(truncated)


def test_deflate_bomb_is_refused_without_inflating_it():
    """A 1 GiB deflate bomb (about 1 MB on the wire) is refused against a 512 MB limit while the
    process's peak memory grows by less than 100 MB (measured in a fresh interpreter)."""
    script = BOMB_SOURCE + textwrap.dedent(
        '''
        import resource
        from medd.objects import InvalidObject, parse_part10
        bomb = deflate_bomb(1 << 30)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            parse_part10(bomb, max_inflated_size=512 << 20)
        except InvalidObject as e:
            print("refused:", e.reason)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print("bytes", len(bomb), "growth_kb", after - before)
        '''
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused: the deflated dataset inflates to more than 536870912 bytes" in out.stdout
    size = int(out.stdout.split("bytes ")[1].split()[0])
    growth_kb = int(out.stdout.rsplit("growth_kb ", 1)[1])
    assert size < 2 << 20 and growth_kb < 100 * 1024, out.stdout


@pytest_twisted.ensureDeferred
async def test_ingest_refuses_a_bomb_for_good_and_stores_nothing(make_central):
    """Over the ingest path the bomb is a permanent refusal (not "try again"), against the node's
    [limits] max_object_size, and leaves no blob and no row."""
    node = await make_central({}, extra="[limits]\nmax_object_size = 8M\n")
    with pytest.raises(Refused, match="inflates to more than 8388608 bytes"):
        await node.ingest.receive_dicom(deflate_bomb(64 << 20), transport="test", origin="MOD")
    assert await node.database.run(index.count_objects) == 0
    assert not [p for p in (node.config.storage_path / "blobs").rglob("*") if p.is_file()]


HEAD = (b"From: ct1@centre-a.example\r\nTo: central@central.test\r\nMessage-ID: <m@centre-a.example>\r\n"
        b"Medd-Attachment: image; uid=1.2.3\r\nMIME-Version: 1.0\r\n")


def test_a_million_empty_parts_are_refused_before_parsing():
    """10^6 empty MIME parts are refused by counting delimiters, before the parser builds them."""
    parts = b"--b\r\n\r\n\r\n" * 1_000_000
    data = HEAD + b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n' + parts + b"--b--\r\n"
    with pytest.raises(InvalidObject, match=f"more than {MAX_MIME_PARTS} MIME parts"):
        parse_package(data)


def test_deep_nesting_is_a_permanent_refusal():
    """Multiparts nested 1000 deep are refused as invalid (a sender must not retry), not a RecursionError."""
    body = b"".join(b'--b%d\r\nContent-Type: multipart/mixed; boundary="b%d"\r\n\r\n' % (i, i + 1) for i in range(1000))
    data = HEAD + b'Content-Type: multipart/mixed; boundary="b0"\r\n\r\n' + body
    with pytest.raises(InvalidObject, match="multipart containers"):
        parse_package(data)


@pytest_twisted.ensureDeferred
async def test_mime_bombs_are_refused_by_ingest_not_retried(make_central):
    """Through the node's ingest both MIME bombs end as Refused (HTTP 400, SMTP 554, TLS refused)."""
    node = await make_central({})
    many = HEAD + b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n' + b"--b\r\n\r\n\r\n" * 100_000 + b"--b--\r\n"
    with pytest.raises(Refused, match=f"more than {MAX_MIME_PARTS} MIME parts") as refused:
        await node.ingest.receive_package(many, transport="test")
    assert refused.value.kind == "invalid"
    deep = HEAD + b'Content-Type: multipart/mixed; boundary="b0"\r\n\r\n' + b"".join(
        b'--b%d\r\nContent-Type: multipart/mixed; boundary="b%d"\r\n\r\n' % (i, i + 1) for i in range(1000))
    with pytest.raises(Refused, match="multipart containers") as refused:
        await node.ingest.receive_package(deep, transport="test")
    assert refused.value.kind == "invalid"
    assert await node.database.run(index.count_objects) == 0



def _package_with_parts(parts: int, containers: int = 1) -> bytes:
    """A package whose object travels beside ``parts - 1`` notes, in ``containers`` nested multiparts."""
    obj = (b"Content-Type: application/dicom\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           + base64.encodebytes(testdata("CT_small.dcm")).replace(b"\n", b"\r\n"))
    notes = [b"Content-Type: text/plain\r\n\r\nnote %d\r\n" % i for i in range(parts - 1)]
    body = obj
    for depth in range(containers):
        inner = [body] + (notes if depth == 0 else [])
        boundary = b"b%d" % depth
        body = (b'Content-Type: multipart/mixed; boundary="%s"\r\n\r\n' % boundary
                + b"".join(b"--" + boundary + b"\r\n" + p for p in inner) + b"--" + boundary + b"--\r\n")
    return HEAD + body


@pytest_twisted.ensureDeferred
async def test_mime_bounds_are_the_configured_limits(make_central):
    """``[limits] max_mime_parts`` and ``max_mime_containers`` are the bounds ingest applies: packages the
    defaults accept (3 parts; 2 nested containers) are permanent refusals under lower limits."""
    wide, deep = _package_with_parts(3), _package_with_parts(1, containers=2)
    for data in (wide, deep):
        assert parse_package(data)[1].get_content_type() == "application/dicom"
    node = await make_central({}, extra="[limits]\nmax_mime_parts = 2\nmax_mime_containers = 1\n")
    for data, match in ((wide, "more than 2 MIME parts"), (deep, "2 multipart containers; a package has at most 1")):
        with pytest.raises(Refused, match=match) as refused:
            await node.ingest.receive_package(data, transport="test")
        assert refused.value.kind == "invalid"
    assert await node.database.run(index.count_objects) == 0
