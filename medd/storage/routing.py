"""Central's routing records: one decision per object, the quarantine with
the administrators' corrections, and the outbox rows a decision queues.

Which destination an object goes to and whether it may go there is central's
policy (``medd.central.routing``); this connector hands that policy the
questions it asks (:class:`RoutingLookups`) and writes down its answers,
for a whole batch of objects in one transaction.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Callable

from sqlalchemy import and_, bindparam, select, update
from sqlalchemy.engine import Connection
from twisted.logger import Logger

from medd.storage import directory
from medd.storage.connector import Connector, aware
from medd.storage.deliveries import (NewDelivery, centre_outbox, queue_deliveries, queue_delivery, status_delivery,
                                     tell_centre)
from medd.storage.index import ObjectRecord, object_by_uid
from medd.storage.routing_tables import corrections, quarantine, routing_decisions
from medd.storage.schema import objects, receipts

log = Logger()


class CorrectionError(ValueError):
    """An administrator's correction that cannot be applied (and was not)."""


@dataclass(frozen=True)
class Queue:
    """Part of a decision: queue the object (or another, ``uid``) for ``destination``."""

    destination: str
    detail: str
    uid: str | None = None  # another object than the decision's: a result that found its centre late


@dataclass(frozen=True)
class Hold:
    """Part of a decision: quarantine the object (for ``destination``, if one was named)."""

    destination: str | None
    reason: str


@dataclass(frozen=True)
class Tell:
    """Part of a decision: queue a status package to a centre (its receipts)."""

    destination: str
    event: str
    uid: str  # the centre's object the status is about
    about: str = ""  # what makes this event distinct from another of the same kind (a viewer, a report)
    params: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class RoutingDecision:
    """What the policy decided about one object, written down once."""

    uid: str
    centre: str | None
    outcome: str  # "routed" | "quarantined" | "attached"
    queue: tuple[Queue, ...] = ()
    hold: tuple[Hold, ...] = ()
    tell: tuple[Tell, ...] = ()


@dataclass(frozen=True)
class RoutingPass:
    """One batch routed: its decisions and the highest object id it covered."""

    decisions: tuple[RoutingDecision, ...]
    last_id: int


@dataclass(frozen=True)
class QuarantineEntry:
    id: int
    uid: str
    destination: str | None
    reason: str
    state: str
    created_at: datetime
    patient_id: str | None = None
    modality: str | None = None
    origin: str | None = None
    centre: str | None = None
    study_instance_uid: str | None = None


