"""The lifetime archive: tar volumes by imaging centre and modality, catalogue, verify,
retention and restore, crash safety."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import tarfile
from datetime import timedelta
from io import BytesIO
from pathlib import Path

import pytest
import pytest_twisted
from pydicom import dcmread
from pydicom.uid import generate_uid
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from zope.interface.verify import verifyObject

from medd.config import ConfigError, load_config
from medd.plugins.interfaces import IArchive
from medd.service import check_against_plugins, make_node
from medd.plugins.host import load_plugins
from medd.storage import catalogue, index
from medd.storage.archive import Placement, TapeArchive, slug
from medd.storage.catalogue import Catalogue
from medd.storage.database import open_database, resolved
from medd.storage.index import ObjectIndex, ObjectRecord
from medd.storage.routing_tables import routing_decisions
from tests.conftest import testdata, write_config

REPO = Path(__file__).resolve().parent.parent
MEDD = [sys.executable, "-m", "medd.cli"]

# (registered centre, pydicom test file): three centres, six modalities.
CORPUS = [
    ("CT_SCANNER_A", "CT_small.dcm"),
    ("CT_SCANNER_A", "CT_small.dcm"),
    ("CT_SCANNER_A", "MR_small.dcm"),
    ("centre-b", "MR_small.dcm"),
    ("centre-b", "JPEG2000.dcm"),
    ("centre-b", "SC_rgb_rle.dcm"),
    ("Centre C / Room 2", "rtplan.dcm"),
    ("Centre C / Room 2", "rtdose.dcm"),
    ("Centre C / Room 2", "JPEG-lossy.dcm"),
]


def variant(name: str, n: int, study_uid: str | None = None) -> bytes:
    """A pydicom test file under a new SOP Instance UID (several test files share one)."""
    ds = dcmread(BytesIO(testdata(name)))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[name, str(n)])
    if study_uid:
        ds.StudyInstanceUID = study_uid
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def archive_config(tmp_path: Path, archive_dir: Path | None = None, extra: str = "", volume_size: str = "64K") -> Path:
    archive_dir = archive_dir or tmp_path / "archive"
    return write_config(
        tmp_path,
        extra=f"""
