"""The outbox: delivery of queued (object, destination) rows, with retries.

Each push viewer gets its own worker, so one unreachable viewer never delays
another. A viewer's rows go out strictly in the order they were queued: when
the oldest pending row fails, the viewer waits for that row's next attempt
(exponential backoff) before anything after it is tried. The rows are the
work list, so a restart resumes exactly where delivery stopped; a row caught
in flight by a crash is sent again with the same Message-ID, which the
receiver's idempotency turns into a no-op.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import and_, select, update
from sqlalchemy.engine import Connection
from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger

from medd.objects import Content
from medd.package import AttachmentId, build_package
from medd.storage.index import ObjectRecord, object_by_uid
from medd.storage.routing_tables import deliveries, delivery_events, viewers
from medd.storage.schema import objects

log = Logger()

PENDING = ("queued", "sent", "failed")


@dataclass(frozen=True)
class RetryPolicy:
    base: float = 5.0
    multiplier: float = 2.0
    max_delay: float = 3600.0
    max_attempts: int = 20

    def delay(self, attempts: int) -> float:
        """Seconds before the next attempt after ``attempts`` failures."""
        return min(self.base * self.multiplier ** max(attempts - 1, 0), self.max_delay)


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

    @classmethod
    def from_row(cls, r) -> "Delivery":
        return cls(r.id, r.uid, r.destination, r.state, r.message_id, r.attempts,
                   _aware(r.next_attempt_at), r.last_error, r.opened_by)


def _aware(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; they were written in UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


def set_state(conn: Connection, delivery_id: int, state: str, at: datetime, detail: str | None = None, **values) -> None:
    conn.execute(update(deliveries).where(deliveries.c.id == delivery_id).values(state=state, updated_at=at, **values))
    conn.execute(delivery_events.insert().values(delivery_id=delivery_id, state=state, detail=detail, at=at))


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


def push_destinations(conn: Connection) -> dict[str, str]:
    """{viewer address: push URL} of push viewers with pending deliveries."""
    q = (
        select(viewers.c.address, viewers.c.push_url)
        .join(deliveries, deliveries.c.destination == viewers.c.address)
        .where(and_(viewers.c.mode == "push", deliveries.c.state.in_(PENDING), deliveries.c.next_attempt_at.is_not(None)))
        .distinct()
    )
    return {r.address: r.push_url for r in conn.execute(q)}


def pull_waiting(conn: Connection, address: str) -> list[tuple[Delivery, ObjectRecord]]:
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
    return [(Delivery.from_row(r), records[r.uid]) for r in rows]


def delivery_for(conn: Connection, delivery_id: int, address: str) -> Delivery | None:
    row = conn.execute(
        select(deliveries).where(and_(deliveries.c.id == delivery_id, deliveries.c.destination == address))
    ).first()
    return Delivery.from_row(row) if row else None


def attachment_of(record: ObjectRecord) -> AttachmentId:
    """The Medd-Attachment of an indexed object, from its key information."""
    if record.object_type == "overlay":
        return AttachmentId.of("overlay", uid=record.sop_instance_uid, image_uid=record.referenced_image_uid)
    if record.object_type == "report":
        return AttachmentId.of("report", uid=record.sop_instance_uid, study_uid=record.study_instance_uid)
    return AttachmentId.of("image", uid=record.sop_instance_uid)


def package_for(record: ObjectRecord, data: bytes, delivery: Delivery, origin: str) -> bytes:
    """The outgoing package; its Message-ID is the delivery's, stable across retries."""
    content = Content(media_type=record.media_type, data=data)
    return build_package(content, attachment_of(record), origin=origin, destination=delivery.destination,
                         message_id=delivery.message_id)


async def load_package(api, record: ObjectRecord, delivery: Delivery, origin: str) -> bytes:
    """The stored object, read and wrapped into its package off the reactor
    (base64 of an object of hundreds of megabytes is seconds of CPU)."""
    data = await api.read_blob(record.digest)
    return await api.run_blocking(package_for, record, data, delivery, origin)


