"""Tracking: everything central knows about an object, read back in one
transaction: how it arrived, the routing decision, quarantine and corrections,
each delivery with its history, status messages from viewers, and the
overlays and reports attached to it; and a study's state summed over its
images (:func:`study_state`)."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, case, exists, func, or_, select
from sqlalchemy.engine import Connection

from medd.package import AttachmentId
from medd.storage.connector import Connector, aware
from medd.storage.index import ObjectRecord, Receipt, object_by_uid
from medd.storage.routing_tables import corrections, deliveries, delivery_events, quarantine, routing_decisions
from medd.storage.schema import objects, receipts, status_events


@dataclass(frozen=True)
class Received:
    """A package (or DICOM association) that carried the object."""

    receipt: Receipt
    received_at: datetime


@dataclass(frozen=True)
class Decided:
    centre: str | None
    outcome: str
    decided_at: datetime


@dataclass(frozen=True)
class Correction:
    admin: str
    action: str
    old_route: str | None
    new_route: str | None
    reason: str | None
    at: datetime


@dataclass(frozen=True)
class Quarantined:
    id: int
    destination: str | None
    reason: str
    state: str
    created_at: datetime
    corrections: tuple[Correction, ...] = ()


@dataclass(frozen=True)
class DeliveryEvent:
    state: str
    detail: str | None
    at: datetime


@dataclass(frozen=True)
class DeliveryHistory:
    id: int
    destination: str
    state: str
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    opened_by: str | None
    message_id: str
    history: tuple[DeliveryEvent, ...] = ()


@dataclass(frozen=True)
class StatusReceived:
    event: str
    user: str | None
    time: str | None  # as the viewer stated it
    origin: str
    received_at: datetime


@dataclass(frozen=True)
class Attached:
    """An overlay or report attached to the object or its study."""

    uid: str
    media_type: str
    origin: str
    received_at: datetime
    #: An overlay's versions: the overlay it replaces (its sender's ``supersedes=``), and whether it is the
    #: image's current version (no later overlay of the same sender replaces it). A withdrawal is a current
    #: version without annotations.
    supersedes: str | None = None
    current: bool = True
    sop_class_uid: str | None = None  # an overlay's: a presentation state, or a measurement report (an SR)


@dataclass(frozen=True)
class ObjectHistory:
    object: ObjectRecord
    received: tuple[Received, ...]
    routing: Decided | None
    quarantine: tuple[Quarantined, ...]
    deliveries: tuple[DeliveryHistory, ...]
    status: tuple[StatusReceived, ...]
    overlays: tuple[Attached, ...]
    reports: tuple[Attached, ...]


def _attached(r) -> Attached:
    return Attached(r.sop_instance_uid, r.media_type, r.origin, aware(r.received_at))


def overlay_versions(conn: Connection, image_uid: str) -> tuple[Attached, ...]:
    """The image's overlays, oldest first, each with the overlay it supersedes (from the ``Medd-Attachment`` of
    the package that brought it) and whether it is current. Only an overlay from the same origin can be
    superseded: one viewer cannot retire another's annotations."""
    rows = list(conn.execute(
        select(objects, receipts.c.attachment).select_from(
            objects.outerjoin(receipts, receipts.c.uid == objects.c.sop_instance_uid))
        .where(and_(objects.c.object_type == "overlay", objects.c.referenced_image_uid == image_uid))
        .order_by(objects.c.id)))
    origin_of = {r.sop_instance_uid: r.origin for r in rows}
    supersedes = {}
    for r in rows:
        previous = AttachmentId.parse(r.attachment).get("supersedes") if r.attachment else None
        if previous is not None and origin_of.get(previous) == r.origin:
            supersedes[r.sop_instance_uid] = previous
    retired = set(supersedes.values())
    seen, out = set(), []
    for r in rows:
        if r.sop_instance_uid in seen:  # one object, several packages
            continue
        seen.add(r.sop_instance_uid)
        out.append(Attached(r.sop_instance_uid, r.media_type, r.origin, aware(r.received_at),
                            supersedes.get(r.sop_instance_uid), r.sop_instance_uid not in retired, r.sop_class_uid))
    return tuple(out)