[archive]
backend = tape
path = {archive_dir}
volume_size = {volume_size}
interval = 600
{extra}
""",
    )


# 2026-01-01 00:00 UTC: where the fake clocks start, so stamps look like stamps.
START = 1_767_225_600


@pytest.fixture
def archive_node(tmp_path):
    """Factory: a central node with a tape archive whose stamps, interval and retention
    run on a fake clock (``node.clock``)."""
    from twisted.internet import reactor

    started = []

    async def start(extra: str = "", archive_dir: Path | None = None, create_dir: bool = True, volume_size: str = "64K"):
        if create_dir:
            (archive_dir or tmp_path / "archive").mkdir(exist_ok=True)
        config = load_config(archive_config(tmp_path, archive_dir, extra, volume_size))
        clock = Clock()
        clock.advance(START)
        node = make_node(reactor, config, clock=clock)
        node.startService()
        started.append(node)
        # The pass at start is over before a test ingests: what it reports is the test's own.
        await node.archiving.idle()
        return node

    yield start
    for node in started:
        pytest_twisted.blockon(node.stopService())


def _ae(centre: str) -> str:
    return "AE" + str(sum(centre.encode()))  # one calling AE title per centre of the corpus


async def ingest_corpus(node, corpus=CORPUS, study_uid: str | None = None) -> dict[str, tuple[str, str]]:
    """Register each centre (by a calling AE title), ingest each (centre, file) as from that title and
    route it (volumes go by the registered centre); {uid: (centre, modality)}."""
    stored = {}
    for n, (centre, name) in enumerate(corpus):
        await node.central_storage.directory.add_centre(centre, aes=[_ae(centre)])
        result = await node.ingest.receive_dicom(variant(name, n, study_uid), transport="dicom", origin=_ae(centre))
        record = await node.database.run(lambda c: index.object_by_uid(c, result.uid))
        stored[result.uid] = (centre, record.modality)
    await node.routing.kick()
    return stored


def tar_list(path: Path) -> list[str]:
    out = subprocess.run(["tar", "-tf", str(path)], capture_output=True, text=True, check=True)
    assert out.stderr == ""
    return out.stdout.split()


def medd_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*MEDD, *args], capture_output=True, text=True, cwd=REPO)


async def catalogue_state(node):
    volumes = await node.archiving.catalogue.find_volumes()
    members = {v.path: await node.archiving.catalogue.volume_members(v.id) for v in volumes}
    return volumes, members


def test_catalogue_connector_stamps_from_its_clock(tmp_path, db_url):
    """The Catalogue connector, on SQLite and PostgreSQL: volumes and members are stamped by the
    injected clock, minimum age and retention are measured on it, only a closed volume moves
    off site, and a blob is evictable only once verified-archived and old enough."""
    config = load_config(write_config(tmp_path, db_url=db_url))
    database = open_database(config)
    clock = Clock()
    clock.advance(START)
    cat, objects = Catalogue(database, clock), ObjectIndex(database, clock)
    try:
        for n in (1, 2):
            record = ObjectRecord(
                sop_instance_uid=f"1.2.3.{n}", object_type="image", media_type="application/dicom",
                study_instance_uid="1.2.3", digest=f"{n:064x}", size=100, origin="ct1@centre-a.example",
                transport="test", received_at=objects.now(), modality="CT",
            )
            resolved(objects.store_object(record))
        assert resolved(cat.pending_objects(0, 10)) == []  # not yet routed: its centre is not decided
        for n in (1, 2):
            resolved(database.run(lambda c: c.execute(routing_decisions.insert().values(
                uid=f"1.2.3.{n}", centre=None, outcome="quarantined", decided_at=objects.now()))))
        assert resolved(cat.pending_objects(0, 10, min_age=timedelta(hours=1))) == []
        clock.advance(3600)
        pending = resolved(cat.pending_objects(0, 10, min_age=timedelta(hours=1), modalities=("CT",)))
        assert [p.sop_instance_uid for p in pending] == ["1.2.3.1", "1.2.3.2"]
        assert {p.centre for p in pending} == {catalogue.UNREGISTERED}

        volume = resolved(cat.open_volume("ct1@centre-a.example", "CT"))
        assert volume.created_at.timestamp() == START + 3600 and volume.state == catalogue.OPEN
        clock.advance(5)
        placed = [
            (p.sop_instance_uid, p.digest, Placement(f"{p.sop_instance_uid}.dcm", 1536 * i, 1536 * i + 512, 100, p.digest, 1536 * (i + 1)))
            for i, p in enumerate(pending)
        ]
        resolved(cat.record_append(volume, placed[:1], verified=True))
        with pytest.raises(catalogue.CatalogueConflict):  # stale volume: its size moved on
            resolved(cat.record_append(volume, placed[1:], verified=False))
        assert not resolved(cat.move_offsite(volume.path))  # still open
        (volume,) = resolved(cat.open_volumes())
        resolved(cat.record_append(volume, placed[1:], verified=False))
        (volume,) = resolved(cat.find_volumes(path=volume.path))
        resolved(cat.record_close(volume, 4096, "c" * 64))
        (closed,) = resolved(cat.find_volumes(centre="ct1@centre-a.example"))
        assert closed.state == catalogue.CLOSED and closed.closed_at.timestamp() == START + 3605

        first, second = sorted(resolved(cat.archived_by_uid(["1.2.3.1", "1.2.3.2"])), key=lambda a: a.sop_instance_uid)
        assert first.archived_at.timestamp() == START + 3605 and first.verified_at is not None
        assert second.verified_at is None
        assert resolved(cat.evictable(timedelta(days=1), 10)) == []
        clock.advance(86400)
        assert [a.sop_instance_uid for a in resolved(cat.evictable(timedelta(days=1), 10))] == ["1.2.3.1"]
        resolved(cat.mark_evicted([first.digest]))
        (evicted,) = resolved(cat.archived_by_uid(["1.2.3.1"]))
        assert evicted.evicted_at.timestamp() == clock.seconds()
        assert resolved(cat.archived_by_digest(first.digest)).sop_instance_uid == "1.2.3.1"
        assert resolved(cat.study_uids("1.2.3")) == ["1.2.3.1", "1.2.3.2"]

        assert resolved(cat.move_offsite(closed.path))
        assert resolved(cat.find_volumes(path=closed.path))[0].state == catalogue.OFFSITE
        assert not resolved(cat.move_offsite("no/such/vol-000001.tar"))
    finally:
        database.stop()


def test_tape_backend_provides_iarchive(tmp_path):
    """The built-in tape backend provides every method of IArchive."""
    verifyObject(IArchive, TapeArchive(tmp_path))


def test_slugs_are_safe_and_distinct():
    """Centre and modality folders never carry raw wire data and never merge two names."""
    assert slug("CT_SCANNER_A") == "CT_SCANNER_A"
    for name in ("../../etc", "Centre C / Room 2", "ct1@a.example", "", ".", "..", "x" * 300):
        s = slug(name)
        assert "/" not in s and s not in ("", ".", "..") and not s.startswith(".") and len(s) < 64
    assert slug("Centre C/Room 2") != slug("Centre C Room 2")


def test_config_errors_name_section_and_key(tmp_path):
    """A bad [archive] or [retention] value is refused at start with file, section and key."""
    path = archive_config(tmp_path, extra="batch_objects = many\n[retention]\nevict_after_days = soon\n")
    config = load_config(path)
    with pytest.raises(ConfigError) as e:
        check_against_plugins(config, load_plugins())
    text = str(e.value)
    assert f"{path}: [archive] batch_objects" in text
    assert f"{path}: [retention] evict_after_days" in text


@pytest_twisted.ensureDeferred
async def test_mixed_corpus_layout_and_tar_listing(archive_node, tmp_path):
    """Objects from several centres and modalities land in <centre>/<modality>/vol-NNNNNN.tar,
    volumes close at the configured size, and plain tar lists exactly the catalogue."""
    node = await archive_node()
    stored = await ingest_corpus(node)
    report = await node.archiving.run_once()
    assert report.paused is None and report.archived == len(stored)

    volumes, members = await catalogue_state(node)
    catalogued = {m.sop_instance_uid: (v, m) for v in volumes for m in members[v.path]}
    assert set(catalogued) == set(stored)
    for uid, (centre, modality) in stored.items():
        volume, member = catalogued[uid]
        assert volume.centre == centre and volume.modality == modality
        assert volume.path.startswith(f"{slug(centre, empty='centre')}/{slug(modality, empty='no-modality')}/vol-")
        assert member.member_name == f"{uid}.dcm"
        assert member.verified_at is not None

    # Two 39 KB CT objects do not fit one 64 KB volume: the first volume was closed.
    ct = sorted((v for v in volumes if v.centre == "CT_SCANNER_A" and v.modality == "CT"), key=lambda v: v.sequence)
    assert [v.path.rsplit("/", 1)[1] for v in ct] == ["vol-000001.tar", "vol-000002.tar"]
    assert ct[0].state == catalogue.CLOSED and ct[0].checksum and ct[1].state == catalogue.OPEN

    root = tmp_path / "archive"
    on_disk = sorted(str(p.relative_to(root)) for p in root.rglob("*.tar"))
    assert on_disk == sorted(v.path for v in volumes)
    for v in volumes:
        assert tar_list(root / v.path) == [m.member_name for m in members[v.path]]
        assert (root / v.path).stat().st_size == v.size
        with tarfile.open(root / v.path) as tf:
            for m in members[v.path]:
                info = tf.getmember(m.member_name)
                assert f"uid={m.sop_instance_uid}" in info.pax_headers["comment"]
                assert tf.extractfile(info).read() == node.blobs.get(m.digest)


@pytest_twisted.ensureDeferred
async def test_offsite_moves_closed_volumes_only(archive_node, tmp_path, capsys):
    """`medd archive offsite` records a closed volume as off site and refuses an open one
    (exit 1, naming it); verify then leaves the off-site volume alone."""
    from argparse import Namespace

    from medd.cli.archive import cmd_offsite

    node = await archive_node()
    await ingest_corpus(node, CORPUS[:2])  # two CT objects: the first volume closes
    await node.archiving.run_once()
    closed, open_ = sorted(await node.archiving.catalogue.find_volumes(), key=lambda v: v.sequence)
    config = str(tmp_path / "central.ini")
    status = await deferToThread(cmd_offsite, Namespace(config=config, volume=[closed.path, open_.path]))
    out = capsys.readouterr()
    assert status == 1 and f"{closed.path}: offsite" in out.out and f"{open_.path}: not a closed volume" in out.err
    states = {v.path: v.state for v in await node.archiving.catalogue.find_volumes()}
    assert states == {closed.path: catalogue.OFFSITE, open_.path: catalogue.OPEN}
    assert [r.volume for r in await node.archiving.verify()] == [open_.path]


@pytest_twisted.ensureDeferred
async def test_interval_archives_new_objects(archive_node):
    """The background pass runs on the injected clock, ``interval`` seconds after the last
    one ended, and picks up objects ingested since; stamps come from that clock."""
    node = await archive_node()
    clock, archiving = node.clock, node.archiving
    stored = await ingest_corpus(node, CORPUS[:2])
    clock.advance(599)
    await archiving.idle()
    assert await archiving.catalogue.archived_by_uid(list(stored)) == []
    clock.advance(1)
    await archiving.idle()  # the pass the clock started
    archived = await archiving.catalogue.archived_by_uid(list(stored))
    assert len(archived) == 2
    assert {a.archived_at.timestamp() for a in archived} == {START + 600}


@pytest_twisted.ensureDeferred
async def test_verify_names_the_corrupted_object(archive_node, tmp_path):
    """A flipped byte inside a member makes `medd archive verify` name that object and exit non-zero."""
    node = await archive_node()
    stored = await ingest_corpus(node)
    await node.archiving.run_once()
    volumes, members = await catalogue_state(node)
    assert all(r.ok for r in await node.archiving.verify())

    victim = members[volumes[0].path][0]
    path = tmp_path / "archive" / volumes[0].path
    with open(path, "r+b") as f:
        f.seek(victim.data_offset + victim.size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))

    out = await deferToThread(medd_cli, "archive", "verify", "--config", str(tmp_path / "central.ini"))
    assert out.returncode == 1, out.stderr
    assert f"bad object {victim.sop_instance_uid}" in out.stdout
    bad_lines = [line for line in out.stdout.splitlines() if "bad object" in line]
    assert len(bad_lines) == 1
    damaged = await node.archiving.catalogue.find_volumes(path=volumes[0].path)
    assert damaged[0].state == catalogue.DAMAGED
    # The damaged copy no longer counts as verified, so retention keeps the working copy.
    again = await node.archiving.catalogue.archived_by_uid([victim.sop_instance_uid])
    assert again[0].verified_at is None
    assert len(stored) == len(CORPUS)


@pytest_twisted.ensureDeferred
async def test_offline_target_pauses_and_resumes(archive_node, tmp_path):
    """A missing archive target pauses archiving with a clear error; once it is back, everything is archived."""
    target = tmp_path / "not-mounted"
    node = await archive_node(archive_dir=target, create_dir=False)
    stored = await ingest_corpus(node)
    report = await node.archiving.run_once()
    assert report.paused and "not there" in report.paused and str(target) in report.paused
    assert node.archiving.paused
    assert await node.archiving.catalogue.archived_by_uid(list(stored)) == []
    assert not target.exists()  # never created beneath a missing mount

    target.mkdir()
    node.clock.advance(600)  # the next interval tries again
    await node.archiving.idle()
    assert node.archiving.paused is None
    assert len(await node.archiving.catalogue.archived_by_uid(list(stored))) == len(stored)


@pytest_twisted.ensureDeferred
async def test_full_target_pauses_loses_nothing_and_resumes(archive_node, tmp_path):
    """A disk-full error in the middle of an append pauses archiving; the torn tail is
    dropped on the next pass and every object ends up archived once."""
    node = await archive_node()
    stored = await ingest_corpus(node)
    archive = node.archiving.archive
    real_write = archive._write
    calls = [0]

    def full_after_a_while(fd, data):
        calls[0] += 1
        if calls[0] == 8:
            real_write(fd, data[: len(data) // 3])
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(fd, data)

    archive._write = full_after_a_while
    report = await node.archiving.run_once()
    assert report.paused and "No space left" in report.paused
    volumes, members = await catalogue_state(node)
    torn = [v for v in volumes if (tmp_path / "archive" / v.path).stat().st_size > v.size]
    assert len(torn) == 1  # the half-written member is on disk but not catalogued

    archive._write = real_write
    report = await node.archiving.run_once()
    assert report.paused is None and node.archiving.paused is None
    volumes, members = await catalogue_state(node)
    uids = [m.sop_instance_uid for ms in members.values() for m in ms]
    assert sorted(uids) == sorted(stored)
    for v in volumes:
        assert tar_list(tmp_path / "archive" / v.path) == [m.member_name for m in members[v.path]]
    assert all(r.ok for r in await node.archiving.verify())


@pytest.mark.parametrize("mode", ["torn", "loop"])
@pytest_twisted.ensureDeferred
async def test_kill_during_append_recovers(archive_node, tmp_path, mode):
    """A SIGKILL while a process appends leaves, after restart, a volume tar reads
    and a catalogue that lists exactly its members; nothing ingested is left unarchived.

    ``torn`` kills the child while it hangs half-way through a member;
    ``loop`` kills it at whatever point it has reached after a few batches.
    """
    (tmp_path / "archive").mkdir()
    config_path = archive_config(tmp_path, volume_size="1M")
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.archive_crash_child", str(config_path), mode],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        want = "torn" if mode == "torn" else "committed 5"
        seen = await deferToThread(_read_until, child.stdout, want)
        assert want in seen
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL

    volume = next((tmp_path / "archive").rglob("*.tar"))
    if mode == "torn":
        # The child died with part of a member written past the catalogued end.
        with pytest.raises(subprocess.CalledProcessError):
            subprocess.run(["tar", "-tf", str(volume)], capture_output=True, check=True)

    node = await archive_node(volume_size="1M")  # the restart: recovery runs before the first pass
    report = await node.archiving.run_once()
    assert report.paused is None
    volumes, members = await catalogue_state(node)
    for v in volumes:
        assert tar_list(tmp_path / "archive" / v.path) == [m.member_name for m in members[v.path]]
        assert (tmp_path / "archive" / v.path).stat().st_size == v.size
    assert all(r.ok for r in await node.archiving.verify())
    total = await node.database.run(index.count_objects)
    assert sum(len(ms) for ms in members.values()) == total


def _read_until(stream, want: str) -> str:
    seen = []
    for line in stream:
        seen.append(line)
        if line.strip() == want:
            break
    return "".join(seen)


@pytest_twisted.ensureDeferred
async def test_evict_then_restore(archive_node, tmp_path):
    """Retention evicts only verified-archived objects, and only once they are older (on the
    node's clock) than evict_after_days; a viewer's read brings an evicted blob back by itself,
    and `medd archive restore --study` brings back a study."""
    node = await archive_node(extra="modalities = CT MR\n[retention]\nevict_after_days = 30\n")
    study = generate_uid()
    stored = await ingest_corpus(node, study_uid=study)
    report = await node.archiving.run_once()
    records = {uid: await node.database.run(lambda c: index.object_by_uid(c, uid)) for uid in stored}
    archived = {uid for uid, (_, modality) in stored.items() if modality in ("CT", "MR")}
    assert report.archived == len(archived) and report.evicted == 0

    node.clock.advance(timedelta(days=30).total_seconds() - 1)  # interval passes, none old enough yet
    await node.archiving.idle()
    assert all(node.blobs.exists(r.digest) for r in records.values())
    node.clock.advance(600)
    await node.archiving.idle()
    evicted = await node.archiving.catalogue.archived_by_uid(sorted(archived))
    assert {a.evicted_at.timestamp() for a in evicted} == {node.clock.seconds()}
    for uid, record in records.items():
        # Not archived (rule: CT and MR only) means never evicted.
        assert node.blobs.exists(record.digest) == (uid not in archived)

    uid = sorted(archived)[0]
    data = await node.ingest.read_blob(records[uid].digest)
    assert data == variant_bytes_of(records[uid], data)
    assert node.blobs.exists(records[uid].digest)
    restored = await node.archiving.catalogue.archived_by_uid([uid])
    assert restored[0].evicted_at is None

    out = await deferToThread(medd_cli, "archive", "restore", "--study", study, "--config", str(tmp_path / "central.ini"))
    assert out.returncode == 0, out.stderr
    assert all(node.blobs.exists(records[u].digest) for u in archived)
    assert sorted(line.split()[1] for line in out.stdout.splitlines()) == sorted(archived)

    out = await deferToThread(medd_cli, "archive", "list", "--centre", "CT_SCANNER_A", "--config", str(tmp_path / "central.ini"))
    assert out.returncode == 0
    assert "CT_SCANNER_A/CT/vol-000001.tar" in out.stdout and "centre-b" not in out.stdout


def variant_bytes_of(record, data: bytes) -> bytes:
    """The restored bytes must hash to the object's digest."""
    import hashlib

    assert hashlib.sha256(data).hexdigest() == record.digest
    return data


@pytest_twisted.ensureDeferred
async def test_corrupt_working_copy_is_not_archived(archive_node, tmp_path):
    """A working copy that no longer hashes to its digest is reported and left out; the rest
    of its batch is archived and the volume lists exactly the catalogue."""
    node = await archive_node()
    stored = await ingest_corpus(node, CORPUS[:3])
    victim = sorted(stored)[0]
    record = await node.database.run(lambda c: index.object_by_uid(c, victim))
    path = node.blobs.path(record.digest)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))

    report = await node.archiving.run_once()
    assert report.skipped == [victim] and report.archived == len(stored) - 1
    volumes, members = await catalogue_state(node)
    assert victim not in {m.sop_instance_uid for ms in members.values() for m in ms}
    for v in volumes:
        assert tar_list(tmp_path / "archive" / v.path) == [m.member_name for m in members[v.path]]


