"""The base of the storage connectors: one per table group, in the manner of
buildbot's ``db`` components.

A connector holds the :class:`~medd.storage.database.Database` and the node's
one clock. Each public method runs its SQL in a transaction on the database
pool and returns a Deferred of dataclasses (or plain values); nothing that
leaves a connector is a row or a cursor. Every timestamp a connector writes
comes from :meth:`Connector.now`, i.e. from the injected clock, so a test
driving ``twisted.internet.task.Clock`` controls the stamps too.
"""
from __future__ import annotations

from datetime import datetime, timezone


def utc(seconds: float) -> datetime:
    """An aware UTC datetime for ``seconds`` since the epoch (a clock reading)."""
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


def aware(value: datetime | None) -> datetime | None:
    """A stamp read back from the database, made aware (SQLite drops the zone)."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


class Connector:
    """One table group's queries; see the module docstring."""

    def __init__(self, database, clock):
        self.db = database
        self.clock = clock

    def now(self) -> datetime:
        """The clock's reading as an aware UTC datetime: the only source of stamps."""
        return utc(self.clock.seconds())
