"""etc/systemd/medd@.service: systemd itself accepts the unit, and it keeps its hardening."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "etc" / "systemd" / "medd@.service"
BIN = os.path.dirname(sys.executable)

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze is not installed (make test-tools installs systemd as root)")


def _verify(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    # The unit names medd installed in /opt/medd; here it is this test's virtual environment.
    (tmp_path / "medd@.service").write_text(text.replace("/opt/medd/bin", BIN))
    return subprocess.run(["systemd-analyze", "verify", str(tmp_path / "medd@central.service")],
                          capture_output=True, text=True, timeout=60)


def test_unit_verifies_cleanly(tmp_path):
    """`systemd-analyze verify medd@central.service` finds nothing to say (not even a warning), and the
    unit runs /etc/medd/<instance>.ini as a dedicated user, restarts on failure and keeps its hardening."""
    text = UNIT.read_text()
    done = _verify(tmp_path, text)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    settings = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, value)
    assert "--config /etc/medd/%i.ini" in settings["ExecStart"]
    assert settings["User"] == "medd"
    assert settings["Restart"] == "on-failure"
    assert settings["ProtectSystem"] == "strict"
    assert settings["PrivateTmp"] == settings["NoNewPrivileges"] == "yes"
    assert settings["ReadWritePaths"] == "/var/lib/medd"


def test_verify_catches_a_broken_unit(tmp_path):
    """The check above could fail: a misspelt restart policy and a missing program are both reported."""
    done = _verify(tmp_path, UNIT.read_text().replace("Restart=on-failure", "Restart=sometimes"))
    assert "Failed to parse service restart specifier" in done.stderr
    done = _verify(tmp_path, UNIT.read_text().replace("/opt/medd/bin/twistd", "/nonexistent/twistd"))
    assert done.returncode != 0 and "is not executable" in done.stderr
