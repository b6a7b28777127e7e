"""Central's outbox: one row per (object, destination), moving
``queued -> sent -> delivered -> opened``, or ``failed`` with its attempts, next
attempt time and last error; every change leaves a delivery event.

The rows are the work list of push delivery and what a pull viewer fetches,
so a restart resumes exactly where delivery stopped.
"""
from __future__ import annotations

import dataclasses
import email.utils
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, bindparam, case, func, select, update
from sqlalchemy.engine import Connection

from medd.storage import directory
from medd.storage.connector import Connector, aware
from medd.storage.index import ObjectRecord, StatusEvent, object_by_uid, store_status
from medd.storage.routing_tables import deliveries, delivery_events, routing_decisions, viewers
from medd.storage.schema import objects

PENDING = ("queued", "sent", "failed")


@dataclass(frozen=True)
class Delivery:
    id: int
    uid: str
    destination: str
    state: str
    message_id: str
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    opened_by: str | None = None
    # A status package to a centre: its status part ({"event", "uid", ...}); None for a stored object.
    status: dict | None = None
    # For a viewer: the registered centre of the object and how many images of its study central routes
    # to the viewer (:func:`with_study_facts`), sent in the package's Medd-Centre and Medd-Study-Images.
    centre: str | None = None
    study_images: int | None = None

    @classmethod
    def from_row(cls, r) -> "Delivery":
        return cls(r.id, r.uid, r.destination, r.state, r.message_id, r.attempts,
                   aware(r.next_attempt_at), r.last_error, r.opened_by, json.loads(r.status) if r.status else None)


@dataclass(frozen=True)
class PushTarget:
    """A push viewer with pending deliveries, and where to push them."""

    address: str
    push_url: str
    smime_cert: str | None = None  # PEM the viewer registered (--smime-cert): mail to it is encrypted to it


@dataclass(frozen=True)
class WaitingDelivery:
    """A delivery a pull viewer (or centre) may fetch, with the object it carries
    (None for a status package, whose content is the delivery's ``status``)."""

    delivery: Delivery
    record: ObjectRecord | None


@dataclass(frozen=True)
class PullRequest:
    """A pull request for one delivery: whose outbox the token opens (None: unknown token),
    the delivery (None: not theirs) and the object it carries."""

    owner: directory.OutboxOwner | None
    delivery: Delivery | None = None
    record: ObjectRecord | None = None


def set_state(conn: Connection, delivery_id: int, state: str, at: datetime, detail: str | None = None, **values) -> None:
    conn.execute(update(deliveries).where(deliveries.c.id == delivery_id).values(state=state, updated_at=at, **values))
    conn.execute(delivery_events.insert().values(delivery_id=delivery_id, state=state, detail=detail, at=at))


@dataclass(frozen=True)
class NewDelivery:
    """An outbox row to queue: ``uid`` for ``destination`` (with ``status``: that status package
    rather than the stored object ``uid``); ``detail`` is its first delivery event's."""

    uid: str
    destination: str
    detail: str
    status: dict | None = None


# Built once (see medd.storage.index): the statements of queueing, compiled once per process.
_QUEUED_PAIRS = select(deliveries.c.uid, deliveries.c.destination).where(
    deliveries.c.uid.in_(bindparam("uids", expanding=True)))
_INSERT_DELIVERY = deliveries.insert().returning(deliveries.c.id, sort_by_parameter_order=True)
_INSERT_EVENT = delivery_events.insert()


def queue_deliveries(conn: Connection, wanted: list[NewDelivery], at: datetime) -> list[int | None]:
    """Queue each (uid -> destination) of ``wanted`` once, in order; the outbox row id of each,
    None for one already queued (or earlier in ``wanted``).

    Three statements for any number of rows (the rows already queued, the new rows, their
    ``queued`` events), not three per row: a routing pass queues two or more per object."""
    uids = list(dict.fromkeys(w.uid for w in wanted))
    queued: set[tuple[str, str]] = set()
    for start in range(0, len(uids), 500):
        queued.update(tuple(r) for r in conn.execute(_QUEUED_PAIRS, {"uids": uids[start:start + 500]}))
    new: list[int] = []
    for i, w in enumerate(wanted):
        if (w.uid, w.destination) not in queued:
            queued.add((w.uid, w.destination))
            new.append(i)
    ids: list[int | None] = [None] * len(wanted)
    if not new:
        return ids
    rows = [dict(uid=wanted[i].uid, destination=wanted[i].destination, state="queued",
                 message_id=email.utils.make_msgid(idstring="out", domain="medd.invalid"),
                 attempts=0, next_attempt_at=at, created_at=at, updated_at=at, opened_by=None, last_error=None,
                 status=json.dumps(wanted[i].status, sort_keys=True) if wanted[i].status is not None else None)
            for i in new]
    for i, delivery_id in zip(new, conn.execute(_INSERT_DELIVERY, rows).scalars().all()):
        ids[i] = delivery_id
    conn.execute(_INSERT_EVENT, [dict(delivery_id=ids[i], state="queued", detail=wanted[i].detail, at=at)
                                 for i in new])
    return ids


