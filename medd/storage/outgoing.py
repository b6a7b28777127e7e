"""The viewer's outgoing packages (status messages, overlays, reports for
central): the :class:`OutgoingPackages` connector over the ``viewer_outgoing``
table, whose rows survive a restart. The package bytes are in the blob store,
by digest; a row says where its package is on the way to central.

States: ``waiting`` (to be sent; ``next_attempt_at`` says when), then
``sent``, or ``refused`` (central said the package is bad) or ``lost`` (its
bytes are gone), neither of which is retried.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.engine import Connection

from medd.storage.connector import Connector, aware
from medd.storage.viewer_tables import viewer_outgoing

WAITING, SENT, REFUSED, LOST = "waiting", "sent", "refused", "lost"


@dataclass(frozen=True)
class OutgoingPackage:
    id: int
    message_id: str
    attachment: str
    uid: str
    digest: str
    state: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    created_at: datetime
    sent_at: datetime | None

    @classmethod
    def from_row(cls, r) -> "OutgoingPackage":
        return cls(r.id, r.message_id, r.attachment, r.uid, r.digest, r.state, r.attempts, aware(r.next_attempt_at),
                   r.last_error, aware(r.created_at), aware(r.sent_at))


def record_outgoing(conn: Connection, message_id: str, attachment: str, uid: str, digest: str, at: datetime) -> int:
    """Queue a package (idempotent by Message-ID); returns its row id."""
    row = conn.execute(select(viewer_outgoing.c.id).where(viewer_outgoing.c.message_id == message_id)).first()
    if row:
        return row.id
    return conn.execute(viewer_outgoing.insert().values(
        message_id=message_id, attachment=attachment, uid=uid, digest=digest, state=WAITING, attempts=0,
        next_attempt_at=at, created_at=at,
    )).inserted_primary_key[0]


def head_of_line(conn: Connection) -> OutgoingPackage | None:
    """The oldest waiting package: packages go to central in the order they were queued."""
    row = conn.execute(select(viewer_outgoing).where(viewer_outgoing.c.state == WAITING)
                       .order_by(viewer_outgoing.c.id).limit(1)).first()
    return OutgoingPackage.from_row(row) if row else None


def outgoing_packages(conn: Connection, state: str | None = None) -> list[OutgoingPackage]:
    q = select(viewer_outgoing).order_by(viewer_outgoing.c.id)
    if state:
        q = q.where(viewer_outgoing.c.state == state)
    return [OutgoingPackage.from_row(r) for r in conn.execute(q)]


def count_waiting(conn: Connection) -> int:
    return conn.execute(select(func.count()).select_from(viewer_outgoing)
                        .where(viewer_outgoing.c.state == WAITING)).scalar_one()


def _update(conn: Connection, package_id: int, **values) -> None:
    conn.execute(update(viewer_outgoing).where(viewer_outgoing.c.id == package_id).values(**values))


class OutgoingPackages(Connector):
    """The packages a viewer has queued for central. Every method returns a Deferred."""

    def queue(self, message_id: str, attachment: str, uid: str, digest: str):
        """Deferred row id of a package queued now (idempotent by Message-ID), due at once."""
        at = self.now()
        return self.db.run(lambda conn: record_outgoing(conn, message_id, attachment, uid, digest, at))

    def head_of_line(self):
        """Deferred :class:`OutgoingPackage`: the oldest waiting one, or None."""
        return self.db.run(head_of_line)

    def packages(self, state: str | None = None):
        """Deferred list of :class:`OutgoingPackage` (of one ``state``, or all), in queued order."""
        return self.db.run(lambda conn: outgoing_packages(conn, state))

    def count_waiting(self):
        return self.db.run(count_waiting)

    def mark_sent(self, package: OutgoingPackage):
        """Central accepted ``package`` now."""
        at = self.now()
        return self.db.run(lambda conn: _update(
            conn, package.id, state=SENT, attempts=package.attempts + 1, sent_at=at, last_error=None))

    def mark_given_up(self, package: OutgoingPackage, state: str, error: str):
        """``package`` will not be sent: ``refused`` by central, or ``lost`` from the blob store."""
        if state not in (REFUSED, LOST):
            raise ValueError(state)
        return self.db.run(lambda conn: _update(
            conn, package.id, state=state, attempts=package.attempts + 1, last_error=error))

    def retry_later(self, package: OutgoingPackage, delay: float, error: str):
        """An attempt failed now; ``package`` is due again ``delay`` seconds on the clock from now."""
        next_at = self.now() + timedelta(seconds=delay)
        return self.db.run(lambda conn: _update(
            conn, package.id, attempts=package.attempts + 1, next_attempt_at=next_at, last_error=error))
