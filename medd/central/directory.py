"""Old names of the directory, kept only while code on other branches still
calls its functions of a connection (tests/test_viewer.py's set-up); removed
when those branches merge. Everything else uses
:class:`medd.storage.directory.Directory` (through
:class:`medd.central.storage.CentralStorage`).
"""
from __future__ import annotations

from medd.storage import directory as _directory
from medd.storage.connector import utc
from medd.storage.database import WallClock
from medd.storage.directory import Centre, DirectoryError, Rule, Viewer  # noqa: F401


def _stamp():
    # A function of a connection has no clock; these callers are set-up code
    # outside a node, like a command-line tool.
    return utc(WallClock.seconds())


def add_centre(conn, name, aes=(), addresses=()):
    return _directory.add_centre(conn, name, aes, addresses, at=_stamp())


def add_viewer(conn, address, push_url=None, scopes=(), token=None):
    return _directory.add_viewer(conn, address, push_url, scopes, token, at=_stamp())


def add_admin(conn, name):
    return _directory.add_admin(conn, name, at=_stamp())


def add_rule(conn, destination, centre="", modality="", object_type=""):
    return _directory.add_rule(conn, destination, centre, modality, object_type, at=_stamp())