def queue_delivery(conn: Connection, uid: str, destination: str, at: datetime, detail: str,
                   status: dict | None = None) -> int | None:
    """Queue (uid -> destination) once; returns the outbox row id, None if already queued.

    With ``status``, the row carries that status package rather than the stored object ``uid``."""
    return queue_deliveries(conn, [NewDelivery(uid, destination, detail, status)], at)[0]


def head_of_line(conn: Connection, destination: str) -> Delivery | None:
    """The oldest pending push delivery to ``destination`` (given-up rows excluded)."""
    row = conn.execute(
        select(deliveries)
        .where(and_(
            deliveries.c.destination == destination,
            deliveries.c.state.in_(PENDING),
            deliveries.c.next_attempt_at.is_not(None),
        ))
        .order_by(deliveries.c.id)
        .limit(1)
    ).first()
    return Delivery.from_row(row) if row else None


def push_targets(conn: Connection) -> list[PushTarget]:
    """Push viewers with pending deliveries."""
    q = (
        select(viewers.c.address, viewers.c.push_url, viewers.c.smime_cert)
        .join(deliveries, deliveries.c.destination == viewers.c.address)
        .where(and_(viewers.c.mode == "push", deliveries.c.state.in_(PENDING), deliveries.c.next_attempt_at.is_not(None)))
        .distinct()
        .order_by(viewers.c.address)
    )
    return [PushTarget(r.address, r.push_url, r.smime_cert) for r in conn.execute(q)]


def pull_waiting(conn: Connection, address: str) -> list[WaitingDelivery]:
    """What a pull viewer may fetch: its deliveries not yet acknowledged, oldest first."""
    rows = conn.execute(
        select(deliveries).where(and_(deliveries.c.destination == address, deliveries.c.state.in_(("queued", "sent"))))
        .order_by(deliveries.c.id)
    ).all()
    # The objects in one query per chunk, not one query per waiting row: a
    # viewer that fell behind lists hundreds of rows on every poll.
    records = {}
    uids = [r.uid for r in rows]
    for start in range(0, len(uids), 500):
        chunk = uids[start:start + 500]
        for o in conn.execute(select(objects).where(objects.c.sop_instance_uid.in_(chunk))):
            records[o.sop_instance_uid] = ObjectRecord.from_row(o)
    return [WaitingDelivery(Delivery.from_row(r), records.get(r.uid)) for r in rows]


def with_study_facts(conn: Connection, delivery: Delivery, record: ObjectRecord | None) -> Delivery:
    """The delivery with what central knows of its object's study: the registered centre (the routing
    decision) and, for an image, how many images of the study are routed to the same destination."""
    if record is None or delivery.status is not None:
        return delivery
    centre = conn.execute(select(routing_decisions.c.centre).where(routing_decisions.c.uid == delivery.uid)).scalar()
    images = None
    if record.object_type == "image":
        images = conn.execute(
            select(func.count()).select_from(deliveries.join(objects, objects.c.sop_instance_uid == deliveries.c.uid))
            .where(and_(deliveries.c.destination == delivery.destination, objects.c.object_type == "image",
                        objects.c.study_instance_uid == record.study_instance_uid))).scalar_one()
    return dataclasses.replace(delivery, centre=centre, study_images=images)


def delivery_for(conn: Connection, delivery_id: int, address: str) -> Delivery | None:
    row = conn.execute(
        select(deliveries).where(and_(deliveries.c.id == delivery_id, deliveries.c.destination == address))
    ).first()
    return Delivery.from_row(row) if row else None


def deliveries_of(conn: Connection, uid: str) -> list[Delivery]:
    return [Delivery.from_row(r) for r in conn.execute(select(deliveries).where(deliveries.c.uid == uid).order_by(deliveries.c.id))]


# -- status packages to a centre ------------------------------------------------------------------


