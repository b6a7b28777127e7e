"""The gateway's store-and-forward queue and the receipts central sends back:
the :class:`Forwarding` connector over ``gateway_forwarding`` and
``gateway_receipts``.

Every object the centre's modalities send is queued once, in arrival order,
with the Message-ID its package will carry on every attempt (central stores
it once however often it is resent). States: ``waiting`` (``next_attempt_at``
says when it is due), then ``sent``, or ``refused`` (central said the package
is bad) or ``lost`` (its bytes are gone), neither of which is retried.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable

from sqlalchemy import and_, bindparam, func, select, update
from sqlalchemy.engine import Connection

from medd.storage.connector import Connector, aware
from medd.storage.gateway_tables import gateway_forwarding, gateway_receipts, gateway_results
from medd.storage.index import ObjectRecord, StatusEvent, store_status
from medd.storage.schema import objects

WAITING, SENT, REFUSED, LOST = "waiting", "sent", "refused", "lost"
#: A result the PACS has stored; one that C-STORE cannot carry (a text report).
STORED, SKIPPED = "stored", "skipped"
#: Objects that came back from central (results, receipts) are not forwarded to it again.
NOT_FORWARDED_TRANSPORTS = ("pull",)


@dataclass(frozen=True)
class ForwardingItem:
    id: int
    uid: str
    study_uid: str | None
    message_id: str
    digest: str
    size: int
    state: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    last_attempt_at: datetime | None
    queued_at: datetime
    sent_at: datetime | None
    # From the object's index row, when the query joined it (:func:`waiting_batch`):
    # what its package's Medd-Attachment is made of, without opening the object.
    object_type: str | None = None
    referenced_image_uid: str | None = None

    @classmethod
    def from_row(cls, r) -> "ForwardingItem":
        m = r._mapping
        return cls(r.id, r.uid, r.study_uid, r.message_id, r.digest, r.size, r.state, r.attempts,
                   aware(r.next_attempt_at), r.last_error, aware(r.last_attempt_at), aware(r.queued_at),
                   aware(r.sent_at), m.get("object_type"), m.get("referenced_image_uid"))


@dataclass(frozen=True)
class ForwardingSummary:
    """What waits, and how forwarding went lately (``medd gateway status``)."""

    waiting: int
    waiting_bytes: int
    oldest_waiting: ForwardingItem | None
    last_sent: ForwardingItem | None
    last_error: ForwardingItem | None  # the item whose attempt failed most recently
    given_up: int  # refused or lost


@dataclass(frozen=True)
class ResultItem:
    """An overlay or report central sent back, queued for the centre's PACS."""

    id: int
    uid: str
    object_type: str
    sop_class_uid: str | None
    transfer_syntax_uid: str | None
    digest: str
    size: int
    state: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    last_attempt_at: datetime | None
    queued_at: datetime
    stored_at: datetime | None

    @classmethod
    def from_row(cls, r) -> "ResultItem":
        return cls(r.id, r.uid, r.object_type, r.sop_class_uid, r.transfer_syntax_uid, r.digest, r.size, r.state,
                   r.attempts, aware(r.next_attempt_at), r.last_error, aware(r.last_attempt_at), aware(r.queued_at),
                   aware(r.stored_at))


@dataclass(frozen=True)
class ResultsSummary:
    """The queue of results for the centre's PACS (``medd gateway status``)."""

    waiting: int
    oldest_waiting: ResultItem | None
    last_stored: ResultItem | None
    last_error: ResultItem | None
    refused: int  # the PACS answered a C-STORE failure status, or the bytes are gone
    skipped: int  # text reports: C-STORE cannot carry them


@dataclass(frozen=True)
class CentralReceipt:
    """One status central sent back about an object."""

    uid: str
    event: str
    viewer: str | None
    user: str | None
    time: str | None
    reason: str | None
    received_at: datetime

    @classmethod
    def from_row(cls, r) -> "CentralReceipt":
        return cls(r.uid, r.event, r.viewer, r.user, r.event_time, r.reason, aware(r.received_at))


