"""What a C-STORE Success promises, against a real central that is SIGKILLed while a modality sends:
every acknowledged object is in the index after the crash, with its blob whole on disk, and the
node starts again on what the crash left. Central runs as ``twistd -n medd`` in its own process;
the C-STORE path parses and writes on pynetdicom's association thread and indexes through the
reactor, so this pins that no acknowledgement goes out before both are durable."""
from __future__ import annotations

import hashlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pydicom
from pynetdicom import AE

from tests.conftest import write_config
from tests.test_gateway import datasets

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
LISTENING = re.compile(r"dicom listening on 127\.0\.0\.1:(\d+)")


def start_central(folder: Path) -> tuple[subprocess.Popen, int, Path]:
    """Blocking: a central node as a twistd subprocess, once its DICOM listener is up; (process, port, log)."""
    ini = write_config(folder, {"dicom": "tcp:0:interface=127.0.0.1"}, "[dicom]\nae_title = MEDD\n")
    log = folder / f"twistd-{time.monotonic_ns()}.log"
    with log.open("w") as out:
        proc = subprocess.Popen([TWISTD, "-n", "--pidfile=", "medd", "--config", str(ini)], stdout=out,
                                stderr=subprocess.STDOUT, cwd=folder)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = LISTENING.search(log.read_text())
        if found:
            return proc, int(found.group(1)), log
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"central did not listen:\n{log.read_text()}")


def send_all(port: int, dss: list, calling: str = "CT1") -> list[int]:
    """One association from AE title ``calling`` to MEDD, one C-STORE per dataset; the statuses."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(dss[0].SOPClassUID, dss[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDD")
    assert assoc.is_established
    try:
        return [assoc.send_c_store(ds).Status for ds in dss]
    finally:
        assoc.release()


def send_until_killed(port: int, dss: list, proc: subprocess.Popen, kill_after: int) -> list[str]:
    """One association, one C-STORE per dataset; central is SIGKILLed the moment the ``kill_after``-th
    success arrives: an acknowledgement sent before the object was durable would be lost. The UIDs
    acknowledged."""
    ae = AE(ae_title="CT1")
    ae.add_requested_context(dss[0].SOPClassUID, dss[0].file_meta.TransferSyntaxUID)
    ae.dimse_timeout = ae.network_timeout = ae.acse_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDD")
    assert assoc.is_established
    acknowledged = []
    try:
        for ds in dss:
            if not assoc.is_established:
                break
            rsp = assoc.send_c_store(ds)
            if rsp and rsp.get("Status") == 0:
                acknowledged.append(ds.SOPInstanceUID)
                if len(acknowledged) == kill_after:
                    # At once: an acknowledgement sent before its commit would be lost here.
                    proc.send_signal(signal.SIGKILL)
    finally:
        if assoc.is_established:
            assoc.abort()
    proc.wait(timeout=10)
    return acknowledged


def test_acknowledged_objects_survive_sigkill(tmp_path):
    """SIGKILL central three times, each the moment a modality gets a Success: every object it
    acknowledged is indexed, with its blob whole (the SHA-256 it is filed under, the UID inside);
    central starts again on what each crash left and in the end holds all 60, each once."""
    folder = tmp_path / "central"
    folder.mkdir()
    dss = datasets(60)
    acknowledged: list[str] = []
    for start, kill_after in ((0, 7), (7, 8), (15, 10)):
        proc, port, _ = start_central(folder)
        try:
            got = send_until_killed(port, dss[start:], proc, kill_after)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        assert len(got) == kill_after
        acknowledged += got

        with sqlite3.connect(folder / "index.sqlite") as db:
            rows = dict(db.execute("SELECT sop_instance_uid, digest FROM objects").fetchall())
        assert set(acknowledged) <= set(rows)
        for uid in acknowledged:
            digest = rows[uid]
            blob = folder / "store" / "blobs" / digest[:2] / digest[2:4] / digest
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == digest
            assert pydicom.dcmread(blob).SOPInstanceUID == uid

    again, port, _ = start_central(folder)
    try:
        assert send_all(port, dss) == [0] * 60
    finally:
        again.kill()
        again.wait(timeout=10)
    with sqlite3.connect(folder / "index.sqlite") as db:
        assert db.execute("SELECT count(*), count(distinct sop_instance_uid) FROM objects").fetchone() == (60, 60)
