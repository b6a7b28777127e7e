"""The package parser (medd.package.read_package) as every package receiver calls it.

Invariant: only InvalidObject escapes; what is accepted names a registered
object type, one origin and one destination, and (for DICOM) valid UIDs.
"""
from __future__ import annotations

from medd.objects import InvalidObject, is_valid_uid
from medd.package import ATTACHMENT_PARAMS, read_package
from medd.plugins.host import load_plugins

from fuzz import seeds

MAX_SIZE = 1024 * 1024
_object_type = load_plugins().object_type


def check(data: bytes) -> None:
    try:
        package = read_package(data, _object_type, MAX_SIZE)
    except InvalidObject as e:
        assert e.reason, "a refusal says why"
        return
    assert package.attachment.type in ATTACHMENT_PARAMS, package.attachment
    assert package.origin and package.destination and package.message_id
    assert len(package.content.data) <= MAX_SIZE or package.content.is_dicom
    if package.content.is_dicom:
        keyinfo = package.content.keyinfo
        for uid in (keyinfo.sop_instance_uid, keyinfo.study_instance_uid, keyinfo.series_instance_uid):
            assert is_valid_uid(uid), uid


def seed_inputs() -> dict[str, bytes]:
    return seeds.multiparts()
