"""The frames of a stored image, as WADO-RS serves them (PS3.18 8.7.3): each
frame's pixel data in the transfer syntax the client accepts, the stored one
when it can take that, else decoded to Explicit VR Little Endian.

Everything here is blocking CPU work on one object's bytes; callers run it
off the reactor. Decoding goes through pydicom's pixel handlers (pylibjpeg
and its plugins); nothing here is a codec.
"""
from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO

import numpy as np
import pydicom
from pydicom.encaps import get_frame
from pydicom.pixels import pack_bits, pixel_array
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

OCTET_STREAM = "application/octet-stream"
ANY = "*"

# The media type of a frame in each compressed transfer syntax (PS3.18 table 8.7.3-5).
COMPRESSED_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}
# Native syntaxes whose pixel bytes are little endian as stored (a deflated file is inflated on reading).
LITTLE_ENDIAN = {ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}


class FrameError(Exception):
    """A frame that cannot be served: ``status`` 404 (no such frame, no pixel data) or 406 (not in an
    accepted transfer syntax)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Accepted:
    """One acceptable part type of a frames request: a media type and a transfer syntax (``*`` for any)."""

    media_type: str
    transfer_syntax: str


@dataclass(frozen=True)
class Frame:
    number: int  # from 1
    media_type: str
    transfer_syntax: str
    data: bytes


def parse_accept(header: str | None) -> list[Accepted]:
    """The part types a frames request accepts, in order. With no type, or a wildcard, any stored syntax
    is taken; ``application/octet-stream`` without a transfer syntax means Explicit VR Little Endian."""
    out = []
    for item in (header or "*/*").split(","):
        # Not a generic header parser: the values here (media types, UIDs, "*") are unquoted tokens that
        # contain "/", which RFC 9110's token grammar (and so the multipart library) does not allow.
        media_type, *rest = [p.strip() for p in item.split(";")]
        media_type = media_type.lower()
        params = {}
        for param in rest:
            key, _, value = param.partition("=")
            params[key.strip().lower()] = value.strip().strip('"')
        if media_type in ("*/*", "multipart/*"):
            out.append(Accepted(ANY, ANY))
        elif media_type == "multipart/related":
            part = params.get("type", OCTET_STREAM).lower()
            default = ExplicitVRLittleEndian if part == OCTET_STREAM else ANY
            out.append(Accepted(part, params.get("transfer-syntax", default)))
    return out


def _choose(stored: str, accepted: list[Accepted]) -> Accepted | None:
    """What to send a frame stored in ``stored`` as: the stored syntax if accepted, else Explicit VR
    Little Endian (decoded) if accepted; None if neither."""
    stored_type = COMPRESSED_MEDIA_TYPES.get(stored, OCTET_STREAM)
    for a in accepted:
        if a.transfer_syntax in (ANY, stored) and a.media_type in (ANY, OCTET_STREAM, stored_type, "image/*"):
            # A client that names octet-stream and any syntax (Cornerstone does) reads the syntax of each part.
            return Accepted(stored_type if a.media_type != OCTET_STREAM else OCTET_STREAM, stored)
    for a in accepted:
        if a.media_type in (ANY, OCTET_STREAM) and a.transfer_syntax in (ANY, ExplicitVRLittleEndian):
            return Accepted(OCTET_STREAM, ExplicitVRLittleEndian)
    return None


def _native_frame(ds, index: int, frames: int) -> bytes:
    rows, columns = int(ds.Rows), int(ds.Columns)
    samples, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.BitsAllocated)
    size_bits = rows * columns * samples * bits
    if size_bits % 8:
        # Packed single-bit frames need not start on a byte: unpack this one and pack it again.
        return pack_bits(pixel_array(ds, index=index))
    size = size_bits // 8
    data = ds.PixelData[index * size:(index + 1) * size]
    if len(data) < size:
        raise FrameError(404, f"frame {index + 1} is missing from the stored pixel data")
    return data


def _decoded_frame(ds, index: int) -> bytes:
    """One frame decoded to native little-endian bytes, as the stored Bits Allocated lays them out."""
    try:
        array = pixel_array(ds, index=index, raw=True)
    except Exception as e:
        raise FrameError(406, f"the stored pixel data cannot be decoded to send it uncompressed: {e}") from e
    bits = int(ds.BitsAllocated)
    if bits == 1:
        return pack_bits(array)
    dtype = np.dtype(array.dtype).newbyteorder("<")
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def read_frames(data: bytes, numbers: list[int], accepted: list[Accepted]) -> list[Frame]:
    """Blocking: frames ``numbers`` (from 1) of a stored Part 10 image, each as :func:`_choose` picks."""
    try:
        ds = pydicom.dcmread(BytesIO(data))
    except Exception as e:
        raise FrameError(404, f"the stored object cannot be read as DICOM: {e}") from e
    if "PixelData" not in ds:
        raise FrameError(404, "the stored object has no pixel data")
    stored = UID(str(ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)))
    frames = max(1, int(ds.get("NumberOfFrames", 1) or 1))
    bad = [n for n in numbers if not 1 <= n <= frames]
    if bad:
        raise FrameError(404, f"frame {bad[0]} does not exist; the image has {frames} frame(s)")
    choice = _choose(stored, accepted)
    if choice is None:
        wanted = ", ".join(f"{a.media_type} ({a.transfer_syntax})" for a in accepted) or "nothing"
        raise FrameError(406, f"the frames are stored as {stored} and can be sent as that or Explicit VR Little "
                              f"Endian, not as {wanted}")
    out = []
    for number in numbers:
        index = number - 1
        if choice.transfer_syntax != stored or stored == ExplicitVRBigEndian:
            payload, syntax = _decoded_frame(ds, index), ExplicitVRLittleEndian
        elif stored.is_encapsulated:
            payload, syntax = get_frame(ds.PixelData, index, number_of_frames=frames), stored
        else:
            payload, syntax = _native_frame(ds, index, frames), stored
        out.append(Frame(number, choice.media_type, syntax, bytes(payload)))
    return out
