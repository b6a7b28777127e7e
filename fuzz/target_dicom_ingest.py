"""DICOM ingest without a network: what medd.ingest.Ingest does with the bytes
of a C-STORE, a STOW-RS part or a watched file before it indexes them
(size limit, Part 10 parse and checks, inflated-size limit, blob, index record).

Invariant: only Refused escapes; what is accepted is stored byte for byte and
has valid identifying UIDs. The inflated-size limit is held by the run's
-rss_limit_mb: MAX_SIZE is 1 MB, so a deflate bomb that got through would
cost far more than the limit.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile

from medd.ingest import Ingest, Refused
from medd.objects import classify, is_valid_uid
from medd.storage.blobstore import FileBlobStore
from medd.storage.index import ObjectRecord

from fuzz import seeds

MAX_SIZE = 1024 * 1024
_root = tempfile.mkdtemp(prefix="medd-fuzz-blobs-")
atexit.register(shutil.rmtree, _root, True)


def _no_status(event):
    raise AssertionError("a bare DICOM object is never a status message")


# No reactor, index or plugins are used on this path: in a node it runs on the parsing pool.
_ingest = Ingest(None, None, FileBlobStore(_root), None, max_object_size=MAX_SIZE, record_status=_no_status)


def check(data: bytes) -> None:
    try:
        _ingest._check_size(data, "fuzz")
        content, blob = _ingest._parse_and_put(data)
    except Refused as e:
        assert e.reason and e.kind in ("invalid", "too-large"), (e.kind, e.reason)
        return
    keyinfo = content.keyinfo
    assert _ingest.blobs.get(blob.digest) == content.data
    for uid in (keyinfo.sop_instance_uid, keyinfo.sop_class_uid, keyinfo.study_instance_uid,
                keyinfo.series_instance_uid, keyinfo.transfer_syntax_uid):
        assert is_valid_uid(uid), uid
    ObjectRecord.from_keyinfo(keyinfo, object_type=classify(keyinfo), media_type=content.media_type,
                              digest=blob.digest, size=blob.size, origin="fuzz", transport="fuzz", received_at=0.0)
    _ingest.blobs.delete(blob.digest)


def seed_inputs() -> dict[str, bytes]:
    return seeds.dicom_files()
