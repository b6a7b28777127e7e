"""Route verification and quarantine.

For each indexed object the router decides, once and durably, where it goes:
the destination comes from the package's ``To``, else the object's Names of
Intended Recipients of Results (0040,1010), else the administrator's routing
rules. Every destination is verified (it is a viewer in the directory, and
that viewer is authorised for the object's imaging centre and modality)
before an outbox row is queued; what fails verification is quarantined with
the reason, and nothing is sent.

The imaging centre is decided by who sent the object (calling AE title or
package origin), never by a tag inside it.
"""
from __future__ import annotations

import email.utils
from dataclasses import dataclass

from sqlalchemy import and_, select, update
from sqlalchemy.engine import Connection
from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from medd.central import directory
from medd.plugins.hookspecs import hookimpl
from medd.storage.index import ObjectRecord, now, object_by_uid
from medd.storage.routing_tables import (
    corrections,
    deliveries,
    delivery_events,
    quarantine,
    routing_decisions,
)
from medd.storage.schema import objects, receipts

log = Logger()


class CorrectionError(ValueError):
    """An administrator's correction that cannot be applied (and was not)."""


@dataclass(frozen=True)
class QuarantineEntry:
    id: int
    uid: str
    destination: str | None
    reason: str
    state: str
    created_at: object
    patient_id: str | None = None
    modality: str | None = None
    origin: str | None = None
    centre: str | None = None


def _addresses(text: str | None) -> list[str]:
    if not text:
        return []
    out = []
    for value in text.split("\\"):
        _, addr = email.utils.parseaddr(value.strip())
        addr = (addr or value).strip().lower()
        if addr and addr not in out:
            out.append(addr)
    return out


def package_destination(conn: Connection, uid: str) -> str | None:
    """The To of the first package that carried ``uid``, if any."""
    row = conn.execute(
        select(receipts.c.destination).where(receipts.c.uid == uid).order_by(receipts.c.id).limit(1)
    ).first()
    return row.destination.strip().lower() if row else None


def object_centre(conn: Connection, record: ObjectRecord) -> str | None:
    """The centre that sent ``record``; for an overlay or report coming back
    from a viewer, the centre of the study it is about."""
    centre = directory.centre_of(conn, record.origin, record.transport)
    if centre is not None or record.object_type not in ("overlay", "report"):
        return centre
    for other in conn.execute(
        select(objects.c.origin, objects.c.transport)
        .where(and_(objects.c.study_instance_uid == record.study_instance_uid, objects.c.object_type == "image"))
        .order_by(objects.c.id)
    ):
        centre = directory.centre_of(conn, other.origin, other.transport)
        if centre is not None:
            return centre
    return None


def verify(conn: Connection, destination: str, centre: str | None, record: ObjectRecord) -> str | None:
    """None if ``destination`` may receive ``record``; else the reason it may not."""
    if directory.get_viewer(conn, destination) is None:
        return f"unknown destination {destination}: no such viewer in the directory"
    if centre is None:
        return f"unknown imaging centre: {record.transport} origin {record.origin!r} is not a registered centre"
    if not directory.is_authorised(conn, destination, centre, record.modality or ""):
        return f"viewer {destination} is not authorised for centre {centre} modality {record.modality or '-'}"
    return None


def queue_delivery(conn: Connection, uid: str, destination: str, at, detail: str) -> int | None:
    """Queue (uid -> destination) once; returns the outbox row id, None if already queued."""
    exists = conn.execute(
        select(deliveries.c.id).where(and_(deliveries.c.uid == uid, deliveries.c.destination == destination))
    ).first()
    if exists:
        return None
    domain = "medd.invalid"
    delivery_id = conn.execute(
        deliveries.insert().values(
            uid=uid, destination=destination, state="queued",
            message_id=email.utils.make_msgid(idstring="out", domain=domain),
            attempts=0, next_attempt_at=at, created_at=at, updated_at=at,
        )
    ).inserted_primary_key[0]
    conn.execute(delivery_events.insert().values(delivery_id=delivery_id, state="queued", detail=detail, at=at))
    return delivery_id