def object_history(conn: Connection, uid: str) -> ObjectHistory | None:
    record = object_by_uid(conn, uid)
    if record is None:
        return None
    decision = conn.execute(select(routing_decisions).where(routing_decisions.c.uid == uid)).first()
    received = tuple(
        Received(Receipt(r.message_id, r.attachment, r.uid, r.origin, r.destination, r.transport, r.peer), aware(r.received_at))
        for r in conn.execute(select(receipts).where(receipts.c.uid == uid).order_by(receipts.c.id))
    )
    held = tuple(
        Quarantined(q.id, q.destination, q.reason, q.state, aware(q.created_at), tuple(
            Correction(c.admin, c.action, c.old_route, c.new_route, c.reason, aware(c.at))
            for c in conn.execute(select(corrections).where(corrections.c.quarantine_id == q.id).order_by(corrections.c.id))
        ))
        for q in conn.execute(select(quarantine).where(quarantine.c.uid == uid).order_by(quarantine.c.id))
    )
    sent = tuple(
        DeliveryHistory(d.id, d.destination, d.state, d.attempts, aware(d.next_attempt_at), d.last_error, d.opened_by,
                        d.message_id, tuple(
                            DeliveryEvent(e.state, e.detail, aware(e.at))
                            for e in conn.execute(select(delivery_events).where(delivery_events.c.delivery_id == d.id)
                                                  .order_by(delivery_events.c.id))
                        ))
        for d in conn.execute(select(deliveries).where(deliveries.c.uid == uid).order_by(deliveries.c.id))
    )
    status = tuple(
        StatusReceived(r.event, r.user, r.event_time, r.origin, aware(r.received_at))
        for r in conn.execute(select(status_events).where(status_events.c.uid == uid).order_by(status_events.c.id))
    )
    overlays: tuple[Attached, ...] = ()
    if record.object_type == "image":
        overlays = overlay_versions(conn, uid)
    reports = tuple(_attached(r) for r in conn.execute(
        select(objects).where(and_(objects.c.object_type == "report", objects.c.study_instance_uid == record.study_instance_uid))
        .order_by(objects.c.id)) if r.sop_instance_uid != uid)
    return ObjectHistory(
        object=record,
        received=received,
        routing=Decided(decision.centre, decision.outcome, aware(decision.decided_at)) if decision else None,
        quarantine=held,
        deliveries=sent,
        status=status,
        overlays=overlays,
        reports=reports,
    )


@dataclass(frozen=True)
class StudyDestination:
    """A study's images at one destination (a viewer): how many are queued for it, delivered, opened, and by whom."""

    destination: str
    images: int
    pending: int  # queued, sent or failed (retrying)
    delivered: int  # delivered or opened
    opened: int
    opened_by: tuple[tuple[str, int], ...]  # (user, images they opened), by user


@dataclass(frozen=True)
class StudyState:
    """What central knows of a study, image counts rather than one history per image."""

    study_uid: str
    centre: str | None
    patient_id: str | None
    modalities: tuple[str, ...]
    images: int
    first_received_at: datetime
    last_received_at: datetime
    quarantined: int
    destinations: tuple[StudyDestination, ...]
    reports: tuple[Attached, ...]
    overlays: int

    @property
    def state(self) -> str:
        """The furthest the whole study got: received, delivered, opened or reported."""
        if self.reports:
            return "reported"
        if any(d.opened for d in self.destinations):
            return "opened"
        if self.destinations and all(d.delivered == d.images for d in self.destinations):
            return "delivered"
        return "received"


def study_state(conn: Connection, study_uid: str) -> StudyState | None:
    """The study's state, or None when central holds no image of it."""
    c = objects.c
    head = conn.execute(
        select(func.count(), func.min(c.received_at), func.max(c.received_at), func.min(c.patient_id))
        .where(and_(c.study_instance_uid == study_uid, c.object_type == "image"))).one()
    if not head[0]:
        return None
    image_uids = select(c.sop_instance_uid).where(and_(c.study_instance_uid == study_uid, c.object_type == "image"))
    modalities = tuple(sorted(m for m in conn.execute(
        select(c.modality).distinct().where(c.sop_instance_uid.in_(image_uids))).scalars() if m))
    centre = conn.execute(select(func.min(routing_decisions.c.centre)).where(
        routing_decisions.c.uid.in_(image_uids))).scalar()
    d = deliveries.c
    per_destination = conn.execute(
        select(d.destination, func.count(),
               func.count(case((d.state.in_(("queued", "sent", "failed")), 1))),
               func.count(case((d.state.in_(("delivered", "opened")), 1))),
               func.count(case((d.state == "opened", 1))))
        .where(and_(d.uid.in_(image_uids), d.status.is_(None)))
        .group_by(d.destination).order_by(d.destination)).all()
    e = status_events.c
    opened: dict[str, list[tuple[str, int]]] = {}
    for origin, user, count in conn.execute(
            select(e.origin, e.user, func.count(func.distinct(e.uid)))
            .where(and_(e.event == "opened", e.uid.in_(image_uids)))
            .group_by(e.origin, e.user).order_by(e.origin, e.user)):
        opened.setdefault(origin.lower(), []).append((user or "?", count))
    destinations = tuple(
        StudyDestination(dest, images, pending, delivered, opened_n, tuple(opened.get(dest.lower(), ())))
        for dest, images, pending, delivered, opened_n in per_destination)
    quarantined = conn.execute(select(func.count(func.distinct(quarantine.c.uid))).where(and_(
        quarantine.c.uid.in_(image_uids), quarantine.c.state == "held"))).scalar_one()
    reports = tuple(_attached(r) for r in conn.execute(
        select(objects).where(and_(c.object_type == "report", c.study_instance_uid == study_uid)).order_by(c.id)))
    overlays = conn.execute(select(func.count()).where(and_(
        c.object_type == "overlay", c.referenced_image_uid.in_(image_uids)))).scalar_one()
    return StudyState(study_uid=study_uid, centre=centre, patient_id=head[3], modalities=modalities, images=head[0],
                      first_received_at=aware(head[1]), last_received_at=aware(head[2]), quarantined=quarantined,
                      destinations=destinations, reports=reports, overlays=overlays)