@pytest_twisted.ensureDeferred
async def test_volumes_are_filed_by_the_registered_centre(archive_node, tmp_path):
    """Two centres, each sending from two calling AE titles, fill exactly two centre folders; an overlay made
    by a viewer on one centre's study goes under that centre, an object of no registered centre under
    `unregistered`. A volume filed under an AE title before (never rewritten) is found by `medd archive list
    --centre NAME` along with the centre's new ones."""
    from medd.objects import parse_part10
    from medd.package import build_package
    from medd.plugins.objecttypes import OverlayType
    from tests.test_ingest import _gsps_for

    node = await archive_node(volume_size="1G")
    directory = node.central_storage.directory
    await directory.add_centre("centre-a", aes=["CTA1", "CTA2"])
    await directory.add_centre("centre-b", aes=["MRB1", "MRB2"])
    # The viewer whose overlay comes back, authenticated by its token.
    viewer = await directory.add_viewer("dr@viewers.example", None, ["centre-a"])
    # Before volumes went by the registered centre, centre-a's objects were filed under the AE title.
    old = await node.archiving.catalogue.open_volume("CTA1", "CT")

    sent = [("CTA1", "CT_small.dcm"), ("CTA2", "CT_small.dcm"), ("MRB1", "MR_small.dcm"), ("MRB2", "MR_small.dcm"),
            ("STRANGER", "CT_small.dcm")]
    uids = {}
    for n, (ae, name) in enumerate(sent):
        data = variant(name, 100 + n)
        uids[ae] = (await node.ingest.receive_dicom(data, transport="dicom", origin=ae)).uid
        if ae == "CTA1":
            first_image = data
    overlay = parse_part10(_gsps_for(first_image))
    await node.ingest.receive_package(build_package(overlay, OverlayType().identifier(overlay), origin="dr@viewers.example",
                                                    destination="central.test"), transport="http",
                                      credentials=viewer.token)
    await node.routing.kick()
    report = await node.archiving.run_once()
    assert report.archived == len(sent) + 1

    folders = {v.path.split("/")[0] for v in await node.archiving.catalogue.find_volumes() if v.path != old.path}
    assert folders == {"centre-a", "centre-b", catalogue.UNREGISTERED}
    filed = {a.sop_instance_uid: a.volume for a in await node.archiving.catalogue.find_archived()}
    for ae in ("CTA1", "CTA2"):
        assert filed[uids[ae]].startswith("centre-a/")
    for ae in ("MRB1", "MRB2"):
        assert filed[uids[ae]].startswith("centre-b/")
    assert filed[uids["STRANGER"]].startswith("unregistered/")
    assert filed[overlay.keyinfo.sop_instance_uid].startswith("centre-a/")

    listed = {v.path for v in await node.archiving.catalogue.find_volumes(centre="centre-a")}
    assert old.path in listed and all(p == old.path or p.startswith("centre-a/") for p in listed)
    out = await deferToThread(medd_cli, "archive", "list", "--centre", "centre-a", "--config", str(tmp_path / "central.ini"))
    assert out.returncode == 0, out.stderr
    assert old.path in out.stdout and "centre-a/CT/vol-000001.tar" in out.stdout and "centre-b" not in out.stdout