def _memo(cache: dict | None, key, compute):
    """``compute()``, remembered in ``cache`` under ``key`` for the rest of one routing pass."""
    if cache is None:
        return compute()
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def decide(conn: Connection, uid: str, node_name: str, at=None, cache: dict | None = None) -> str:
    """Route one object (in the caller's transaction); returns the outcome.

    ``cache`` lets a pass over many objects look the directory up once per
    sender, rule set and destination rather than once per object; the pass
    runs in one transaction, so the directory cannot change under it.
    """
    at = at or now()
    record = object_by_uid(conn, uid)
    if record.object_type in ("overlay", "report"):
        centre = object_centre(conn, record)  # depends on the study, not only on the sender
    else:
        centre = _memo(cache, ("centre", record.origin, record.transport), lambda: object_centre(conn, record))
    to = package_destination(conn, uid)
    if to and to != node_name.lower() and to.partition("@")[2] != node_name.lower():
        destinations, source = [to], "package To"
    elif _addresses(record.intended_recipients):
        destinations, source = _addresses(record.intended_recipients), "(0040,1010) intended recipients"
    else:
        destinations = _memo(cache, ("rules", centre, record.modality or "", record.object_type),
                             lambda: directory.matching_rules(conn, centre, record.modality or "", record.object_type))
        source = "routing rule"
    outcome = "routed"
    if not destinations:
        if record.object_type in ("overlay", "report"):
            outcome = "attached"  # kept with its image/study; no rule sends it on
        else:
            _hold(conn, uid, None, "no route: no package To, no (0040,1010) recipients and no matching rule", at)
            outcome = "quarantined"
    for destination in destinations:
        reason = _memo(cache, ("verify", destination, centre, record.modality or "", record.origin, record.transport),
                       lambda: verify(conn, destination, centre, record))
        if reason is None:
            queue_delivery(conn, uid, destination, at, f"routed by {source}")
        else:
            _hold(conn, uid, destination, reason, at)
            outcome = "quarantined"
    conn.execute(routing_decisions.insert().values(uid=uid, centre=centre, outcome=outcome, decided_at=at))
    return outcome


def decide_all(conn: Connection, uids: list[str], node_name: str) -> list[str]:
    """Route several objects in the caller's transaction; their outcomes."""
    at = now()
    cache: dict = {}
    return [decide(conn, uid, node_name, at, cache) for uid in uids]


def _hold(conn: Connection, uid: str, destination: str | None, reason: str, at) -> None:
    log.warn("quarantined {uid} for {destination}: {reason}", uid=uid, destination=destination or "-", reason=reason)
    conn.execute(quarantine.insert().values(uid=uid, destination=destination, reason=reason, state="held", created_at=at))


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


# -- administrator corrections ---------------------------------------------------------------------


def list_quarantine(conn: Connection, state: str | None = "held") -> list[QuarantineEntry]:
    q = (
        select(quarantine, objects.c.patient_id, objects.c.modality, objects.c.origin, routing_decisions.c.centre)
        .join(objects, objects.c.sop_instance_uid == quarantine.c.uid)
        .outerjoin(routing_decisions, routing_decisions.c.uid == quarantine.c.uid)
        .order_by(quarantine.c.id)
    )
    if state:
        q = q.where(quarantine.c.state == state)
    return [
        QuarantineEntry(r.id, r.uid, r.destination, r.reason, r.state, r.created_at, r.patient_id, r.modality, r.origin, r.centre)
        for r in conn.execute(q)
    ]


def _held(conn: Connection, entry_id: int):
    row = conn.execute(select(quarantine).where(quarantine.c.id == entry_id)).first()
    if row is None:
        raise CorrectionError(f"no quarantine entry {entry_id}")
    if row.state != "held":
        raise CorrectionError(f"quarantine entry {entry_id} is already {row.state}")
    return row


def correct_route(conn: Connection, entry_id: int, destination: str, admin: str, at=None) -> int:
    """Re-verify with the new destination; release and queue it, or raise CorrectionError."""
    at = at or now()
    row = _held(conn, entry_id)
    destination = destination.strip().lower()
    record = object_by_uid(conn, row.uid)
    centre = object_centre(conn, record)
    reason = verify(conn, destination, centre, record)
    if reason is not None:
        raise CorrectionError(f"not released: {reason}")
    conn.execute(update(quarantine).where(quarantine.c.id == entry_id).values(state="released", resolved_at=at))
    conn.execute(corrections.insert().values(
        quarantine_id=entry_id, admin=admin, action="route", old_route=row.destination, new_route=destination, at=at))
    delivery_id = queue_delivery(conn, row.uid, destination, at, f"released from quarantine by {admin}")
    return delivery_id or 0


def reject(conn: Connection, entry_id: int, reason: str, admin: str, at=None) -> None:
    at = at or now()
    row = _held(conn, entry_id)
    conn.execute(update(quarantine).where(quarantine.c.id == entry_id).values(state="rejected", resolved_at=at))
    conn.execute(corrections.insert().values(
        quarantine_id=entry_id, admin=admin, action="reject", old_route=row.destination, new_route=None, reason=reason, at=at))


