"""Long command-line work shows a progress bar on a terminal and stays quiet when piped."""
from __future__ import annotations

import fcntl
import hashlib
import os
import sqlite3
import struct
import subprocess
import sys
import termios
import threading

from tests.conftest import write_config

MEDD = os.path.join(os.path.dirname(sys.executable), "medd")


def _node_with_blobs(tmp_path, n: int = 3):
    ini = write_config(tmp_path, {})
    for i in range(n):
        data = f"blob {i}".encode()
        digest = hashlib.sha256(data).hexdigest()
        folder = tmp_path / "store" / "blobs" / digest[:2] / digest[2:4]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / digest).write_bytes(data)
    sqlite3.connect(tmp_path / "index.sqlite").execute("CREATE TABLE t (x)").connection.commit()
    return ini


def test_backup_progress_on_a_terminal_only(tmp_path):
    """`medd backup` with its stderr on a pseudo-terminal draws tqdm's bar (label, count of blobs);
    with stderr piped it writes nothing there, and its summary goes to stdout either way."""
    ini = _node_with_blobs(tmp_path)
    controller, terminal = os.openpty()
    # A terminal of 24 x 80 (a new pseudo-terminal has no size, and tqdm draws nothing in 0 columns).
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    drawn = []

    def read():
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the terminal's other end is closed: all was read
                return
            if not chunk:
                return
            drawn.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        done = subprocess.run([MEDD, "backup", "--config", str(ini), str(tmp_path / "b1")], stderr=terminal,
                              stdout=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(terminal)
        reader.join(timeout=30)
        os.close(controller)
    drawn = b"".join(drawn)
    assert done.returncode == 0
    assert b"backup: blobs" in drawn and b"/3 [" in drawn
    assert "3 blobs (3 copied" in done.stdout

    piped = subprocess.run([MEDD, "backup", "--config", str(ini), str(tmp_path / "b2")], capture_output=True,
                           text=True, timeout=120)
    assert piped.returncode == 0
    assert piped.stderr == ""
    assert "3 blobs (3 copied" in piped.stdout
