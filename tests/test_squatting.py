"""Identifiers cannot be squatted (issue 9, finding 8): a SOP Instance UID or a Message-ID already
held for another origin, or with other content, is refused as a conflict and recorded for the
administrator; no refused object leaves its blob behind, and the hourly sweep removes old blobs no
row references."""
from __future__ import annotations

import os

import pytest_twisted
import requests
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE
from sqlalchemy import insert
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

from medd.blobsweep import BlobSweep
from medd.ingest import Refused
from medd.objects import parse_part10
from medd.package import build_package
from medd.plugins.objecttypes import ImageType
from medd.storage import index
from medd.storage.blobstore import FileBlobStore
from medd.storage.database import Database
from medd.storage.index import ObjectIndex
from medd.storage.viewer_tables import viewer_outgoing
from tests.conftest import bearer, centre_token, listener_port, testdata


def _blob_files(node):
    return sorted(p.name for p in (node.config.storage_path / "blobs").rglob("*") if p.is_file())


async def _only_unreferenced_added(node, before: list[str]) -> None:
    """Whatever a refused store wrote is referenced by no row: the blob sweep will remove it
    (a refusal no longer deletes it at once: an identical put may be indexing it)."""
    added = sorted(set(_blob_files(node)) - set(before))
    assert len(added) == 1
    assert await node.index.unreferenced(added) == set(added)


def _cstore(port: int, ds, calling: str):
    """Blocking: one C-STORE of ``ds`` as ``calling``; its status and error comment."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDD")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
        return status.Status, status.get("ErrorComment")
    finally:
        assoc.release()


def _package(origin: str, message_id: str, name: str = "CT_small.dcm") -> tuple[bytes, str]:
    content = parse_part10(testdata(name))
    data = build_package(content, ImageType().identifier(content), origin=origin,
                         destination="viewer@central.test", message_id=message_id)
    return data, content.keyinfo.sop_instance_uid


@pytest_twisted.ensureDeferred
async def test_cstore_uid_squatted_by_another_ae_is_a_conflict(make_central):
    """Finding 8: an unknown AE stores a SOP Instance UID first, then the real centre sends its
    object under it. The centre is told 0xA900 with a reason (not Success over the squatter's
    copy), the conflict is recorded, the first holder is untouched and no row keeps the centre's
    bytes (the blob sweep takes them)."""
    node = await make_central({"dicom": "tcp:0:interface=127.0.0.1"})
    port = listener_port(node, "dicom")
    squatter = dcmread(get_testdata_file("CT_small.dcm"))
    squatter.PatientName = "SQUATTER^FAKE"
    real = dcmread(get_testdata_file("CT_small.dcm"))
    assert await deferToThread(_cstore, port, squatter, "INTRUDER") == (0x0000, None)
    before = _blob_files(node)
    status, comment = await deferToThread(_cstore, port, real, "CT1")
    assert status == 0xA900
    assert "already held for another origin" in comment
    record = await node.index.object_by_uid(real.SOPInstanceUID)
    assert record.origin == "INTRUDER"
    await _only_unreferenced_added(node, before)
    [conflict] = await node.index.conflicts()
    assert (conflict.identifier, conflict.origin, conflict.held_by, conflict.transport) == (
        "uid", "CT1", "INTRUDER", "dicom")
    assert conflict.sop_instance_uid == real.SOPInstanceUID


@pytest_twisted.ensureDeferred
async def test_cstore_same_ae_other_content_is_a_conflict_same_content_idempotent(make_central):
    """The same AE resending the same object gets Success again (idempotent); other content under
    the UID it holds is a conflict, not a silent Success that keeps the first version."""
    node = await make_central({"dicom": "tcp:0:interface=127.0.0.1"})
    port = listener_port(node, "dicom")
    first = dcmread(get_testdata_file("CT_small.dcm"))
    assert await deferToThread(_cstore, port, first, "CT1") == (0x0000, None)
    assert await deferToThread(_cstore, port, first, "CT1") == (0x0000, None)
    changed = dcmread(get_testdata_file("CT_small.dcm"))
    changed.PatientName = "OTHER^NAME"
    status, comment = await deferToThread(_cstore, port, changed, "CT1")
    assert status == 0xA900 and "other content" in comment
    files = _blob_files(node)
    assert len(set(files) - await node.index.unreferenced(files)) == 1  # only the first content is kept
    assert [c.identifier for c in await node.index.conflicts()] == ["uid"]


@pytest_twisted.ensureDeferred
async def test_http_package_uid_squatted_is_409(make_central):
    """Over POST /packages, an object whose UID another origin holds is 409 problem JSON of kind
    conflict; resending the holder's own package stays 200 created:false. The squatter is a registered
    centre (nothing anonymous is taken), each centre sends with its own token. The administrator sees
    the conflict at GET /api/conflicts; nobody else does."""
    node = await make_central({"http": "tcp:0:interface=127.0.0.1"})
    url = f"http://127.0.0.1:{listener_port(node, 'http')}/packages"
    squatter = bearer(await centre_token(node, "evil", "attacker@evil.example"), **{"Content-Type": "message/rfc822"})
    centre = bearer(await centre_token(node, "centre-a", "ct1@centre-a.example"), **{"Content-Type": "message/rfc822"})
    squat, uid = _package("attacker@evil.example", "<a-1@evil.example>")
    real, _ = _package("ct1@centre-a.example", "<c-1@centre-a.example>")
    first = await deferToThread(requests.post, url, data=squat, headers=squatter, timeout=30)
    assert first.status_code == 201 and first.json()["created"] is True
    again = await deferToThread(requests.post, url, data=squat, headers=squatter, timeout=30)
    assert again.status_code == 200 and again.json()["created"] is False
    refused = await deferToThread(requests.post, url, data=real, headers=centre, timeout=30)
    assert refused.status_code == 409
    assert refused.headers["Content-Type"].startswith("application/problem+json")
    assert refused.json()["type"] == "urn:medd:problem:conflict"
    assert uid in refused.json()["detail"]
    assert [(c.origin, c.held_by) for c in await node.index.conflicts()] == [
        ("ct1@centre-a.example", "attacker@evil.example")]
    api = f"http://127.0.0.1:{listener_port(node, 'http')}/api/conflicts"
    assert (await deferToThread(requests.get, api, timeout=30)).status_code == 401
    token = await node.central_storage.directory.add_admin("alice")
    listed = await deferToThread(requests.get, api, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert listed.status_code == 200
    [entry] = listed.json()
    assert (entry["identifier"], entry["sop_instance_uid"], entry["origin"], entry["held_by"]) == (
        "uid", uid, "ct1@centre-a.example", "attacker@evil.example")


@pytest_twisted.ensureDeferred
async def test_message_id_from_another_origin_is_a_conflict(make_central):
    """Finding 8: an attacker's package takes the centre's Message-ID first. The centre's package is
    refused as a conflict (not "already stored" with its object never indexed), the attacker's row
    is untouched, and no row keeps the centre's bytes (the blob sweep takes them)."""
    node = await make_central()
    squat, squat_uid = _package("attacker@evil.example", "<pkg-7@centre-a.example>", "MR_small.dcm")
    real, real_uid = _package("ct1@centre-a.example", "<pkg-7@centre-a.example>", "CT_small.dcm")
    await node.ingest.receive_package(squat, transport="test")
    before = _blob_files(node)
    try:
        await node.ingest.receive_package(real, transport="test")
    except Refused as e:
        assert e.kind == "conflict" and "Message-ID" in e.reason
    else:
        raise AssertionError("a Message-ID held by another origin was accepted")
    assert await node.index.object_by_uid(real_uid) is None
    assert (await node.index.object_by_uid(squat_uid)).origin == "attacker@evil.example"
    await _only_unreferenced_added(node, before)
    [conflict] = await node.index.conflicts()
    assert (conflict.identifier, conflict.message_id, conflict.held_by) == (
        "message-id", "<pkg-7@centre-a.example>", "attacker@evil.example")
    # The same package resent by its own origin is still a duplicate, not a conflict.
    assert (await node.ingest.receive_package(squat, transport="test")).created is False


