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
from datetime import datetime, timedelta

from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.logger import Logger

from medd.central.reports import report_source
from medd.objects import Content
from medd.package import AttachmentId, ReportSource, attachment_for, build_package, is_centre_name
from medd.plugins.objecttypes import status_part
from medd.scheduling import Backoff, CoalescingPass
from medd.storage.connector import utc
from medd.storage.deliveries import Deliveries, Delivery, PushTarget
from medd.storage.index import ObjectRecord

log = Logger()


@dataclass(frozen=True)
class RetryPolicy:
    base: float = 5.0
    multiplier: float = 2.0
    max_delay: float = 3600.0
    max_attempts: int = 20

    @property
    def backoff(self) -> Backoff:
        return Backoff(self.base, self.max_delay, self.multiplier)

    def delay(self, attempts: int) -> float:
        """Seconds before the next attempt after ``attempts`` failures."""
        return self.backoff.delay(attempts)


def attachment_of(record: ObjectRecord) -> AttachmentId:
    """The Medd-Attachment of an indexed object, from its key information."""
    return attachment_for(record.object_type, record.sop_instance_uid, study_uid=record.study_instance_uid,
                          image_uid=record.referenced_image_uid)


def package_for(record: ObjectRecord, data: bytes, delivery: Delivery, origin: str,
                report_source: ReportSource | None = None) -> bytes:
    """The outgoing package; its Message-ID is the delivery's, stable across retries; a report's carries
    central's ``Medd-Report-Source``."""
    content = Content(media_type=record.media_type, data=data)
    centre = delivery.centre if is_centre_name(delivery.centre) else None
    return build_package(content, attachment_of(record), origin=origin, destination=delivery.destination,
                         message_id=delivery.message_id, centre=centre, study_images=delivery.study_images,
                         report_source=report_source)


def status_package_for(delivery: Delivery, origin: str) -> bytes:
    """A status package to a centre, from the delivery's status part (UIDs only in its header)."""
    content = status_part(delivery.status)
    return build_package(content, AttachmentId.of("status", event=delivery.status["event"], uid=delivery.status["uid"]),
                         origin=origin, destination=delivery.destination, message_id=delivery.message_id)


async def load_package(api, record: ObjectRecord | None, delivery: Delivery, origin: str, directory) -> bytes:
    """The stored object, read and wrapped into its package off the reactor
    (base64 of an object of hundreds of megabytes is seconds of CPU); a status package
    is built from the delivery itself. ``directory`` says who sent a report."""
    if delivery.status is not None:
        return status_package_for(delivery, origin)
    source = await report_source(directory, record) if record.object_type == "report" else None
    data = await api.read_blob(record.digest)
    return await api.run_blocking(package_for, record, data, delivery, origin, source)