class DeliveryService:
    """Drives push deliveries; ``kick()`` when something was queued."""

    def __init__(self, reactor, database, api, senders: dict, node_name: str, policy: RetryPolicy,
                 settings: dict | None = None, clock=None):
        self.reactor = reactor
        self.clock = clock or reactor
        self.settings = settings or {}
        self.db = database
        self.api = api  # the node's Ingest: read_blob, run_blocking
        self.senders = senders  # scheme -> ISender
        self.origin = node_name if "@" in node_name else f"central@{node_name}"
        self.policy = policy
        self._busy: set[str] = set()
        self._wakeups: dict[str, object] = {}
        self._stopped = False

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), tz=timezone.utc)

    def stop(self) -> None:
        self._stopped = True
        for call in self._wakeups.values():
            if call.active():
                call.cancel()
        self._wakeups.clear()

    def kick(self):
        return ensureDeferred(self._kick())

    async def _kick(self) -> None:
        if self._stopped:
            return
        try:
            targets = await self.db.run(push_destinations)
        except Exception:
            log.failure("cannot read the outbox")
            return
        for address, url in targets.items():
            if address not in self._busy:
                ensureDeferred(self._drain(address, url))

    def _wake_later(self, address: str, url: str, when: datetime) -> None:
        old = self._wakeups.pop(address, None)
        if old is not None and old.active():
            old.cancel()
        delay = max((when - self.now()).total_seconds(), 0)
        self._wakeups[address] = self.clock.callLater(delay, lambda: ensureDeferred(self._drain(address, url)))

    async def _drain(self, address: str, url: str) -> None:
        """Deliver ``address``'s pending rows in order until none is due."""
        if address in self._busy or self._stopped:
            return
        self._busy.add(address)
        try:
            while not self._stopped:
                head = await self.db.run(lambda conn: head_of_line(conn, address))
                if head is None:
                    return
                if head.next_attempt_at > self.now():
                    self._wake_later(address, url, head.next_attempt_at)
                    return
                if not await self._attempt(head, url):
                    continue  # the failed row now has its next attempt time; loop to schedule it
        except Exception:
            log.failure("delivery worker for {address} stopped", address=address)
        finally:
            self._busy.discard(address)

    async def _attempt(self, delivery: Delivery, url: str) -> bool:
        scheme = url.partition(":")[0]
        sender = self.senders.get(scheme)
        try:
            if sender is None:
                raise RuntimeError(f"no sender for {scheme}: URLs")
            record = await self.db.run(lambda conn: object_by_uid(conn, delivery.uid))
            package = await load_package(self.api, record, delivery, self.origin)
            at = self.now()
            await self.db.run(lambda conn: set_state(conn, delivery.id, "sent", at, f"to {url}", attempts=delivery.attempts + 1))
            await sender.send(self.reactor, url, package, self.settings)
        except Exception as e:
            attempts = delivery.attempts + 1
            error = f"{type(e).__name__}: {e}"
            at = self.now()
            if attempts >= self.policy.max_attempts:
                next_at, detail = None, f"gave up after {attempts} attempts: {error}"
            else:
                next_at = at + timedelta(seconds=self.policy.delay(attempts))
                detail = f"attempt {attempts} failed: {error}; next at {next_at.isoformat()}"
            log.warn("delivery of {uid} to {destination} failed: {detail}", uid=delivery.uid,
                     destination=delivery.destination, detail=detail)
            await self.db.run(lambda conn: set_state(
                conn, delivery.id, "failed", at, detail, attempts=attempts, next_attempt_at=next_at, last_error=error))
            return False
        at = self.now()
        await self.db.run(lambda conn: set_state(
            conn, delivery.id, "delivered", at, f"accepted by {url}", next_attempt_at=None, last_error=None))
        log.info("delivered {uid} to {destination}", uid=delivery.uid, destination=delivery.destination)
        return True