def queue_object(conn: Connection, record: ObjectRecord, message_id: str, at: datetime, *, new: bool = False) -> bool:
    """Queue ``record`` once (by UID); False if it was queued before. ``new``: its index row is
    being inserted in this transaction, so it cannot have been queued (the UID is unique in both)."""
    if not new and conn.execute(select(gateway_forwarding.c.id)
                                .where(gateway_forwarding.c.uid == record.sop_instance_uid)).first():
        return False
    conn.execute(_INSERT_FORWARDING, dict(
        uid=record.sop_instance_uid, study_uid=record.study_instance_uid, message_id=message_id, digest=record.digest,
        size=record.size, state=WAITING, attempts=0, next_attempt_at=at, queued_at=at,
    ))
    return True


# Built once: every object the gateway takes runs it (see medd.storage.index).
_INSERT_FORWARDING = gateway_forwarding.insert()


RESULT_TYPES = ("overlay", "report")


def result_skip_reason(record: ObjectRecord) -> str | None:
    """Why a result cannot go to a PACS (a plain-text report has no C-STORE), or None."""
    if record.media_type != "application/dicom":
        return f"a {record.media_type} {record.object_type} cannot be sent by C-STORE"
    return None


def queue_new_object(message_id: Callable[[], str], *, results: bool = False) -> Callable[[Connection, ObjectRecord], None]:
    """What the gateway's ingest writes beside every new object in its index transaction
    (``store_object``'s ``with_new``): the object queued for central, due at its arrival,
    unless it came back from central; with ``results`` (a ``[gateway] results_to``), an
    overlay or report that came back queued for the PACS. One commit makes the object and
    its queue row durable, before central's package is acknowledged."""

    def queue_with_index(conn: Connection, record: ObjectRecord) -> None:
        if record.transport not in NOT_FORWARDED_TRANSPORTS:
            queue_object(conn, record, message_id(), record.received_at, new=True)
        elif results and record.object_type in RESULT_TYPES:
            queue_result(conn, record, record.received_at, result_skip_reason(record))

    return queue_with_index


def unqueued_objects(conn: Connection) -> list[ObjectRecord]:
    """Objects received from the centre that are not in the queue (the node stopped between the two)."""
    q = (select(objects).outerjoin(gateway_forwarding, gateway_forwarding.c.uid == objects.c.sop_instance_uid)
         .where(and_(gateway_forwarding.c.id.is_(None), objects.c.transport.not_in(NOT_FORWARDED_TRANSPORTS)))
         .order_by(objects.c.id))
    return [ObjectRecord.from_row(r) for r in conn.execute(q)]


def head_of_line(conn: Connection) -> ForwardingItem | None:
    """The oldest waiting object: objects go to central in the order they arrived."""
    row = conn.execute(select(gateway_forwarding).where(gateway_forwarding.c.state == WAITING)
                       .order_by(gateway_forwarding.c.id).limit(1)).first()
    return ForwardingItem.from_row(row) if row else None


def waiting_batch(conn: Connection, limit: int) -> list[ForwardingItem]:
    """The head of line and up to ``limit - 1`` waiting behind it, in arrival order."""
    f = gateway_forwarding
    rows = conn.execute(select(f, objects.c.object_type, objects.c.referenced_image_uid)
                        .outerjoin(objects, objects.c.sop_instance_uid == f.c.uid)
                        .where(f.c.state == WAITING).order_by(f.c.id).limit(limit))
    return [ForwardingItem.from_row(r) for r in rows]


def spooled(conn: Connection) -> tuple[int, int]:
    """(objects, bytes) waiting."""
    row = conn.execute(select(func.count(), func.coalesce(func.sum(gateway_forwarding.c.size), 0))
                       .where(gateway_forwarding.c.state == WAITING)).first()
    return int(row[0]), int(row[1])


def _one(conn: Connection, q, cls=None):
    """The first row of ``q`` as ``cls`` (a queue item dataclass; ForwardingItem by default), or None."""
    row = conn.execute(q.limit(1)).first()
    return (cls or ForwardingItem).from_row(row) if row else None


def summary(conn: Connection) -> ForwardingSummary:
    f = gateway_forwarding
    count, size = spooled(conn)
    given_up = conn.execute(select(func.count()).select_from(f).where(f.c.state.in_((REFUSED, LOST)))).scalar_one()
    return ForwardingSummary(
        waiting=count, waiting_bytes=size,
        oldest_waiting=head_of_line(conn),
        last_sent=_one(conn, select(f).where(f.c.state == SENT).order_by(f.c.sent_at.desc(), f.c.id.desc())),
        last_error=_one(conn, select(f).where(f.c.last_error.is_not(None))
                        .order_by(f.c.last_attempt_at.desc(), f.c.id.desc())),
        given_up=given_up,
    )


