"""A node refuses to run without a listener: a port already taken stops it at once, in one line."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from medd.plugins.api import CannotListen
from tests.conftest import write_config

BIN = os.path.dirname(sys.executable)


@pytest.fixture
def taken_port():
    """A loopback port this test holds bound (and listening) for its whole run."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _run(argv, timeout=10):
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - started


@pytest.mark.parametrize("transport", ["dicom", "http"])
def test_twistd_exits_when_a_listener_cannot_bind(tmp_path, taken_port, transport):
    """twistd with one listener's port already taken exits non-zero within seconds, with one line naming the listener and the port."""
    listen = {"dicom": "tcp:0:interface=127.0.0.1", "http": "tcp:0:interface=127.0.0.1"}
    listen[transport] = f"tcp:{taken_port}:interface=127.0.0.1"
    ini = write_config(tmp_path, listen)
    proc, took = _run([os.path.join(BIN, "twistd"), "-n", "--pidfile=", "medd", "--config", str(ini)])
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert took < 10
    line = f"medd: cannot listen for {transport} on tcp:{taken_port}:interface=127.0.0.1: address already in use"
    assert line in out
    assert "Traceback" not in out and out.count("cannot listen") == 1


def test_demo_exits_when_a_listener_cannot_bind(tmp_path, taken_port):
    """`medd demo` binds every listener before it runs and stops with status 2 and the same line when one is taken."""
    ini = write_config(tmp_path, {"http": "tcp:0:interface=127.0.0.1", "dicom": f"tcp:{taken_port}:interface=127.0.0.1"})
    proc, took = _run([os.path.join(BIN, "medd"), "demo", "--config", str(ini), "--site", str(tmp_path / "site"),
                       "--viewer-config", "", "--gateway-config", ""])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert took < 10
    assert proc.stderr.strip().splitlines()[-1] == (
        f"medd: cannot listen for dicom on tcp:{taken_port}:interface=127.0.0.1: address already in use")


@pytest.mark.parametrize("transport", ["dicom", "http"])
def test_node_refuses_to_start_without_its_listener(tmp_path, taken_port, transport):
    """In process, binding happens in privilegedStartService, before the node starts anything, and raises CannotListen."""
    from twisted.internet import reactor

    from medd.config import load_config
    from medd.service import make_node

    node = make_node(reactor, load_config(write_config(tmp_path, {transport: f"tcp:{taken_port}:interface=127.0.0.1"})))
    with pytest.raises(CannotListen) as info:
        node.privilegedStartService()
    assert (info.value.transport, info.value.reason) == (transport, "address already in use")
    assert not node.running
