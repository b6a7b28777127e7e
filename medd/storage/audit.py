"""The audit trail's table: the :class:`AuditLog` connector, which only appends and reads.

Each row is one access or refusal in the shape of an IHE ATNA audit message
(DICOM PS3.15 A.5, RFC 3881): who, what, when, which action, which outcome.
Nothing in medd updates or deletes a row, and the database refuses it too
(triggers made by migration 0010). How far the trail has been sent to a
syslog is kept beside it, in ``audit_forwarded``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.engine import Connection

from medd.storage.connector import Connector, aware
from medd.storage.schema import audit, audit_forwarded


@dataclass(frozen=True)
class AuditEntry:
    """One thing to record. ``event`` is one of :data:`medd.audit.EVENTS`; ``action`` the ATNA
    EventActionCode (C, R, U, D, E); ``outcome`` the RFC 3881 EventOutcomeIndicator."""

    event: str
    action: str
    outcome: int = 0
    user: str | None = None
    credential: str | None = None
    peer: str | None = None
    transport: str | None = None
    patient_id: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    detail: str | None = None


@dataclass(frozen=True)
class AuditRecord:
    """A recorded :class:`AuditEntry`, with its place in the trail, its time and its node."""

    id: int
    at: datetime
    node: str
    entry: AuditEntry


@dataclass(frozen=True)
class AuditFilter:
    """What :meth:`AuditLog.search` selects; None matches anything. ``since`` is inclusive,
    ``until`` exclusive; ``after_id`` pages on (the rows come in id order)."""

    since: datetime | None = None
    until: datetime | None = None
    patient_id: str | None = None
    user: str | None = None
    event: str | None = None
    after_id: int = 0


_ENTRY_FIELDS = tuple(f.name for f in fields(AuditEntry))
# Bounded so that the free-text and identifying fields always fit their columns.
_LIMITS = {c.name: c.type.length for c in audit.columns if getattr(c.type, "length", None)}


def _values(entry: AuditEntry, at: datetime, node: str) -> dict:
    values = {name: getattr(entry, name) for name in _ENTRY_FIELDS}
    for name, limit in _LIMITS.items():
        if isinstance(values.get(name), str) and len(values[name]) > limit:
            values[name] = values[name][:limit]
    return {**values, "at": at, "node": node[:255]}


def append(conn: Connection, entry: AuditEntry, at: datetime, node: str) -> None:
    """Append one row in the caller's transaction (the ingest writes a store's beside its index row)."""
    conn.execute(audit.insert(), _values(entry, at, node))


def _record(row) -> AuditRecord:
    return AuditRecord(row.id, aware(row.at), row.node, AuditEntry(**{name: row._mapping[name] for name in _ENTRY_FIELDS}))


def search(conn: Connection, where: AuditFilter, limit: int) -> list[AuditRecord]:
    a = audit.c
    q = select(audit).where(a.id > where.after_id)
    if where.since is not None:
        q = q.where(a.at >= where.since)
    if where.until is not None:
        q = q.where(a.at < where.until)
    for column, value in ((a.patient_id, where.patient_id), (a.user, where.user), (a.event, where.event)):
        if value is not None:
            q = q.where(column == value)
    return [_record(r) for r in conn.execute(q.order_by(a.id).limit(limit))]


def forwarded(conn: Connection, target: str) -> int:
    return conn.execute(select(audit_forwarded.c.last_id).where(audit_forwarded.c.target == target)).scalar() or 0


def mark_forwarded(conn: Connection, target: str, last_id: int, at: datetime) -> None:
    f = audit_forwarded.c
    if conn.execute(select(f.target).where(f.target == target)).first() is None:
        conn.execute(audit_forwarded.insert().values(target=target, last_id=last_id, updated_at=at))
    else:
        # Forward only: a slower pass never moves the mark back.
        conn.execute(audit_forwarded.update().where(f.target == target, f.last_id < last_id)
                     .values(last_id=last_id, updated_at=at))


class AuditLog(Connector):
    """The audit trail of one node: append and read, nothing else. Every method returns a Deferred."""

    def __init__(self, database, clock, node: str):
        super().__init__(database, clock)
        self.node = node

    def append(self, entry: AuditEntry):
        """Deferred None, once the entry is committed."""
        at = self.now()
        return self.db.run(lambda conn: append(conn, entry, at, self.node))

    def appender(self, entry: AuditEntry):
        """``fn(conn)`` that appends ``entry`` in a transaction someone else runs; stamped now."""
        at = self.now()
        return lambda conn: append(conn, entry, at, self.node)

    def search(self, where: AuditFilter = AuditFilter(), limit: int = 100):
        """Deferred list of :class:`AuditRecord` matching ``where``, oldest first, at most ``limit``."""
        return self.db.run(lambda conn: search(conn, where, limit))

    def forwarded(self, target: str):
        """Deferred id of the last record sent to syslog ``target`` (0 for none)."""
        return self.db.run(lambda conn: forwarded(conn, target))

    def mark_forwarded(self, target: str, last_id: int):
        """Deferred None: the records up to ``last_id`` reached ``target``."""
        at = self.now()
        return self.db.run(lambda conn: mark_forwarded(conn, target, last_id, at))
