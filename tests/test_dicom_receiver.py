"""C-STORE into central with pynetdicom as the modality."""
from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest
import pytest_twisted
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification
from twisted.internet.threads import deferToThread

from medd.storage import index
from tests.conftest import listener_port


def _send(port: int, paths: list[str], calling: str = "MODALITY1") -> list[int]:
    """Blocking: one association, one C-STORE per file; the statuses."""
    ae = AE(ae_title=calling)
    datasets = [dcmread(p) for p in paths]
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDD")
    assert assoc.is_established
    try:
        return [assoc.send_c_store(ds).Status for ds in datasets]
    finally:
        assoc.release()


@pytest_twisted.ensureDeferred
async def test_cstore_stores_and_indexes(make_central):
    """A C-STORE success means the object is in the index with its true key information and the blob on disk."""
    node = await make_central({"dicom": "tcp:0:interface=127.0.0.1"})
    port = listener_port(node, "dicom")
    path = get_testdata_file("CT_small.dcm")
    statuses = await deferToThread(_send, port, [path])
    assert statuses == [0x0000]
    source = dcmread(path)
    record = await node.database.run(lambda c: index.object_by_uid(c, source.SOPInstanceUID))
    assert record is not None
    assert record.study_instance_uid == source.StudyInstanceUID
    assert record.series_instance_uid == source.SeriesInstanceUID
    assert record.patient_id == source.PatientID
    assert record.modality == "CT"
    assert record.origin == "MODALITY1"
    stored = dcmread(node.blobs.path(record.digest))
    assert stored.SOPInstanceUID == source.SOPInstanceUID
    assert stored.PixelData == source.PixelData


@pytest_twisted.ensureDeferred
async def test_cstore_twice_is_idempotent(make_central):
    """Sending the same object twice leaves one row and one blob."""
    node = await make_central({"dicom": "tcp:0:interface=127.0.0.1"})
    port = listener_port(node, "dicom")
    path = get_testdata_file("CT_small.dcm")
    assert await deferToThread(_send, port, [path, path]) == [0, 0]
    assert await deferToThread(_send, port, [path]) == [0]
    assert await node.database.run(index.count_objects) == 1
    blobs = [p for p in (node.config.storage_path / "blobs").rglob("*") if p.is_file()]
    assert len(blobs) == 1


@pytest_twisted.ensureDeferred
async def test_compressed_transfer_syntaxes_accepted(make_central):
    """JPEG, JPEG 2000 and RLE encoded objects are accepted and indexed as sent."""
    node = await make_central({"dicom": "tcp:0:interface=127.0.0.1"})
    port = listener_port(node, "dicom")
    names = ["JPEG2000.dcm", "SC_rgb_rle.dcm", "JPEG-lossy.dcm", "MR_small_jpeg_ls_lossless.dcm", "SC_rgb_small_odd_big_endian.dcm"]
    paths = [get_testdata_file(n) for n in names]
    assert await deferToThread(_send, port, paths) == [0] * len(paths)
    for p in paths:
        ds = dcmread(p)
        record = await node.database.run(lambda c: index.object_by_uid(c, ds.SOPInstanceUID))
        assert record.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID


@pytest_twisted.ensureDeferred
async def test_invalid_uid_refused_and_nothing_stored(make_central):
    """A dataset whose SOP Instance UID is not a UID gets a failure status and leaves no row or blob."""
    node = await make_central({"dicom": "tcp:0:interface=127.0.0.1"})
    port = listener_port(node, "dicom")

    def send_bad():
        ds = dcmread(get_testdata_file("CT_small.dcm"))
        ds.SOPInstanceUID = "1.2.abc.4"
        ae = AE(ae_title="MODALITY1")
        ae.add_requested_context(CTImageStorage, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDD")
        try:
            rsp = assoc.send_c_store(ds)
            return rsp.Status, rsp.get("ErrorComment")
        finally:
            assoc.release()

    status, comment = await deferToThread(send_bad)
    assert status == 0xC000
    assert "not a valid UID" in comment
    assert await node.database.run(index.count_objects) == 0
    assert not [p for p in (node.config.storage_path / "blobs").rglob("*") if p.is_file()]


@pytest_twisted.ensureDeferred
async def test_cstore_while_the_node_holds_over_1024_descriptors(make_central):
    """An association whose socket is descriptor 1024 or more is served: pynetdicom's select() refused those
    and aborted the association at once, so a node holding a thousand connections on its listeners (stalled
    ones, say) turned every modality away."""
    import resource

    node = await make_central({"dicom": "tcp:0:interface=127.0.0.1"})
    port = listener_port(node, "dicom")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        assert filler[-1] >= 1024
        # The modality in its own process: its socket is not ours to number.
        script = (
            "import sys\n"
            "from pydicom import dcmread\n"
            "from pynetdicom import AE\n"
            "ds = dcmread(sys.argv[2])\n"
            "ae = AE(ae_title='MODALITY1')\n"
            "ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)\n"
            "assoc = ae.associate('127.0.0.1', int(sys.argv[1]), ae_title='MEDD')\n"
            "print('established' if assoc.is_established else 'refused')\n"
            "if assoc.is_established:\n"
            "    print('status', assoc.send_c_store(ds).Status)\n"
            "    assoc.release()\n"
        )
        run = await deferToThread(subprocess.run, [sys.executable, "-c", script, str(port),
                                                   get_testdata_file("CT_small.dcm")],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    finally:
        for fd in filler:
            os.close(fd)
    assert "established" in run.stdout and "status 0" in run.stdout, run.stdout[-2000:]
    assert await node.database.run(index.count_objects) == 1


@pytest_twisted.ensureDeferred
async def test_cecho(make_central):
    """C-ECHO succeeds (modalities check the route with it)."""
    node = await make_central({"dicom": "tcp:0:interface=127.0.0.1"})
    port = listener_port(node, "dicom")

    def echo():
        ae = AE(ae_title="MODALITY1")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDD")
        try:
            return assoc.send_c_echo().Status
        finally:
            assoc.release()

    assert await deferToThread(echo) == 0


def _associate(port: int, called: str) -> tuple[bool, tuple | None]:
    """Blocking: associate as MODALITY1 to ``called`` and release; (established, (result, source, reason))."""
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    try:
        rejection = None
        if assoc.is_rejected:
            rj = assoc.acceptor.primitive
            rejection = (rj.result, rj.result_source, rj.diagnostic)
        return assoc.is_established, rejection
    finally:
        if assoc.is_established:
            assoc.release()


@pytest_twisted.ensureDeferred
async def test_only_the_configured_called_ae_title_is_accepted(make_central):
    """An association called to any AE title but [dicom] ae_title is rejected (A-ASSOCIATE-RJ: rejected-permanent,
    by the service user, "called AE title not recognised"); one called to the configured title is accepted."""
    node = await make_central({"dicom": "tcp:0:interface=127.0.0.1"}, extra="[dicom]\nae_title = CENTRAL_A\n")
    port = listener_port(node, "dicom")
    for wrong in ("MEDD", "ANY-SCP", "central_a", "CENTRAL_AB"):
        established, rejection = await deferToThread(_associate, port, wrong)
        assert not established and rejection == (0x01, 0x01, 0x07), wrong
    assert await deferToThread(_associate, port, "CENTRAL_A") == (True, None)


def _dcmtk_storescu() -> str | None:
    """DCMTK's storescu, not the one pynetdicom installs into the virtualenv's bin."""
    venv_bin = os.path.dirname(sys.executable)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if os.path.abspath(p) != venv_bin)
    return shutil.which("storescu", path=path)


@pytest.mark.skipif(_dcmtk_storescu() is None, reason="DCMTK storescu is not installed (apt-get install dcmtk)")
@pytest_twisted.ensureDeferred
async def test_dcmtk_storescu(make_central):
    """DCMTK's storescu, a modality-grade SCU, stores objects of several SOP classes and transfer syntaxes."""
    node = await make_central({"dicom": "tcp:0:interface=127.0.0.1"})
    port = listener_port(node, "dicom")
    names = ["CT_small.dcm", "MR_small.dcm", "SC_rgb_small_odd.dcm", "test-SR.dcm"]
    paths = [get_testdata_file(n) for n in names]
    proc = await deferToThread(
        subprocess.run,
        [_dcmtk_storescu(), "-v", "--required", "-aet", "STORESCU", "-aec", "MEDD", "127.0.0.1", str(port), *paths],
        capture_output=True, text=True, timeout=60, env={**os.environ, "TCP_NODELAY": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert (proc.stdout + proc.stderr).count("Received Store Response (Success)") == len(paths)
    for p in paths:
        uid = dcmread(p, stop_before_pixels=True).SOPInstanceUID
        record = await node.database.run(lambda c, uid=uid: index.object_by_uid(c, uid))
        assert record is not None and record.origin == "STORESCU"


def _read_until(proc, needle: str, timeout: float = 60) -> tuple[str, str]:
    """Blocking: read ``proc``'s output until a line holds ``needle``; (that line, everything read)."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
        line = proc.stdout.readline() if ready else ""
        if not line:
            break  # timed out, or the process closed its output
        seen.append(line)
        if needle in line:
            return line, "".join(seen)
    raise AssertionError(f"no {needle!r} within {timeout}s:\n" + "".join(seen))


def test_twistd_runs_a_central_node(tmp_path):
    """`twistd -n medd --config …` starts a central node that answers C-ECHO and stops cleanly on SIGTERM."""
    from tests.conftest import write_config

    # Port 0: the node binds a free port itself and logs it, so no port is picked here and bound later (a race).
    ini = write_config(tmp_path, {"dicom": "tcp:0:interface=127.0.0.1"})
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    proc = subprocess.Popen([twistd, "-n", "--pidfile=", "medd", "--config", str(ini)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = ""
    try:
        line, out = _read_until(proc, "dicom listening on 127.0.0.1:")
        port = int(re.search(r"dicom listening on 127\.0\.0\.1:(\d+)", line).group(1))
        ae = AE(ae_title="MODALITY1")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDD")
        assert assoc.is_established
        status = assoc.send_c_echo().Status
        assoc.release()
        assert status == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
        out += rest
    # twistd re-raises the terminating signal at exit to report how it ended
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "medd central node central.test starting" in out