class DeliveryService:
    """Drives push deliveries: one worker per push viewer with pending rows.

    ``kick()`` when something was queued; the clock is the deliveries
    connector's (the reactor in a node), so retries run on ``Clock.advance``
    in tests.
    """

    def __init__(self, reactor, deliveries: Deliveries, api, senders: dict, node_name: str, policy: RetryPolicy,
                 settings: dict | None = None, directory=None, failover_after: int = 3):
        self.reactor = reactor  # handed to senders, which open connections
        self.deliveries = deliveries
        self.clock = deliveries.clock
        self.settings = settings or {}
        self.api = api  # the node's Ingest: read_blob, run_blocking
        self.directory = directory  # the Directory connector: who sent a report
        self.senders = senders  # scheme -> ISender
        self.origin = node_name if "@" in node_name else f"central@{node_name}"
        self.policy = policy
        # A push URL may list several, in order: after this many failed attempts on one, the next.
        self.failover_after = failover_after
        self._workers: dict[str, Deferred] = {}
        # Viewers kicked while their worker runs: it reads its head of line
        # once more before it stops, so a row queued meanwhile is not left
        # to the next poll.
        self._again: set[str] = set()
        self._wakeups: dict[str, object] = {}
        self._sending: set[Deferred] = set()
        self._stopped = False
        self._pass = CoalescingPass(self._start_workers, "delivery")

    def now(self) -> datetime:
        return utc(self.clock.seconds())

    def start(self) -> None:
        self._stopped = False

    def stop(self) -> Deferred:
        """Stop: no new attempt begins, a send under way is abandoned (a failed attempt,
        retried after a restart) rather than holding up the node's shutdown. Fires when
        every worker has written its last state, before the node closes the database."""
        self._stopped = True
        for call in self._wakeups.values():
            if call.active():
                call.cancel()
        self._wakeups.clear()
        for sending in list(self._sending):
            sending.cancel()
        return self.settled()

    def kick(self) -> Deferred:
        """Start a worker for every push viewer with pending rows. Fires (with the number of
        viewers that have one) after a pass that began after this call; the workers go on."""
        return self._pass.kick()

    def settled(self, *addresses: str) -> Deferred:
        """Fires when no worker runs (for ``addresses``, if given): every due delivery was
        attempted, the rest wait for their next attempt time (a wake-up on the clock)."""
        return ensureDeferred(self._settled(addresses))

    async def _settled(self, addresses) -> None:
        while running := [d for a, d in self._workers.items() if not addresses or a in addresses]:
            await DeferredList(running)

    async def _start_workers(self) -> int:
        if self._stopped:
            return 0
        targets = await self.deliveries.push_targets()
        for target in targets:
            self._start(target)
        return len(targets)

    def _start(self, target: PushTarget) -> None:
        if self._stopped:
            return
        if target.address in self._workers:
            self._again.add(target.address)
            return
        worker = ensureDeferred(self._drain(target))
        if worker.called:
            return
        self._workers[target.address] = worker
        worker.addBoth(self._worker_done, target.address)

    def _worker_done(self, _, address: str) -> None:
        del self._workers[address]

    def _wake_later(self, target: PushTarget, when: datetime) -> None:
        old = self._wakeups.pop(target.address, None)
        if old is not None and old.active():
            old.cancel()
        delay = max((when - self.now()).total_seconds(), 0)
        self._wakeups[target.address] = self.clock.callLater(delay, self._start, target)

    async def _drain(self, target: PushTarget) -> None:
        """Deliver ``target``'s pending rows in order until none is due."""
        address = target.address
        try:
            while not self._stopped:
                self._again.discard(address)
                head = await self.deliveries.head_of_line(address)
                if head is None:
                    if address in self._again:
                        continue
                    return
                if head.delivery.next_attempt_at > self.now():
                    # Head of line: nothing after this row goes before it.
                    self._wake_later(target, head.delivery.next_attempt_at)
                    return
                await self._attempt(head.delivery, head.record, target)
        except Exception:
            log.failure("delivery worker for {address} stopped", address=address)

    def url_for(self, push_url: str, attempts: int) -> str:
        """The URL of ``push_url`` (one, or several in order) for a delivery with ``attempts`` failures:
        ``failover_after`` attempts on each, then the next, back to the first after the last."""
        urls = push_url.split()
        return urls[(attempts // self.failover_after) % len(urls)]

    async def _attempt(self, delivery: Delivery, record: ObjectRecord, target: PushTarget) -> bool:
        push_url = target.push_url
        url = self.url_for(push_url, delivery.attempts)
        settings = self.settings
        if target.smime_cert:
            # The mailto: sender signs with [mail] smime_certificate and encrypts to the viewer's own.
            settings = {**settings, "mail_smime_recipient_pem": target.smime_cert}
        scheme = url.partition(":")[0]
        sender = self.senders.get(scheme)
        attempts = delivery.attempts + 1
        try:
            if sender is None:
                raise RuntimeError(f"no sender for {scheme}: URLs")
            package = await load_package(self.api, record, delivery, self.origin, self.directory)
            await self.deliveries.mark_sent(delivery.id, attempts, f"to {url}")
            sending = sender.send(self.reactor, url, package, settings)
            self._sending.add(sending)
            try:
                await sending
            finally:
                self._sending.discard(sending)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            if attempts >= self.policy.max_attempts:
                next_at, detail = None, f"gave up after {attempts} attempts: {error}"
            else:
                next_at = self.now() + timedelta(seconds=self.policy.delay(attempts))
                detail = f"attempt {attempts} failed: {error}; next at {next_at.isoformat()}"
            if next_at is not None and (following := self.url_for(push_url, attempts)) != url:
                detail += f"; failing over to {following}"
            log.warn("delivery of {uid} to {destination} failed: {detail}", uid=delivery.uid,
                     destination=delivery.destination, detail=detail)
            await self.deliveries.mark_failed(delivery.id, attempts, error, next_at, detail)
            return False
        await self.deliveries.mark_delivered(delivery.id, f"accepted by {url}")
        log.info("delivered {uid} to {destination}", uid=delivery.uid, destination=delivery.destination)
        return True