def track(conn: Connection, key: str) -> list[ObjectHistory]:
    """Histories for an object UID, a study UID, or a Message-ID."""
    direct = object_history(conn, key)
    if direct is not None:
        return [direct]
    uids = list(conn.execute(
        select(objects.c.sop_instance_uid).where(objects.c.study_instance_uid == key).order_by(objects.c.id)).scalars())
    if not uids:
        uids = list(conn.execute(select(receipts.c.uid).where(receipts.c.message_id == key)).scalars())
        uids += list(conn.execute(select(deliveries.c.uid).where(deliveries.c.message_id == key)).scalars())
    return [h for h in (object_history(conn, u) for u in dict.fromkeys(uids)) if h is not None]


#: The states a tracking search may ask for: a delivery's, an object held in quarantine, or overdue.
SEARCH_STATES = ("queued", "sent", "delivered", "opened", "failed", "quarantined", "overdue")


@dataclass(frozen=True)
class TrackingRow:
    """One object found by a tracking search, with its routing outcome and every delivery's state."""

    uid: str
    study_instance_uid: str | None
    patient_id: str | None
    accession_number: str | None
    modality: str | None
    centre: str | None
    outcome: str | None
    received_at: datetime
    deliveries: tuple[tuple[str, str], ...]  # (destination, state)
    id: int = 0  # the object's row: a search continues below it (``before``)


def search(conn: Connection, *, centre: str = "", viewer: str = "", patient: str = "", accession: str = "",
           since: datetime | None = None, until: datetime | None = None, state: str = "",
           overdue_before: datetime | None = None, limit: int = 200, before: int | None = None) -> list[TrackingRow]:
    """Objects by centre, viewer, patient, accession, received between ``since`` and ``until``, and state, newest
    first; ``before``: only those older than that row (the last :attr:`TrackingRow.id` of the previous page).
    ``state = "overdue"``: a delivery failed, or waiting or delivered-not-opened since before ``overdue_before``."""
    o, d = objects.c, deliveries.c
    q = (select(o.id, o.sop_instance_uid, o.study_instance_uid, o.patient_id, o.accession_number, o.modality,
                o.received_at, routing_decisions.c.centre, routing_decisions.c.outcome)
         .outerjoin(routing_decisions, routing_decisions.c.uid == o.sop_instance_uid)
         .where(o.object_type != "status"))
    mine = and_(d.uid == o.sop_instance_uid, d.status.is_(None))
    if centre:
        q = q.where(routing_decisions.c.centre == centre)
    if patient:
        q = q.where(o.patient_id == patient)
    if accession:
        q = q.where(o.accession_number == accession)
    if since is not None:
        q = q.where(o.received_at >= since)
    if until is not None:
        q = q.where(o.received_at < until)
    if before is not None:
        q = q.where(o.id < before)
    if viewer:
        q = q.where(exists().where(and_(mine, d.destination == viewer.strip().lower())))
    if state == "quarantined":
        q = q.where(exists().where(and_(quarantine.c.uid == o.sop_instance_uid, quarantine.c.state == "held")))
    elif state == "overdue":
        late = and_(d.updated_at < overdue_before, d.state.in_(("queued", "sent", "delivered")))
        q = q.where(exists().where(and_(mine, or_(d.state == "failed", late))))
    elif state:
        q = q.where(exists().where(and_(mine, d.state == state)))
    rows = conn.execute(q.order_by(o.id.desc()).limit(limit)).all()
    found = []
    for r in rows:
        sent = tuple((x.destination, x.state) for x in conn.execute(
            select(d.destination, d.state).where(d.uid == r.sop_instance_uid, d.status.is_(None)).order_by(d.id)))
        found.append(TrackingRow(r.sop_instance_uid, r.study_instance_uid, r.patient_id, r.accession_number,
                                 r.modality, r.centre, r.outcome, aware(r.received_at), sent, r.id))
    return found


class Tracking(Connector):
    """Read-only: the history of objects. Every method returns a Deferred."""

    def object_history(self, uid: str):
        """Deferred :class:`ObjectHistory` of one object, or None."""
        return self.db.run(lambda conn: object_history(conn, uid))

    def study_state(self, study_uid: str):
        """Deferred :class:`StudyState` of a study, or None."""
        return self.db.run(lambda conn: study_state(conn, study_uid))

    def track(self, key: str):
        """Deferred list of :class:`ObjectHistory` for an object UID, a study UID or a Message-ID."""
        return self.db.run(lambda conn: track(conn, key))

    def search(self, **filters):
        """Deferred list of :class:`TrackingRow` (see :func:`search`)."""
        return self.db.run(lambda conn: search(conn, **filters))
