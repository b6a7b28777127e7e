"""`medd backup` while a real twistd central takes C-STOREs, and `medd restore` into a fresh node."""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time

import pydicom
import pytest
import pytest_twisted
from pynetdicom import AE
from sqlalchemy import create_engine, text
from twisted.internet.threads import deferToThread

from medd.backup import BackupError, backup, restore
from medd.config import load_config
from tests.conftest import testdata, write_config
from tests.databases import PG_URL, drop_schema, postgres_schema_url
from tests.test_cstore_sigkill import start_central
from tests.test_gateway import datasets

MEDD = os.path.join(os.path.dirname(sys.executable), "medd")


class Modality(threading.Thread):
    """Sends C-STOREs one after another until stopped, noting when each Success arrived."""

    def __init__(self, port: int, dss: list):
        super().__init__(daemon=True)
        self.port, self.dss = port, dss
        self.acknowledged: list[tuple[float, str]] = []
        self.stop = threading.Event()
        self.error = None

    def run(self):
        try:
            ae = AE(ae_title="CT1")
            # No timed assertion: on a loaded machine one answer may take longer than pynetdicom's 30 s.
            ae.dimse_timeout = ae.network_timeout = ae.acse_timeout = 300
            ae.add_requested_context(self.dss[0].SOPClassUID, self.dss[0].file_meta.TransferSyntaxUID)
            assoc = ae.associate("127.0.0.1", self.port, ae_title="MEDD")
            assert assoc.is_established
            try:
                for ds in self.dss:
                    if self.stop.is_set():
                        break
                    if assoc.send_c_store(ds).Status == 0:
                        self.acknowledged.append((time.monotonic(), ds.SOPInstanceUID))
            finally:
                assoc.release()
        except Exception as e:  # reported by the test
            self.error = e

    def count(self) -> int:
        return len(self.acknowledged)


def _medd(*args) -> subprocess.CompletedProcess:
    return subprocess.run([MEDD, *map(str, args)], capture_output=True, text=True, timeout=120)


def _wait(predicate, what: str):
    deadline = time.monotonic() + 60
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen")
        time.sleep(0.02)


def test_backup_under_load_restores_every_acknowledged_object(tmp_path):
    """While a modality keeps storing into a twistd central, `medd backup` runs twice (the second links
    the first's blobs and copies only the new ones); `medd restore` of the latest into a fresh node brings
    back every object acknowledged before that backup started, each blob matching its digest and readable
    as the object with that UID; a second restore into the now non-empty node is refused."""
    folder = tmp_path / "central"
    folder.mkdir()
    proc, port, _ = start_central(folder)
    ini = folder / "central.ini"
    dest = tmp_path / "backups"
    modality = Modality(port, datasets(400))
    try:
        modality.start()
        _wait(lambda: modality.count() >= 15, "15 acknowledgements")
        # In this process (the code `medd backup` runs; tests/test_progress.py runs the command itself).
        first = backup(load_config(ini), dest, show_progress=False)
        _wait(lambda: modality.count() >= 40, "40 acknowledgements")
        before = time.monotonic()
        second = backup(load_config(ini), dest, show_progress=False)
        still_storing = modality.count()
    finally:
        modality.stop.set()
        modality.join(timeout=60)
        proc.terminate()
        proc.wait(timeout=30)
    assert modality.error is None, modality.error
    acknowledged = [uid for at, uid in modality.acknowledged if at < before]
    assert len(acknowledged) >= 40
    # The modality kept storing while the backup ran (it is a backup under load).
    assert modality.count() > len(acknowledged) and still_storing >= len(acknowledged)

    latest = (dest / "latest").resolve()
    manifest = json.loads((latest / "manifest.json").read_text())
    first_folder = first.path
    shared = set(json.loads((first_folder / "manifest.json").read_text())["blobs"]) & set(manifest["blobs"])
    assert shared
    digest = next(iter(shared))
    one, two = (f / "blobs" / digest[:2] / digest[2:4] / digest for f in (first_folder, latest))
    assert os.stat(one).st_ino == os.stat(two).st_ino  # linked, not copied again
    assert second.linked == len(shared) and second.copied == second.blobs - second.linked

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    fresh_ini = write_config(fresh, {}, name="central.restored")
    done = _medd("restore", "--config", fresh_ini, dest)
    assert done.returncode == 0, done.stderr
    with sqlite3.connect(fresh / "index.sqlite") as db:
        rows = dict(db.execute("SELECT sop_instance_uid, digest FROM objects").fetchall())
    missing = [uid for uid in acknowledged if uid not in rows]
    assert not missing
    for uid in acknowledged:
        blob = fresh / "store" / "blobs" / rows[uid][:2] / rows[uid][2:4] / rows[uid]
        data = blob.read_bytes()
        assert hashlib.sha256(data).hexdigest() == rows[uid]
        assert pydicom.dcmread(blob).SOPInstanceUID == uid

    with pytest.raises(BackupError, match="the node is not empty"):
        restore(load_config(fresh_ini), dest, show_progress=False)