def status_id(uid: str, event: str, destination: str, about: str = "") -> str:
    """The outbox key of one status package: the same event about the same object to the same
    centre is queued once, however often it is told (a UID under 2.25, at most 44 characters)."""
    digest = hashlib.sha256("\0".join((uid, event, destination, about)).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big") or 1)


def status_delivery(destination: str, event: str, uid: str, about: str = "", **params) -> NewDelivery:
    """The outbox row of a status package ``event`` about ``uid`` to a centre's ``destination``."""
    status = {"event": event, "uid": uid, **{k: v for k, v in params.items() if v is not None}}
    return NewDelivery(status_id(uid, event, destination, about), destination, f"status {event} of {uid}", status)


def queue_status(conn: Connection, destination: str, event: str, uid: str, at: datetime, about: str = "",
                 **params) -> int | None:
    """Queue a status package ``event`` about ``uid`` to a centre's ``destination`` (once)."""
    return queue_deliveries(conn, [status_delivery(destination, event, uid, about, **params)], at)[0]


def centre_outbox(conn: Connection, centre: str | None) -> str | None:
    """The address a centre's status packages and results are queued to: its first address, if it
    has a credential to fetch them with."""
    found = directory.get_centre(conn, centre) if centre else None
    if found is None or not (found.has_token or found.client_cert_sha256):
        return None
    return found.address


def tell_centre(conn: Connection, uid: str, event: str, at: datetime, about: str = "", **params) -> None:
    """Queue status ``event`` about ``uid`` to the centre it came from, if it came from one with an
    outbox: the "received" status central queued when it routed the object is the mark of that."""
    centre = conn.execute(select(routing_decisions.c.centre).where(routing_decisions.c.uid == uid)).scalar()
    destination = centre_outbox(conn, centre)
    if destination is None:
        return
    received = status_id(uid, "received", destination)
    if conn.execute(select(deliveries.c.id).where(deliveries.c.uid == received)).first() is None:
        return
    queue_status(conn, destination, event, uid, at, about, **params)


def mark_opened(conn: Connection, uid: str, viewer: str, user: str | None, when: str | None, at: datetime) -> int:
    """Set ``opened`` on the delivery of ``uid`` to ``viewer``; returns rows changed."""
    rows = conn.execute(
        select(deliveries.c.id).where(and_(deliveries.c.uid == uid, deliveries.c.destination == viewer.strip().lower()))
    ).all()
    for row in rows:
        set_state(conn, row.id, "opened", at, f"opened by {user or '?'} at {when or at.isoformat()}", opened_by=user,
                  next_attempt_at=None)
    if rows:
        tell_centre(conn, uid, "opened", at, f"{viewer}\0{user or ''}", viewer=viewer.strip().lower(), user=user,
                    time=when or at.isoformat())
    return len(rows)


def mark_delivered(conn: Connection, delivery: Delivery, at: datetime, detail: str, exported=None) -> None:
    """Move a delivery to delivered, and tell the object's centre that its object reached the viewer.
    ``exported(conn, delivery, detail)``, if given, records the export in the same transaction."""
    set_state(conn, delivery.id, "delivered", at, detail, next_attempt_at=None, last_error=None)
    if exported is not None:
        exported(conn, delivery, detail)
    if delivery.status is None:
        tell_centre(conn, delivery.uid, "delivered", at, delivery.destination, viewer=delivery.destination,
                    time=at.isoformat())


@dataclass(frozen=True)
class QueueSummary:
    """What waits for one destination (a viewer, or a centre's outbox of receipts)."""

    destination: str
    waiting: int
    oldest: datetime | None
    failed: int
    last_error: str | None
    next_attempt_at: datetime | None


def queue_summaries(conn: Connection) -> list[QueueSummary]:
    """Per destination with anything pending: how many, the oldest, how many failed, the latest error."""
    d = deliveries.c
    rows = conn.execute(
        select(d.destination, func.count(), func.min(d.created_at),
               func.sum(case((d.state == "failed", 1), else_=0)), func.min(d.next_attempt_at))
        .where(d.state.in_(PENDING)).group_by(d.destination).order_by(d.destination)).all()
    out = []
    for destination, waiting, oldest, failed, next_at in rows:
        error = conn.execute(select(d.last_error).where(d.destination == destination, d.state == "failed",
                                                        d.last_error.is_not(None))
                             .order_by(d.updated_at.desc()).limit(1)).scalar()
        out.append(QueueSummary(destination, waiting, aware(oldest), int(failed or 0), error, aware(next_at)))
    return out


def retry_now(conn: Connection, destination: str, at: datetime, admin: str) -> int:
    """Make every failed delivery to ``destination`` due now (given-up ones included); the number."""
    d = deliveries.c
    ids = [r.id for r in conn.execute(select(d.id).where(d.destination == destination, d.state == "failed"))]
    for delivery_id in ids:
        conn.execute(update(deliveries).where(d.id == delivery_id).values(next_attempt_at=at, updated_at=at))
        conn.execute(delivery_events.insert().values(delivery_id=delivery_id, state="failed", at=at,
                                                     detail=f"retry now, asked by {admin}"))
    return len(ids)


class Deliveries(Connector):
    """The outbox. ``exported(conn, delivery, detail)`` is called in the transaction that moves a
    delivery to delivered (central's audit trail records the export there)."""

    def __init__(self, database, clock, exported=None):
        super().__init__(database, clock)
        self.exported = exported

    """The outbox. Every method returns a Deferred and is one transaction; every
    state change is stamped from the injected clock."""

    # push

    def push_targets(self):
        """Deferred list of :class:`PushTarget`: push viewers with pending deliveries."""
        return self.db.run(push_targets)

    def head_of_line(self, destination: str):
        """Deferred :class:`WaitingDelivery`: the oldest pending push delivery to ``destination``
        with its object, or None."""

        def thd(conn) -> WaitingDelivery | None:
            head = head_of_line(conn, destination)
            if head is None:
                return None
            record = object_by_uid(conn, head.uid)
            return WaitingDelivery(with_study_facts(conn, head, record), record)

        return self.db.run(thd)

    def mark_sent(self, delivery_id: int, attempts: int, detail: str):
        """An attempt begins (push) or the package was fetched (pull)."""
        at = self.now()
        return self.db.run(lambda conn: set_state(conn, delivery_id, "sent", at, detail, attempts=attempts))

    def mark_delivered(self, delivery_id: int, detail: str):
        at = self.now()

        def thd(conn) -> None:
            row = conn.execute(select(deliveries).where(deliveries.c.id == delivery_id)).first()
            if row is not None:
                mark_delivered(conn, Delivery.from_row(row), at, detail, self.exported)

        return self.db.run(thd)

    def mark_failed(self, delivery_id: int, attempts: int, error: str, next_attempt_at: datetime | None, detail: str):
        """A failed attempt; ``next_attempt_at`` None means delivery gave up."""
        at = self.now()
        return self.db.run(lambda conn: set_state(conn, delivery_id, "failed", at, detail, attempts=attempts,
                                                  next_attempt_at=next_attempt_at, last_error=error))

    def queues(self):
        """Deferred list of :class:`QueueSummary`, one per destination with pending deliveries."""
        return self.db.run(queue_summaries)

    def retry_now(self, destination: str, admin: str):
        """Deferred number of failed deliveries to ``destination`` made due now."""
        at = self.now()
        return self.db.run(lambda conn: retry_now(conn, destination, at, admin))

    # pull

    def pull_waiting(self, address: str):
        """Deferred list of :class:`WaitingDelivery` for a pull viewer or a centre, oldest first."""
        return self.db.run(lambda conn: pull_waiting(conn, address))

    def pull_request(self, credential, delivery_id: int):
        """Deferred :class:`PullRequest`: whose outbox ``credential`` (a token, or a verified client
        certificate: :func:`medd.storage.directory.outbox_owner_of`) opens (a viewer's or a centre's), the
        delivery and its object, in one transaction (a pull viewer asks this for every package, and
        each separate database call would wait its turn behind ingest's commits)."""

        def thd(conn) -> PullRequest:
            owner = directory.outbox_owner_of(conn, credential)
            if owner is None:
                return PullRequest(None)
            delivery = delivery_for(conn, delivery_id, owner.address)
            if delivery is None:
                return PullRequest(owner)
            record = None if delivery.status else object_by_uid(conn, delivery.uid)
            return PullRequest(owner, with_study_facts(conn, delivery, record), record)

        return self.db.run(thd)

    def acknowledge(self, credential, delivery_id: int):
        """Deferred :class:`PullRequest` (without the object): the delivery in ``credential``'s outbox,
        moved to delivered if it was pending, in one transaction."""
        at = self.now()

        def thd(conn) -> PullRequest:
            owner = directory.outbox_owner_of(conn, credential)
            if owner is None:
                return PullRequest(None)
            delivery = delivery_for(conn, delivery_id, owner.address)
            if delivery is not None and delivery.state in PENDING:
                mark_delivered(conn, delivery, at, f"acknowledged by {owner.address}", self.exported)
            return PullRequest(owner, delivery)

        return self.db.run(thd)

    # tracking

    def of_object(self, uid: str):
        """Deferred list of the :class:`Delivery` rows of one object."""
        return self.db.run(lambda conn: deliveries_of(conn, uid))

    def record_status(self, status: StatusEvent):
        """Deferred bool: store a status message (False if already recorded) and, for
        "opened", move the delivery to opened, in one transaction."""
        at = self.now()

        def thd(conn) -> bool:
            created = store_status(conn, status, at)
            if created and status.event in ("opened", "viewed"):
                mark_opened(conn, status.uid, status.receipt.origin, status.user, status.time, at)
            return created

        return self.db.run(thd)