def _touch(path, when: float) -> None:
    os.utime(path, (when, when))


@pytest_twisted.ensureDeferred
async def test_sweep_removes_only_old_unreferenced_blobs(tmp_path):
    """The sweep, at start and then hourly on the injected clock, removes a blob no row references
    once it is older than an hour, and keeps a referenced one (by objects or by another table's
    digest column, here the viewer's outgoing packages) however old, an unreferenced one younger
    than an hour, and an old one an ingest has written and not yet committed (it will be referenced)."""
    from twisted.internet import reactor

    db = Database(reactor, f"sqlite:///{tmp_path / 'index.sqlite'}")
    db.create_schema()
    db.start()
    try:
        clock = Clock()
        now = 2_000_000_000.0
        clock.advance(now)
        blobs = FileBlobStore(tmp_path / "store")
        idx = ObjectIndex(db, clock)
        orphan, young, indexed, outgoing, pinned = (blobs.put(f"blob {n}".encode()) for n in range(5))
        for ref in (orphan, indexed, outgoing, pinned):
            _touch(blobs.path(ref.digest), now - 2 * 3600)
        _touch(blobs.path(young.digest), now - 600)  # ten minutes old at the first pass
        record = index.ObjectRecord(
            sop_instance_uid="1.2.3.4", object_type="report", media_type="text/plain", study_instance_uid="1.2.3",
            digest=indexed.digest, size=indexed.size, origin="a@b.example", transport="test",
            received_at=idx.now())
        await idx.store_object(record)
        await db.run(lambda c: c.execute(insert(viewer_outgoing).values(
            message_id="<o@v>", attachment="report; uid=1.2.3.5", uid="1.2.3.5", digest=outgoing.digest,
            state="waiting", attempts=0, next_attempt_at=idx.now(), created_at=idx.now())))

        sweep = BlobSweep(clock, idx, blobs, deferToThread, writing=lambda: frozenset({pinned.digest}))
        passes = []
        real_sweep = sweep.sweep
        sweep.sweep = lambda: passes.append(real_sweep()) or passes[-1]
        sweep.startService()
        try:
            assert len(passes) == 1  # one pass at start: what a crash left goes at once
            await passes[0]  # (LoopingCall takes its result; the blobs tell what it did)
            assert not blobs.exists(orphan.digest)
            assert all(blobs.exists(r.digest) for r in (young, indexed, outgoing, pinned))
            clock.advance(3599)
            assert len(passes) == 1  # the next one an hour later
            clock.advance(1)
            assert len(passes) == 2
            await passes[1]
            assert not blobs.exists(young.digest)  # older than an hour by now
            assert all(blobs.exists(r.digest) for r in (indexed, outgoing, pinned))
        finally:
            sweep.stopService()
    finally:
        db.stop()
