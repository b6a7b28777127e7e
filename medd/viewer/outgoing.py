"""Packages from the viewer to central (status messages, overlays, reports),
sent durably in the background.

A queued package is first written to the blob store and recorded in the
``viewer_outgoing`` table, so it survives a restart; it is then POSTed to
central's ``/packages`` in the order queued, with exponential backoff while
central is unavailable, until central answers 2xx. Central is idempotent by
Message-ID, so a package sent again after a crash is not stored twice.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import func, select, update
from sqlalchemy.engine import Connection
from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger

from medd.storage.viewer_tables import viewer_outgoing
from medd.viewer.central_client import CentralRefused, CentralUnavailable
from medd.viewer.settings import CentralSettings


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

    @classmethod
    def from_row(cls, r) -> "OutgoingPackage":
        at = r.next_attempt_at
        if at.tzinfo is None:  # SQLite hands back naive datetimes; they were written in UTC
            at = at.replace(tzinfo=timezone.utc)
        return cls(r.id, r.message_id, r.attachment, r.uid, r.digest, r.state, r.attempts, at, r.last_error)


def record_outgoing(conn: Connection, message_id: str, attachment: str, uid: str, digest: str, at: datetime) -> int:
    """Queue a package (idempotent by Message-ID); returns its row id."""
    row = conn.execute(select(viewer_outgoing.c.id).where(viewer_outgoing.c.message_id == message_id)).first()
    if row:
        return row.id
    return conn.execute(viewer_outgoing.insert().values(
        message_id=message_id, attachment=attachment, uid=uid, digest=digest, state="waiting", attempts=0,
        next_attempt_at=at, created_at=at,
    )).inserted_primary_key[0]


def head_of_line(conn: Connection) -> OutgoingPackage | None:
    row = conn.execute(select(viewer_outgoing).where(viewer_outgoing.c.state == "waiting")
                       .order_by(viewer_outgoing.c.id).limit(1)).first()
    return OutgoingPackage.from_row(row) if row else None


def outgoing_packages(conn: Connection, state: str | None = None) -> list[OutgoingPackage]:
    q = select(viewer_outgoing).order_by(viewer_outgoing.c.id)
    if state:
        q = q.where(viewer_outgoing.c.state == state)
    return [OutgoingPackage.from_row(r) for r in conn.execute(q)]


def count_waiting(conn: Connection) -> int:
    return conn.execute(select(func.count()).select_from(viewer_outgoing)
                        .where(viewer_outgoing.c.state == "waiting")).scalar_one()


class OutgoingService(Service):
    """Sends queued packages to central; ``queue()`` adds one, ``kick()`` sends now."""

    log = Logger()

    def __init__(self, database, api, blobs, client, settings: CentralSettings, clock):
        self.db = database
        self.api = api  # the node's Ingest: read_blob, run_blocking
        self.blobs = blobs
        self.client = client
        self.settings = settings
        self.clock = clock
        self._busy = False
        self._again = False
        self._wakeup = None
        self._stopped = False
        self._idle: list[Deferred] = []

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), tz=timezone.utc)

    def startService(self) -> None:
        super().startService()
        self._stopped = False
        self.kick()  # whatever a restart left waiting

    def stopService(self):
        """Stop sending; the Deferred fires once a send in progress has finished."""
        super().stopService()
        self._stopped = True
        if self._wakeup is not None and self._wakeup.active():
            self._wakeup.cancel()
        if self._busy:
            d = Deferred()
            self._idle.append(d)
            return d
        return None

    async def queue(self, package: bytes, *, message_id: str, attachment: str, uid: str) -> int:
        """Make ``package`` durable and queue it for central; returns once it is on disk."""
        blob = await self.api.run_blocking(self.blobs.put, package)
        at = self.now()
        row_id = await self.db.run(lambda c: record_outgoing(c, message_id, attachment, uid, blob.digest, at))
        self.log.info("queued {attachment} for central ({message_id})", attachment=attachment, message_id=message_id)
        self.kick()
        return row_id

    def kick(self):
        if self._busy:
            self._again = True
            return None
        if self._wakeup is not None and self._wakeup.active():
            self._wakeup.cancel()
        return ensureDeferred(self._drain())

    async def _drain(self) -> None:
        self._busy = True
        try:
            while not self._stopped:
                self._again = False
                head = await self.db.run(head_of_line)
                if head is None:
                    if self._again:
                        continue
                    return
                wait = (head.next_attempt_at - self.now()).total_seconds()
                if wait > 0:
                    # Anything queued meanwhile is behind the head; it waits with it.
                    self._wakeup = self.clock.callLater(wait, self.kick)
                    return
                await self._send(head)
        except Exception:
            self.log.failure("sending packages to central stopped; next attempt on the next queued package")
        finally:
            self._busy = False
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    async def _send(self, pkg: OutgoingPackage) -> None:
        at = self.now()
        try:
            data = await self.api.read_blob(pkg.digest)
            await self.client.post_package(data)
        except CentralRefused as e:
            self.log.error("central refused {attachment} ({message_id}): {detail}", attachment=pkg.attachment,
                           message_id=pkg.message_id, detail=e.detail)
            error = str(e)
            await self.db.run(lambda c: c.execute(update(viewer_outgoing).where(viewer_outgoing.c.id == pkg.id).values(
                state="refused", attempts=pkg.attempts + 1, last_error=error)))
            return
        except FileNotFoundError as e:
            self.log.error("the bytes of {attachment} ({message_id}) are gone from the blob store; not sent",
                           attachment=pkg.attachment, message_id=pkg.message_id)
            error = f"package bytes missing: {e}"
            await self.db.run(lambda c: c.execute(update(viewer_outgoing).where(viewer_outgoing.c.id == pkg.id).values(
                state="lost", attempts=pkg.attempts + 1, last_error=error)))
            return
        except CentralUnavailable as e:
            attempts = pkg.attempts + 1
            delay = self.settings.backoff(attempts)
            self.log.warn("cannot send {attachment} to central ({error}); attempt {n}, next in {delay:.1f}s",
                          attachment=pkg.attachment, error=str(e), n=attempts, delay=delay)
            next_at = at + timedelta(seconds=delay)
            error = f"{type(e).__name__}: {e}"
            await self.db.run(lambda c: c.execute(update(viewer_outgoing).where(viewer_outgoing.c.id == pkg.id).values(
                attempts=attempts, next_attempt_at=next_at, last_error=error)))
            return
        await self.db.run(lambda c: c.execute(update(viewer_outgoing).where(viewer_outgoing.c.id == pkg.id).values(
            state="sent", attempts=pkg.attempts + 1, sent_at=at, last_error=None)))
        # The package bytes are central's now; the object itself stays in the local inbox.
        try:
            await self.api.run_blocking(self.blobs.delete, pkg.digest)
        except OSError:
            self.log.failure("cannot remove the sent package {message_id} from the blob store", message_id=pkg.message_id)
        self.log.info("sent {attachment} to central", attachment=pkg.attachment)