class Router:
    """Routes every object that has no routing decision yet.

    ``kick()`` is called when an object is stored and once at start-up; the
    work list is the database itself, so a crash loses no decision.
    """

    def __init__(self, database, node_name: str, on_routed=None):
        self.db = database
        self.node_name = node_name
        self.on_routed = on_routed
        self._running = False
        self._again = False
        # Every object with an id at or below the floor has a decision, so a
        # pass after a new object looks at new rows only, not the whole
        # table. A full pass (floor 0) runs at start and now and then, for
        # ids that a concurrent transaction committed out of order.
        self._floor = 0
        self._full = True
        self._waiters: list[Deferred] = []

    def kick(self, full: bool = False):
        if full:
            self._full = True
        if self._running:
            # The pass under way runs once more; the caller hears when it ends.
            self._again = True
            waiter = Deferred()
            self._waiters.append(waiter)
            return waiter
        return ensureDeferred(self._run())

    async def _run(self) -> None:
        self._running = True
        try:
            while True:
                self._again = False
                start, self._full = (0 if self._full else self._floor), False
                rows = await self.db.run(lambda conn: undecided(conn, start))
                uids = [uid for _, uid in rows]
                if uids:
                    # One transaction for the whole list: a commit (and an
                    # fsync) per object made routing wait on the disk once per
                    # object, behind ingest's own commits.
                    await self.db.run(lambda conn, uids=uids: decide_all(conn, uids, self.node_name))
                    self._floor = max(self._floor, rows[-1][0])
                if uids and self.on_routed is not None:
                    self.on_routed()
                if not uids and not self._again:
                    break
        except Exception:
            log.failure("routing failed; will retry on the next object")
        finally:
            self._running = False
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.callback(None)


class RoutingService(Service):
    """Central's router and outbox, as one child service of the node.

    Subscribes to ``medd_object_stored`` like any plugin would, so a stored
    object is routed at once; at start-up it routes whatever a crash left
    undecided and resumes pending deliveries.
    """

    def __init__(self, reactor, config, plugins, database, api, clock=None, settings=None):
        from medd.central.outbox import DeliveryService
        from medd.central.settings import central_node_settings

        # ``settings``: [delivery] and [push] as the node's validation parsed them.
        settings = settings or central_node_settings(config)
        self.router = Router(database, config.name, on_routed=self._routed)
        self.outbox = DeliveryService(
            reactor, database, api, plugins.senders, config.name,
            settings.delivery.retry, settings=settings.push.for_senders(), clock=clock,
        )
        self.poll_interval = settings.delivery.poll_interval
        self.route_delay = settings.delivery.route_delay
        self._pending = None
        self.clock = clock or reactor
        self._poll = None
        plugins.manager.register(self, name="medd-central-routing")

    @hookimpl
    def medd_object_stored(self, stored) -> None:
        # Objects arriving close together are routed in one pass (one query
        # and one commit for all of them) rather than one pass each.
        if self.running and (self._pending is None or not self._pending.active()):
            self._pending = self.clock.callLater(self.route_delay, self.router.kick)

    def _routed(self) -> None:
        if self.running:
            self.outbox.kick()

    def kick(self):
        """Route and deliver now (after an administrator's correction, say)."""
        self.router.kick()
        return self.outbox.kick()

    def _tick(self):
        # Every twelfth poll re-reads the whole table (see Router._floor).
        self._ticks += 1
        self.router.kick(full=self._ticks % 12 == 1)
        return self.outbox.kick()

    def startService(self) -> None:
        super().startService()
        self.outbox._stopped = False
        # The poll picks up what the CLI changed in the database (a released
        # quarantine entry, a new viewer) and anything a missed kick left.
        self._ticks = 0
        self._poll = LoopingCall(self._tick)
        self._poll.clock = self.clock
        self._poll.start(self.poll_interval, now=True)

    def stopService(self):
        super().stopService()
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self.outbox.stop()


VIEWER_TYPES = ("status", "overlay", "report")


class SenderPolicy:
    """Central's answer to ``medd_check_sender``: who sends what back from viewers.

    A status, overlay or report package whose From is a registered viewer is
    accepted only from that viewer authenticated: its bearer token (HTTP) or
    a TLS client certificate whose CN is its address. Otherwise anyone could
    mark an image opened in the viewer's name, or attach a report as it.
    Registered with the node's plugin manager by central's assembly.
    """

    def __init__(self, database):
        self.db = database

    @hookimpl
    def medd_check_sender(self, claim):
        if claim.object_type not in VIEWER_TYPES:
            return None
        return ensureDeferred(self._check(claim))

    async def _check(self, claim) -> str | None:
        origin, credentials = claim.origin, claim.credentials

        def lookup(conn):
            named = directory.get_viewer(conn, origin)
            by_token = directory.viewer_by_token(conn, credentials) if credentials else None
            return named, by_token

        named, by_token = await self.db.run(lookup)
        if named is None:
            return None  # not a viewer's address: it matches no delivery and attaches only
        if by_token is not None and by_token.address == origin:
            return None
        if claim.transport == "tls" and (claim.peer or "").strip().lower() == origin:
            return None
        return (
            f"a {claim.object_type} package from viewer {origin} must be sent authenticated as that viewer "
            "(its bearer token over HTTP, or its client certificate over TLS)"
        )
