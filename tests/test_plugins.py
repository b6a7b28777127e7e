"""The plugin system: built-ins register like third-party plugins and are checked with verifyObject."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from zope.interface import implementer
from zope.interface.verify import verifyObject

from medd.plugins.host import PluginError, load_plugins
from medd.plugins.hookspecs import hookimpl
from medd.plugins.interfaces import IBlobStore, IObjectType, ITransport
from medd.storage.blobstore import FileBlobStore

BIN = Path(sys.executable).parent


def test_builtins_provide_their_interfaces(tmp_path):
    """Every built-in transport and object type, and the file blob store, pass verifyObject."""
    plugins = load_plugins()
    assert {"dicom", "smtp", "http", "tls"} <= set(plugins.transports)
    assert [t.name for t in plugins.object_types] == ["overlay", "report", "status", "image"]
    for t in plugins.transports.values():
        assert verifyObject(ITransport, t)
    for t in plugins.object_types:
        assert verifyObject(IObjectType, t)
    assert verifyObject(IBlobStore, FileBlobStore(tmp_path))


def test_plugin_missing_a_method_is_refused():
    """A plugin registering an object that does not provide ITransport is refused at load time, naming it."""

    @implementer(ITransport)
    class Broken:
        name = "broken"
        description = "forgot listener()"

    class Plugin:
        @hookimpl
        def medd_register_transports(self, register):
            register(Broken())

    with pytest.raises(PluginError, match="does not provide ITransport"):
        load_plugins(extra=[Plugin()])


def test_medd_plugins_lists_by_kind():
    """`medd plugins` lists transports, object types and storage with the entry point providing each."""
    out = subprocess.run([str(BIN / "medd"), "plugins"], capture_output=True, text=True, check=True).stdout
    assert "transports:" in out and "object types:" in out and "storages:" in out
    assert "smtp" in out and "(entry point smtp)" in out and "blobstore:file" in out


PLUGIN_SETUP = """
[metadata]
name = medd-pigeon
version = 0.1

[options]
py_modules = medd_pigeon

[options.entry_points]
medd =
    pigeon = medd_pigeon
"""

PLUGIN_MODULE = '''
"""A carrier-pigeon transport: the smallest out-of-tree medd transport."""
from twisted.application.service import Service
from zope.interface import implementer

from medd.plugins.hookspecs import hookimpl
from medd.plugins.interfaces import ITransport


class PigeonLoft(Service):
    def __init__(self, endpoint, api):
        self.endpoint, self.api = endpoint, api


@implementer(ITransport)
class Pigeon:
    name = "pigeon"
    description = "RFC 1149"

    def listener(self, endpoint, api):
        return PigeonLoft(endpoint, api)


@hookimpl
def medd_register_transports(register):
    register(Pigeon())
'''


@pytest.fixture(scope="module")
def pigeon_site(tmp_path_factory):
    """The tiny plugin package, really installed with pip into its own target folder."""
    src = tmp_path_factory.mktemp("pigeon-src")
    (src / "setup.cfg").write_text(PLUGIN_SETUP)
    (src / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n')
    (src / "medd_pigeon.py").write_text(PLUGIN_MODULE)
    target = tmp_path_factory.mktemp("pigeon-site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(src)],
        check=True, capture_output=True, timeout=300,
    )
    return target


def test_out_of_tree_transport_is_loaded_through_its_entry_point(pigeon_site, tmp_path):
    """An installed third-party package adds a transport with one entry point: listed, usable in [listen], and disable-able."""
    env = {"PYTHONPATH": str(pigeon_site), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([str(BIN / "medd"), "plugins"], capture_output=True, text=True, check=True, env=env).stdout
    assert "pigeon" in out and "(entry point pigeon)" in out

    ini = tmp_path / "c.ini"
    ini.write_text(f"[node]\nrole = central\nname = c.test\n[database]\nurl = sqlite://\n[storage]\npath = {tmp_path}/s\n"
                   "[listen]\npigeon = tcp:0\n")
    check = subprocess.run([str(BIN / "medd"), "check-config", str(ini)], capture_output=True, text=True, env=env)
    assert check.returncode == 0, check.stderr

    ini.write_text(ini.read_text() + "[plugins]\ndisabled = pigeon\n")
    check = subprocess.run([str(BIN / "medd"), "check-config", str(ini)], capture_output=True, text=True, env=env)
    assert check.returncode == 2
    assert "[listen] pigeon: no transport plugin named 'pigeon'" in check.stderr


def test_misspelt_hook_is_refused_at_load():
    """An implementation named like a hook that does not exist (medd_register_transport) is an error, not silently ignored."""

    class Typo:
        @hookimpl
        def medd_register_transport(self, register):  # the hook is medd_register_transports
            raise AssertionError("never called")

    with pytest.raises(PluginError, match="medd_register_transport"):
        load_plugins(extra=[Typo()])


@pytest_twisted.ensureDeferred
async def test_sender_policy_hook_decides_and_refuses_nothing_stored(tmp_path):
    """A third-party medd_check_sender refuses a package as unauthenticated; no blob or row is left behind."""
    from twisted.internet import reactor

    from medd.ingest import Ingest, Refused
    from medd.package import build_package
    from medd.objects import parse_part10
    from medd.storage.blobstore import FileBlobStore
    from medd.storage.database import Database
    from medd.storage.index import ObjectIndex
    from tests.conftest import testdata

    class OnlyAlice:
        @hookimpl
        def medd_check_sender(self, claim):
            return None if claim.origin == "alice@example.org" else f"{claim.origin} is not alice"

    plugins = load_plugins(extra=[OnlyAlice()])
    database = Database(reactor, f"sqlite:///{tmp_path / 'index.sqlite'}")
    database.create_schema()
    blobs = FileBlobStore(tmp_path / "store")
    ingest = Ingest(reactor, ObjectIndex(database, reactor), blobs, plugins, max_object_size=1 << 24)
    content = parse_part10(testdata("CT_small.dcm"))
    image = plugins.object_type("image")

    def package(origin):
        return build_package(content, image.identifier(content), origin=origin, destination="central.test")

    try:
        with pytest.raises(Refused) as refused:
            await ingest.receive_package(package("mallory@example.org"), transport="test")
        assert refused.value.kind == "unauthenticated" and "mallory" in refused.value.reason
        assert list((tmp_path / "store" / "blobs").rglob("*")) == []
        assert await ingest.index.count_objects() == 0
        stored = await ingest.receive_package(package("alice@example.org"), transport="test")
        assert stored.created and await ingest.index.count_objects() == 1
    finally:
        ingest.stop()
        database.stop()