class RoutingLookups:
    """The questions the routing policy asks, answered inside the routing transaction.

    Answers that depend only on the directory are remembered for the rest of
    the transaction, so a batch looks each sender, rule set and destination up
    once rather than once per object; the directory cannot change under it.
    """

    def __init__(self, conn: Connection, pending: "_PendingRows | None" = None):
        self.conn = conn
        self._memo: dict = {}
        # The first package To of each object of a routing pass, read in one query (prefetch).
        self._destinations: dict[str, str | None] = {}
        # Decisions and quarantine entries of the pass not written yet: written before any
        # question that reads those tables, so each question sees every decision made before it.
        self._pending = pending
        self._results: dict[str, list] = {}  # study_results, per study (see decided)

    def prefetch(self, uids: list[str]) -> None:
        """Read the package To of every object in ``uids`` in one query, for :meth:`package_destination`."""
        found: dict[str, str | None] = dict.fromkeys(uids)
        for row in self.conn.execute(_FIRST_DESTINATIONS, {"uids": uids}):
            if found[row.uid] is None:
                found[row.uid] = row.destination.strip().lower()
        self._destinations.update(found)

    def _written(self) -> None:
        if self._pending is not None:
            self._pending.write(self.conn)

    def _remember(self, key, compute):
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def package_destination(self, uid: str) -> str | None:
        """The To of the first package that carried ``uid``, if any."""
        if uid in self._destinations:
            return self._destinations[uid]
        row = self.conn.execute(
            select(receipts.c.destination).where(receipts.c.uid == uid).order_by(receipts.c.id).limit(1)
        ).first()
        return row.destination.strip().lower() if row else None

    def centre_of(self, origin: str, transport: str) -> str | None:
        """The registered centre of a sender (calling AE title or package origin)."""
        return self._remember(("centre", origin, transport), lambda: directory.centre_of(self.conn, origin, transport))

    def centre_networks(self, centre: str) -> tuple[str, ...]:
        """The networks a centre's modalities send from (empty: not restricted)."""
        return self._remember(("networks", centre), lambda: directory.get_centre(self.conn, centre).networks)

    def centre_outbox(self, centre: str | None) -> str | None:
        """Where a centre's receipts and results go (None: it has no outbox credential)."""
        return self._remember(("outbox", centre), lambda: centre_outbox(self.conn, centre))

    def study_centre(self, study_uid: str) -> str | None:
        """The registered centre of a study: the one its images were decided to come from, first found."""
        self._written()
        return self.conn.execute(
            select(routing_decisions.c.centre)
            .join(objects, objects.c.sop_instance_uid == routing_decisions.c.uid)
            .where(and_(objects.c.study_instance_uid == study_uid, objects.c.object_type == "image",
                        routing_decisions.c.centre.is_not(None)))
            .order_by(objects.c.id)
            .limit(1)
        ).scalar()

    def study_results(self, study_uid: str) -> list[tuple[str, str, str | None]]:
        """(uid, object type, centre decided) of the overlays and reports routed in a study, oldest first.

        Asked for every image of a centre's: remembered per study until the pass decides an
        overlay or report of that study (:meth:`decided`)."""
        if study_uid not in self._results:
            self._results[study_uid] = self._study_results(study_uid)
        return self._results[study_uid]

    def decided(self, record: ObjectRecord) -> None:
        """The pass decided ``record``: what was remembered about its study's results is forgotten."""
        if record.object_type in ("overlay", "report"):
            self._results.pop(record.study_instance_uid, None)

    def _study_results(self, study_uid: str) -> list[tuple[str, str, str | None]]:
        self._written()
        return [tuple(r) for r in self.conn.execute(
            select(objects.c.sop_instance_uid, objects.c.object_type, routing_decisions.c.centre)
            .join(routing_decisions, routing_decisions.c.uid == objects.c.sop_instance_uid)
            .where(and_(objects.c.study_instance_uid == study_uid, objects.c.object_type.in_(("overlay", "report"))))
            .order_by(objects.c.id)
        )]

    def centre_images(self, study_uid: str, centre: str) -> list[str]:
        """UIDs of the images of a study that came from ``centre``, oldest first."""
        self._written()
        return list(self.conn.execute(
            select(objects.c.sop_instance_uid)
            .join(routing_decisions, routing_decisions.c.uid == objects.c.sop_instance_uid)
            .where(and_(objects.c.study_instance_uid == study_uid, objects.c.object_type == "image",
                        routing_decisions.c.centre == centre))
            .order_by(objects.c.id)
        ).scalars())

    def matching_rules(self, centre: str | None, modality: str, object_type: str) -> list[str]:
        """Destinations of the matching routing rules, most specific first."""
        return self._remember(("rules", centre, modality, object_type),
                              lambda: directory.matching_rules(self.conn, centre, modality, object_type))

    def is_viewer(self, address: str) -> bool:
        return self._remember(("viewer", address), lambda: directory.get_viewer(self.conn, address) is not None)

    def is_authorised(self, address: str, centre: str, modality: str) -> bool:
        return self._remember(("authorised", address, centre, modality),
                              lambda: directory.is_authorised(self.conn, address, centre, modality))


Policy = Callable[[ObjectRecord, RoutingLookups], RoutingDecision]
Verify = Callable[[RoutingLookups, str, ObjectRecord], str | None]