# One statement for a whole batch of sent items (executemany), compiled once per process.
_MARK_SENT = (update(gateway_forwarding).where(gateway_forwarding.c.id == bindparam("item_id"))
              .values(state=bindparam("state"), attempts=bindparam("attempts"), sent_at=bindparam("sent_at"),
                      last_attempt_at=bindparam("last_attempt_at")))


def _update(conn: Connection, item_id: int, table=gateway_forwarding, **values) -> None:
    conn.execute(update(table).where(table.c.id == item_id).values(**values))


def record_receipt(conn: Connection, status: StatusEvent, at: datetime) -> bool:
    """A status from central: in the index's status events and the gateway's receipts; False if seen before."""
    if not store_status(conn, status, at):
        return False
    conn.execute(gateway_receipts.insert().values(
        message_id=status.receipt.message_id, uid=status.uid, event=status.event, viewer=status.viewer,
        user=status.user, event_time=status.time, reason=status.reason, received_at=at,
    ))
    return True


def receipts_of(conn: Connection, uid: str) -> list[CentralReceipt]:
    q = select(gateway_receipts).where(gateway_receipts.c.uid == uid).order_by(gateway_receipts.c.id)
    return [CentralReceipt.from_row(r) for r in conn.execute(q)]


def latest_receipts(conn: Connection, limit: int) -> list[CentralReceipt]:
    """The latest receipt of each object, the most recent objects first."""
    r = gateway_receipts
    latest = select(func.max(r.c.id)).group_by(r.c.uid).scalar_subquery()
    q = select(r).where(r.c.id.in_(latest)).order_by(r.c.id.desc()).limit(limit)
    return [CentralReceipt.from_row(row) for row in conn.execute(q)]


def queue_result(conn: Connection, record: ObjectRecord, at: datetime, skipped: str | None) -> bool:
    """Queue a result for the PACS once (by UID), or record it as ``skipped`` with the reason; False if seen before."""
    r = gateway_results
    if conn.execute(select(r.c.id).where(r.c.uid == record.sop_instance_uid)).first():
        return False
    conn.execute(r.insert().values(
        uid=record.sop_instance_uid, object_type=record.object_type, sop_class_uid=record.sop_class_uid,
        transfer_syntax_uid=record.transfer_syntax_uid, digest=record.digest, size=record.size,
        state=SKIPPED if skipped else WAITING, attempts=0, next_attempt_at=at, last_error=skipped, queued_at=at,
    ))
    return True


def results_head(conn: Connection) -> ResultItem | None:
    """The oldest result waiting for the PACS: results go in the order they came back."""
    r = gateway_results
    return _one(conn, select(r).where(r.c.state == WAITING).order_by(r.c.id), ResultItem)


def results_summary(conn: Connection) -> ResultsSummary:
    r = gateway_results

    def count(*states):
        return conn.execute(select(func.count()).select_from(r).where(r.c.state.in_(states))).scalar_one()

    return ResultsSummary(
        waiting=count(WAITING), oldest_waiting=results_head(conn),
        last_stored=_one(conn, select(r).where(r.c.state == STORED).order_by(r.c.stored_at.desc(), r.c.id.desc()), ResultItem),
        last_error=_one(conn, select(r).where(and_(r.c.last_error.is_not(None), r.c.state != SKIPPED))
                        .order_by(r.c.last_attempt_at.desc(), r.c.id.desc()), ResultItem),
        refused=count(REFUSED, LOST), skipped=count(SKIPPED),
    )


