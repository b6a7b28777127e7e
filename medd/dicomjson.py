"""WADO-RS metadata: a stored object's DICOM JSON (PS3.18 F.2) without its
pixel data, as served by DICOMweb and kept in the viewer's metadata cache."""
from __future__ import annotations

import io
import json

import pydicom


def metadata_of(data: bytes) -> dict:
    """Blocking: the dicom+json of a stored object, without its pixel data."""
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    document = ds.to_json_dict(suppress_invalid_tags=True)
    # The stored transfer syntax, which viewers read to decode the frames (PS3.18 F.2.7).
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax:
        document["00020010"] = {"vr": "UI", "Value": [str(syntax)]}
    return document


def metadata_json(data: bytes) -> bytes:
    """Blocking: :func:`metadata_of` encoded as JSON."""
    return json.dumps(metadata_of(data)).encode("utf-8")