def undecided(conn: Connection, after_id: int = 0, limit: int = 200) -> list[tuple[int, str]]:
    """(id, uid) of objects with no routing decision, oldest first, with ids above ``after_id``."""
    q = (
        select(objects.c.id, objects.c.sop_instance_uid)
        .outerjoin(routing_decisions, routing_decisions.c.uid == objects.c.sop_instance_uid)
        .where(and_(routing_decisions.c.uid.is_(None), objects.c.id > after_id))
        .order_by(objects.c.id)
        .limit(limit)
    )
    return [(r.id, r.sop_instance_uid) for r in conn.execute(q)]


# Built once: the statements of a routing pass, so that SQLAlchemy compiles and keys each
# once for the process rather than once per object.
_UNDECIDED = (
    select(objects)
    .outerjoin(routing_decisions, routing_decisions.c.uid == objects.c.sop_instance_uid)
    .where(and_(routing_decisions.c.uid.is_(None), objects.c.id > bindparam("after_id")))
    .order_by(objects.c.id)
    .limit(bindparam("limit"))
)
_FIRST_DESTINATIONS = (
    select(receipts.c.uid, receipts.c.destination)
    .where(receipts.c.uid.in_(bindparam("uids", expanding=True)))
    .order_by(receipts.c.id)
)
_INSERT_HOLD = quarantine.insert()
_INSERT_DECISION = routing_decisions.insert()


class _PendingRows:
    """Quarantine entries and decisions of a routing pass, written together (one executemany each)."""

    def __init__(self):
        self.holds: list[dict] = []
        self.decisions: list[dict] = []

    def add(self, decision: RoutingDecision, at: datetime) -> None:
        # Logged by the caller once committed: this transaction may be retried or rolled back.
        self.holds += [dict(uid=decision.uid, destination=hold.destination, reason=hold.reason, state="held",
                            created_at=at) for hold in decision.hold]
        self.decisions.append(dict(uid=decision.uid, centre=decision.centre, outcome=decision.outcome,
                                   decided_at=at))

    def write(self, conn: Connection) -> None:
        if self.holds:
            conn.execute(_INSERT_HOLD, self.holds)
            self.holds = []
        if self.decisions:
            conn.execute(_INSERT_DECISION, self.decisions)
            self.decisions = []


def route_undecided(conn: Connection, policy: Policy, after_id: int, at: datetime, limit: int = 200) -> RoutingPass:
    """Decide up to ``limit`` undecided objects and write the decisions down: their outbox rows,
    quarantine entries and decisions, each kind together. The objects' rows and their
    package To are read in one query each for the whole pass."""
    rows = conn.execute(_UNDECIDED, {"after_id": after_id, "limit": limit}).all()
    pending = _PendingRows()
    lookups = RoutingLookups(conn, pending)
    lookups.prefetch([r.sop_instance_uid for r in rows])
    decisions = []
    # The pass's outbox rows, queued together at its end (no question of the policy reads the outbox).
    outbox: list[NewDelivery] = []
    for row in rows:
        record = ObjectRecord.from_row(row)
        decision = policy(record, lookups)
        lookups.decided(record)
        outbox += [NewDelivery(queued.uid or decision.uid, queued.destination, queued.detail)
                   for queued in decision.queue]
        outbox += [status_delivery(told.destination, told.event, told.uid, told.about, **dict(told.params))
                   for told in decision.tell]
        pending.add(decision, at)
        decisions.append(decision)
    pending.write(conn)
    queue_deliveries(conn, outbox, at)
    return RoutingPass(tuple(decisions), rows[-1].id if rows else after_id)


def list_quarantine(conn: Connection, state: str | None = "held") -> list[QuarantineEntry]:
    q = (
        select(quarantine, objects.c.patient_id, objects.c.modality, objects.c.origin, routing_decisions.c.centre,
               objects.c.study_instance_uid)
        .join(objects, objects.c.sop_instance_uid == quarantine.c.uid)
        .outerjoin(routing_decisions, routing_decisions.c.uid == quarantine.c.uid)
        .order_by(quarantine.c.id)
    )
    if state:
        q = q.where(quarantine.c.state == state)
    return [
        QuarantineEntry(r.id, r.uid, r.destination, r.reason, r.state, aware(r.created_at), r.patient_id, r.modality,
                        r.origin, r.centre, r.study_instance_uid)
        for r in conn.execute(q)
    ]