class Forwarding(Connector):
    """The gateway's queue to central and central's receipts. Every method returns a Deferred."""

    def queue(self, record: ObjectRecord, message_id: str):
        """Deferred bool: ``record`` queued now, due at once (False: it was queued before)."""
        at = self.now()
        return self.db.run(lambda conn: queue_object(conn, record, message_id, at))

    def unqueued_objects(self):
        return self.db.run(unqueued_objects)

    def head_of_line(self):
        """Deferred :class:`ForwardingItem`: the oldest waiting one, or None."""
        return self.db.run(head_of_line)

    def waiting_batch(self, limit: int):
        """Deferred list of :class:`ForwardingItem`: the oldest ``limit`` waiting, in arrival order."""
        return self.db.run(lambda conn: waiting_batch(conn, limit))

    def spooled(self):
        """Deferred (objects, bytes) waiting to be forwarded."""
        return self.db.run(spooled)

    def summary(self):
        return self.db.run(summary)

    def of_object(self, uid: str):
        """Deferred :class:`ForwardingItem` of ``uid``, or None."""
        return self.db.run(lambda conn: _one(conn, select(gateway_forwarding).where(gateway_forwarding.c.uid == uid)))

    def mark_sent_many(self, items: list[ForwardingItem]):
        """Central acknowledged every one of ``items`` as durable now (one transaction)."""
        at = self.now()

        def thd(conn):
            conn.execute(_MARK_SENT, [dict(item_id=item.id, state=SENT, attempts=item.attempts + 1, sent_at=at,
                                           last_attempt_at=at) for item in items])

        return self.db.run(thd)

    def mark_given_up(self, item: ForwardingItem, state: str, error: str):
        """``item`` will not be forwarded: ``refused`` by central, or ``lost`` from the blob store."""
        return self._given_up(gateway_forwarding, item, state, error)

    def retry_later(self, item: ForwardingItem, delay: float, error: str):
        """An attempt failed now; ``item`` is due again ``delay`` seconds on the clock from now."""
        return self._retry_later(gateway_forwarding, item, delay, error)

    def _given_up(self, table, item, state: str, error: str):
        if state not in (REFUSED, LOST):
            raise ValueError(state)
        at = self.now()
        return self.db.run(lambda conn: _update(conn, item.id, table, state=state, attempts=item.attempts + 1,
                                                last_error=error, last_attempt_at=at))

    def _retry_later(self, table, item, delay: float, error: str):
        at = self.now()
        next_at = at + timedelta(seconds=delay)
        return self.db.run(lambda conn: _update(conn, item.id, table, attempts=item.attempts + 1,
                                                next_attempt_at=next_at, last_error=error, last_attempt_at=at))

    def record_receipt(self, status: StatusEvent):
        """Deferred bool: a status from central recorded (False if this package was recorded before)."""
        at = self.now()
        return self.db.run(lambda conn: record_receipt(conn, status, at))

    def receipts_of(self, uid: str):
        """Deferred list of :class:`CentralReceipt` about ``uid``, oldest first."""
        return self.db.run(lambda conn: receipts_of(conn, uid))

    def latest_receipts(self, limit: int = 20):
        return self.db.run(lambda conn: latest_receipts(conn, limit))

    # -- results for the centre's PACS ([gateway] results_to) --------------------------------------

    def queue_result(self, record: ObjectRecord, *, skipped: str | None = None):
        """Deferred bool: an overlay or report queued for the PACS, due now; with ``skipped`` (the
        reason) only recorded, never sent. False if it was queued before."""
        at = self.now()
        return self.db.run(lambda conn: queue_result(conn, record, at, skipped))

    def results_head(self):
        """Deferred :class:`ResultItem`: the oldest result waiting for the PACS, or None."""
        return self.db.run(results_head)

    def results_summary(self):
        return self.db.run(results_summary)

    def result_of(self, uid: str):
        """Deferred :class:`ResultItem` of ``uid``, or None."""
        return self.db.run(lambda conn: _one(conn, select(gateway_results).where(gateway_results.c.uid == uid), ResultItem))

    def result_stored(self, item: ResultItem):
        """The PACS answered the C-STORE of ``item`` with success (or a warning) now."""
        at = self.now()
        return self.db.run(lambda conn: _update(conn, item.id, gateway_results, state=STORED,
                                                attempts=item.attempts + 1, stored_at=at, last_attempt_at=at))

    def result_given_up(self, item: ResultItem, state: str, error: str):
        """``item`` will not go to the PACS: ``refused`` (a failure status) or ``lost`` (its bytes are gone)."""
        return self._given_up(gateway_results, item, state, error)

    def result_retry_later(self, item: ResultItem, delay: float, error: str):
        """An attempt failed now; ``item`` is due again ``delay`` seconds on the clock from now."""
        return self._retry_later(gateway_results, item, delay, error)