def test_restore_refuses_damage_and_the_wrong_role(tmp_path):
    """A blob changed in the backup is named and refused; so is a backup of another role's node."""
    node = tmp_path / "node"
    node.mkdir()
    config = load_config(write_config(node, {}))
    (node / "store" / "blobs" / "ab" / "cd").mkdir(parents=True)
    data = b"medd blob"
    digest = hashlib.sha256(data).hexdigest()
    (node / "store" / "blobs" / digest[:2] / digest[2:4]).mkdir(parents=True, exist_ok=True)
    (node / "store" / "blobs" / digest[:2] / digest[2:4] / digest).write_bytes(data)
    sqlite3.connect(node / "index.sqlite").execute("CREATE TABLE t (x)").connection.commit()
    made = backup(config, tmp_path / "b", show_progress=False)
    assert made.blobs == 1 and made.copied == 1

    (made.path / "blobs" / digest[:2] / digest[2:4] / digest).write_bytes(b"changed")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BackupError, match=f"blob {digest} in the backup is damaged"):
        restore(load_config(write_config(empty, {})), made.path, show_progress=False)
    viewer = tmp_path / "viewer"
    viewer.mkdir()
    with pytest.raises(BackupError, match="backup of a central node"):
        restore(load_config(write_config(viewer, {}, role="viewer",
                                         extra="[central]\nurl = http://127.0.0.1:1\ntoken = x\n"), check_files=False),
                made.path, show_progress=False)


@pytest_twisted.ensureDeferred
async def test_postgresql_backup_and_restore(make_central, tmp_path):
    """On PostgreSQL (its own schema), `medd backup` takes a pg_dump of the node's schema while the node runs;
    restored with pg_restore into that schema, empty again, and a fresh blob store, every object is back
    with its blob whole."""
    url, schema = postgres_schema_url()
    try:
        node = await make_central({}, db_url=url)
        stored = [await node.ingest.receive_dicom(testdata(name), transport="dicom", origin="CT1")
                  for name in ("CT_small.dcm", "MR_small.dcm")]
        made = await deferToThread(backup, node.config, tmp_path / "b", show_progress=False)
        assert (made.path / "database.pgdump").is_file() and made.blobs == 2
        await node.stopService()

        drop_schema(schema)
        engine = create_engine(PG_URL)
        with engine.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        engine.dispose()
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        config = load_config(write_config(fresh, {}, db_url=url))
        done = await deferToThread(restore, config, tmp_path / "b", show_progress=False)
        assert done.blobs == 2
        engine = create_engine(url)
        with engine.connect() as conn:
            rows = dict(conn.execute(text("SELECT sop_instance_uid, digest FROM objects")).fetchall())
        engine.dispose()
        assert rows == {s.uid: s.digest for s in stored}
        for digest in rows.values():
            blob = fresh / "store" / "blobs" / digest[:2] / digest[2:4] / digest
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == digest
        (tmp_path / "again").mkdir()
        with pytest.raises(BackupError, match="not empty"):
            await deferToThread(restore, load_config(write_config(tmp_path / "again", {}, db_url=url)),
                                tmp_path / "b", show_progress=False)
    finally:
        drop_schema(schema)