def _held(conn: Connection, entry_id: int):
    row = conn.execute(select(quarantine).where(quarantine.c.id == entry_id)).first()
    if row is None:
        raise CorrectionError(f"no quarantine entry {entry_id}")
    if row.state != "held":
        raise CorrectionError(f"quarantine entry {entry_id} is already {row.state}")
    return row


def correct_route(conn: Connection, entry_id: int, destination: str, admin: str, verify: Verify, at: datetime,
                  corrected=None) -> int:
    """Re-verify with the new destination; release and queue it, or raise CorrectionError."""
    row = _held(conn, entry_id)
    destination = destination.strip().lower()
    reason = verify(RoutingLookups(conn), destination, object_by_uid(conn, row.uid))
    if reason is not None:
        raise CorrectionError(f"not released: {reason}")
    conn.execute(update(quarantine).where(quarantine.c.id == entry_id).values(state="released", resolved_at=at))
    conn.execute(corrections.insert().values(
        quarantine_id=entry_id, admin=admin, action="route", old_route=row.destination, new_route=destination, at=at))
    delivery_id = queue_delivery(conn, row.uid, destination, at, f"released from quarantine by {admin}")
    tell_centre(conn, row.uid, "routed", at, destination, viewer=destination)
    if corrected is not None:
        corrected(conn, row.uid, admin, "U", f"quarantine entry {entry_id} routed to {destination} "
                                             f"(was {row.destination or 'none'})")
    return delivery_id or 0


def reject(conn: Connection, entry_id: int, reason: str, admin: str, at: datetime, corrected=None) -> None:
    row = _held(conn, entry_id)
    if corrected is not None:
        corrected(conn, row.uid, admin, "D", f"quarantine entry {entry_id} rejected: {reason}")
    conn.execute(update(quarantine).where(quarantine.c.id == entry_id).values(state="rejected", resolved_at=at))
    conn.execute(corrections.insert().values(
        quarantine_id=entry_id, admin=admin, action="reject", old_route=row.destination, new_route=None, reason=reason, at=at))


class Routing(Connector):
    """Routing decisions and the quarantine. Every method returns a Deferred and is one transaction.

    ``corrected(conn, uid, admin, action, detail)`` is called in the transaction of an administrator's
    correction (central's audit trail records it there, whether it came from the CLI or the API)."""

    def __init__(self, database, clock, corrected=None):
        super().__init__(database, clock)
        self.corrected = corrected

    def route_undecided(self, policy: Policy, after_id: int = 0, limit: int = 200):
        """Deferred :class:`RoutingPass`: up to ``limit`` objects with ids above ``after_id`` and no
        decision yet, each decided by ``policy(record, lookups)`` and written down, in one
        transaction (a commit per object would make routing wait on the disk once per object)."""
        at = self.now()
        return self.db.run(lambda conn: route_undecided(conn, policy, after_id, at, limit))

    def undecided(self, after_id: int = 0, limit: int = 200):
        """Deferred list of the UIDs of objects still without a decision, oldest first."""
        return self.db.run(lambda conn: [uid for _, uid in undecided(conn, after_id, limit)])

    def quarantined(self, state: str | None = "held"):
        """Deferred list of :class:`QuarantineEntry` (every state if ``state`` is None)."""
        return self.db.run(lambda conn: list_quarantine(conn, state))

    def correct_route(self, entry_id: int, destination: str, admin: str, verify: Verify):
        """Deferred id of the queued delivery; fails with :class:`CorrectionError` (nothing
        changed) unless the entry is held and ``verify`` finds no reason to refuse."""
        at = self.now()
        return self.db.run(lambda conn: correct_route(conn, entry_id, destination, admin, verify, at, self.corrected))

    def reject(self, entry_id: int, reason: str, admin: str):
        at = self.now()
        return self.db.run(lambda conn: reject(conn, entry_id, reason, admin, at, self.corrected))
