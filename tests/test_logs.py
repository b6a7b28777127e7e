"""[log] format = json under a real twistd: one JSON event per line, with the stored object's UIDs,
peer and transport, and twistd's log rotation (SIGUSR1) still working."""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from medd.config import ConfigError, load_config
from tests.conftest import write_config
from tests.test_cstore_sigkill import TWISTD, send_all
from tests.test_gateway import datasets


def _events(path: Path) -> list[dict]:
    """Every line of ``path`` as JSON (each must parse)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def _wait_for(predicate, proc: subprocess.Popen, log: Path, what: str):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen:\n{log.read_text() if log.exists() else ''}")


def _dicom_port(log: Path):
    for event in _events(log) if log.exists() else ():
        if event.get("label") == "dicom" and event.get("port"):
            return event["port"]
    return None


def test_json_log_lines_carry_the_object_and_rotate(tmp_path):
    """twistd with [log] format = json writes only JSON lines; the event of a stored C-STORE object
    names its SOP Instance, Study and Series UIDs, the peer and the transport; after SIGUSR1 the file
    is rotated to twistd.log.1 and the next object is logged in the new file."""
    ini = write_config(tmp_path, {"dicom": "tcp:0:interface=127.0.0.1"}, "[dicom]\nae_title = MEDD\n[log]\nformat = json\n")
    log = tmp_path / "twistd.log"
    proc = subprocess.Popen([TWISTD, "-n", "--pidfile=", f"--logfile={log}", "medd", "--config", str(ini)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        port = _wait_for(lambda: _dicom_port(log), proc, log, "listening")
        first, second = datasets(2)
        assert send_all(port, [first]) == [0]

        def stored(path: Path, uid: str):
            return [e for e in _events(path) if e.get("uid") == uid and e.get("log_namespace") == "medd.ingest"]

        event = _wait_for(lambda: stored(log, first.SOPInstanceUID), proc, log, "the first object's event")[0]
        assert event["study_uid"] == first.StudyInstanceUID
        assert event["series_uid"] == first.SeriesInstanceUID
        assert event["transport"] == "dicom" and event["peer"] == "127.0.0.1" and event["origin"] == "CT1"
        assert event["log_level"]["name"] == "info"

        proc.send_signal(signal.SIGUSR1)
        rotated = tmp_path / "twistd.log.1"
        _wait_for(rotated.exists, proc, log, "rotation")
        assert send_all(port, [second]) == [0]
        _wait_for(lambda: stored(log, second.SOPInstanceUID), proc, log, "the second object's event")
        assert stored(rotated, first.SOPInstanceUID) and not stored(rotated, second.SOPInstanceUID)
        assert not stored(log, first.SOPInstanceUID)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert all(isinstance(e, dict) for e in _events(log) + _events(rotated))


def test_log_format_is_validated(tmp_path):
    """[log] format accepts text and json only, and the problem names the section and key."""
    with pytest.raises(ConfigError, match=r"\[log\] format: must be one of text, json"):
        load_config(write_config(tmp_path, {}, "[log]\nformat = xml\n"))
