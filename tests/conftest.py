"""Shared fixtures: a real central node on loopback, pydicom's test files."""
from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pydicom.data
import pytest
import pytest_twisted

from medd.config import load_config

# The db_url fixture: each storage test on SQLite and PostgreSQL.
pytest_plugins = ["tests.databases"]


def testdata(name: str) -> bytes:
    """Bytes of one of pydicom's bundled test files."""
    return Path(pydicom.data.get_testdata_file(name)).read_bytes()


testdata.__test__ = False  # a helper, not a test, when imported into a test module


def all_testdata_files() -> list[Path]:
    return sorted(Path(p) for p in pydicom.data.get_testdata_files() if os.path.isfile(p))


def write_config(tmp_path: Path, listen: dict[str, str] | None = None, extra: str = "", db_url: str | None = None,
                 name: str = "central.test", role: str = "central") -> Path:
    listen = listen or {}
    lines = "\n".join(f"{k} = {v}" for k, v in listen.items())
    text = textwrap.dedent(
        f"""
        [node]
        role = {role}
        name = {name}

        [database]
        url = {db_url or 'sqlite:///' + str(tmp_path / 'index.sqlite')}

        [storage]
        path = {tmp_path / 'store'}

        [listen]
        """
    ) + lines + "\n" + textwrap.dedent(extra)
    path = tmp_path / f"{role}.ini"
    path.write_text(text)
    return path


@pytest.fixture
def make_central(tmp_path):
    """Factory: start a central node with the given listeners; stopped after the test.

    Listeners bound to port 0 report their port through ``listener_port(node, key)``.
    ``clock`` (a ``twisted.internet.task.Clock``) becomes the node's one clock.
    """
    from twisted.internet import reactor

    from medd.service import make_node

    started = []

    async def start(listen: dict[str, str] | None = None, extra: str = "", db_url: str | None = None, plugins=None,
                    site: str | None = None, role: str = "central", name: str | None = None, clock=None):
        # ``site`` puts a second node's config, database and store in their own folder.
        folder = tmp_path / site if site else tmp_path
        folder.mkdir(exist_ok=True)
        config = load_config(write_config(folder, listen, extra, db_url, name=name or site or "central.test", role=role))
        node = make_node(reactor, config, plugins, clock=clock)
        node.startService()
        started.append(node)
        for key in config.listen:
            listener = node.getServiceNamed(f"listen-{key}")
            if hasattr(listener, "whenListening"):
                await listener.whenListening()
        return node

    yield start
    for node in started:
        pytest_twisted.blockon(_maybe(node.stopService()))


def _maybe(d):
    from twisted.internet.defer import succeed

    return d if d is not None else succeed(None)


def listener_port(node, key: str) -> int:
    listener = node.getServiceNamed(f"listen-{key}")
    port = listener.port
    return port if isinstance(port, int) else port.getHost().port


CENTRE_ADDRESS = "ct1@centre-a.example"
VIEWER_ADDRESS = "viewer@central.test"


async def centre_token(node, name: str = "centre-a", address: str = CENTRE_ADDRESS) -> str:
    """Register an imaging centre on central ``node`` with a new bearer token (its packages and
    STOW-RS are accepted only with it) and return the token."""
    return (await node.central_storage.directory.add_centre(name, addresses=[address], token=True)).token


async def viewer_token(node, address: str = VIEWER_ADDRESS) -> str:
    """Register a pull viewer on central ``node`` and return its bearer token."""
    return (await node.central_storage.directory.add_viewer(address)).token


def bearer(token: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **headers}
