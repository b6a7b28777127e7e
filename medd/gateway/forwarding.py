"""Store-and-forward to central: every object the centre sends is queued
durably (:class:`~medd.storage.forwarding.Forwarding`) and pushed to central
as a package, in arrival order, by the push sender of ``[gateway] central``'s
scheme (``tls://`` with the centre's client certificate, ``https://…/packages``
with its token), retrying with backoff on the injected clock until central
acknowledges it as durable. Each object's package keeps one Message-ID across
attempts, so central stores it once.

:class:`Spool` is the admission check handed to the node's ingest: beyond
``[gateway] max_spool`` bytes waiting, a new object is turned away as
:class:`~medd.ingest.StoreFailed` (C-STORE 0xA700; the watched folder waits).
"""
from __future__ import annotations

from itertools import takewhile

import email.utils
from typing import Callable
from urllib.parse import urlsplit

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger

from medd.ingest import StoreFailed
from medd.objects import Content, InvalidObject
from medd.package import attachment_for, build_package, decode_content
from medd.plugins.interfaces import IBatchSender
from medd.scheduling import CoalescingPass
from medd.storage.forwarding import LOST, NOT_FORWARDED_TRANSPORTS, REFUSED, Forwarding, ForwardingItem
from medd.storage.index import ObjectRecord

# Answers that say central will never take this package (anything else is retried).
_REFUSED_PREFIXES = ("refused:", "HTTP 400", "HTTP 413", "HTTP 415", "HTTP 422")
#: Packages sent over one connection at most (a sender with batches, e.g. tls://).
BATCH_SIZE = 32


def message_ids(settings) -> Callable[[], str]:
    """New Message-IDs for the packages of ``settings.address`` (one per object, kept across resends)."""
    domain = urlsplit(f"//{settings.address.rpartition('@')[2]}").hostname or "medd.invalid"
    return lambda: email.utils.make_msgid(domain=domain)


class Spool:
    """Bytes waiting for central, against ``max_bytes`` (None: no limit)."""

    def __init__(self, max_bytes: int | None):
        self.max_bytes = max_bytes
        self.bytes = 0

    def admit(self, size: int, transport: str) -> None:
        """Raise :class:`StoreFailed` if an object of ``size`` bytes would overfill the spool."""
        if self.max_bytes is None or transport in NOT_FORWARDED_TRANSPORTS:
            return
        if self.bytes + size > self.max_bytes:
            raise StoreFailed(f"the gateway's spool is full ({self.bytes} bytes wait for central); try later")


class ForwardingService(Service):
    """Forwards queued objects to central; :meth:`kick` sends what is due.

    The node's ingest queues each object in the transaction that indexes it
    (:func:`~medd.storage.forwarding.queue_new_object`); :meth:`object_stored`
    only counts it in the spool and kicks. At start, objects indexed without a
    queue row (by a medd before that, or on a node that was not a gateway) are
    queued.
    """

    log = Logger()

    def __init__(self, reactor, forwarding: Forwarding, ingest, object_types, sender, settings, spool: Spool, clock,
                 sender_settings: dict | None = None):
        self.reactor = reactor  # handed to the sender, which opens connections
        self.forwarding = forwarding
        self.ingest = ingest  # the node's Ingest: read_blob, run_blocking
        self.object_types = object_types  # the loaded IObjectType plugins, most specific first
        self.sender = sender  # the ISender for settings.central's scheme
        self.settings = settings  # GatewaySettings
        self.sender_settings = {**settings.for_senders(), **(sender_settings or {})}  # [mail]'s keys too
        self.spool = spool
        self.clock = clock
        self._message_id = message_ids(settings)
        self.batch_size = BATCH_SIZE
        self._pass = CoalescingPass(self._drain, "forwarding to central", clock)
        self._stopped = False

    def startService(self) -> None:
        super().startService()
        self._stopped = False
        d = ensureDeferred(self._resume())
        d.addErrback(lambda f: self.log.failure("resuming forwarding failed", f))
        self._resumed = d

    def resumed(self) -> Deferred:
        """Fires once what the start found unqueued is queued and the first pass has run."""
        d = Deferred()
        self._resumed.addBoth(lambda result: (d.callback(None), result)[1])
        return d

    async def _resume(self) -> None:
        # Objects indexed without a queue row (by an older medd, or before the node was a
        # gateway) are queued now, in the order they arrived.
        for record in await self.forwarding.unqueued_objects():
            await self.forwarding.queue(record, self._message_id())
        self.spool.bytes = (await self.forwarding.spooled())[1]
        await self.kick()

    def stopService(self):
        """Stop forwarding; the Deferred fires once a send in progress has finished."""
        super().stopService()
        self._stopped = True
        self._pass.unschedule()
        return self._pass.idle()

    def object_stored(self, record: ObjectRecord) -> None:
        """An object the centre sent is indexed, and queued in the same transaction: send it.

        Nothing here is awaited by the ingest, so the C-STORE's success waits
        for one commit only."""
        if record.transport in NOT_FORWARDED_TRANSPORTS:
            return
        self.spool.bytes += record.size
        self.kick()

    def kick(self) -> Deferred:
        """Send what is due; fires with how many objects a pass that began after this call sent."""
        return self._pass.kick()

    def idle(self) -> Deferred:
        return self._pass.idle()

    async def _drain(self) -> int:
        sent = 0
        while not self._stopped:
            batch = await self.forwarding.waiting_batch(self.batch_size)
            if not batch:
                break
            if self._pass.not_yet(batch[0].next_attempt_at):
                break  # everything behind the head waits with it: arrival order holds, per study too
            now = self.clock.seconds()
            due = list(takewhile(lambda item: item.next_attempt_at.timestamp() <= now, batch))
            # A failed attempt leaves the first unsent item due later (the next loop schedules the retry).
            sent += await self._send(due)
        return sent

    def _package(self, item: ForwardingItem, data: bytes) -> bytes:
        """Blocking: the object's package, From the centre, To central, with the item's Message-ID.

        Its Medd-Attachment comes from the object's index row; an object
        queued without one is opened to name it."""
        if item.object_type is not None:
            content = Content(media_type="application/dicom", data=data)
            attachment = attachment_for(item.object_type, item.uid, study_uid=item.study_uid,
                                        image_uid=item.referenced_image_uid)
        else:
            content = decode_content("application/dicom", data)
            for object_type in self.object_types:
                if object_type.recognise(content):
                    attachment = object_type.identifier(content)
                    break
            else:
                raise InvalidObject("no object type carries this content")
        return build_package(content, attachment, origin=self.settings.address,
                             destination=self.settings.central_name, message_id=item.message_id)

    def _package_all(self, items: list[ForwardingItem]) -> list[bytes | None]:
        """Blocking: each item's package read and built in one hop for the batch; None for one whose
        bytes are not in the blob store or that cannot be packaged (:meth:`_packaged` then decides)."""
        packages = []
        for item in items:
            try:
                packages.append(self._package(item, self.ingest.blobs.get(item.digest)))
            except (OSError, InvalidObject):
                packages.append(None)
        return packages

    async def _packaged(self, item: ForwardingItem) -> bytes | None:
        """The item's package, or None when it can never be sent (recorded as given up)."""
        try:
            data = await self.ingest.read_blob(item.digest)
            return await self.ingest.run_blocking(self._package, item, data)
        except FileNotFoundError as e:
            self.log.error("the bytes of {uid} are gone from the blob store; not forwarded", uid=item.uid)
            await self._given_up(item, LOST, f"object bytes missing: {e}")
        except InvalidObject as e:
            self.log.error("{uid} cannot be packaged for central: {reason}", uid=item.uid, reason=e.reason)
            await self._given_up(item, REFUSED, f"cannot be packaged: {e.reason}")
        return None

    async def _replies(self, packages: list[bytes]) -> list[dict]:
        """Central's reply to each package, in order (``ok``, ``refused``, ``retry``; see IBatchSender)."""
        settings = self.sender_settings
        if IBatchSender.providedBy(self.sender):
            return await self.sender.send_batch(self.reactor, self.settings.central, packages, settings)
        replies: list[dict] = []
        for package in packages:  # a sender without batches: one package per connection, stop at a failure
            try:
                await self.sender.send(self.reactor, self.settings.central, package, settings)
            except Exception as e:
                refused = type(e).__name__ == "PushRefused" and str(e).startswith(_REFUSED_PREFIXES)
                replies.append({"status": "refused" if refused else "retry", "reason": f"{type(e).__name__}: {e}"})
                break
            replies.append({"status": "ok"})
        return replies

    async def _send(self, items: list[ForwardingItem]) -> int:
        """Send ``items`` (due, in arrival order) in one batch; each is marked by its own reply."""
        ready: list[tuple[ForwardingItem, bytes]] = []
        for item, package in zip(items, await self.ingest.run_blocking(self._package_all, items)):
            if package is None:  # not in the blob store (evicted?), or cannot be packaged: one at a time
                package = await self._packaged(item)
            if package is not None:
                ready.append((item, package))
        if not ready:
            return 0
        replies = await self._replies([package for _, package in ready])
        sent: list[ForwardingItem] = []
        count = 0
        for (item, _), reply in zip(ready, replies):
            status = reply.get("status")
            if status == "ok":
                sent.append(item)
                continue
            count += await self._mark_sent(sent)
            sent = []
            error = str(reply.get("reason") or status)
            if status == "refused":
                self.log.error("central refused {uid}: {error}", uid=item.uid, error=error)
                await self._given_up(item, REFUSED, f"refused: {error}")
                continue
            delay = self.settings.backoff.delay(item.attempts + 1)
            self.log.warn("cannot forward {uid} to central ({error}); attempt {n}, next in {delay:.1f}s",
                          uid=item.uid, error=error, n=item.attempts + 1, delay=delay)
            await self.forwarding.retry_later(item, delay, error)
            # What follows waits behind it, in order; one that central took anyway is
            # resent later with its Message-ID and stored once.
            break
        return count + await self._mark_sent(sent)

    async def _mark_sent(self, items: list[ForwardingItem]) -> int:
        if items:
            await self.forwarding.mark_sent_many(items)
            self.spool.bytes = max(self.spool.bytes - sum(i.size for i in items), 0)
            self.log.debug("forwarded {n} objects to central", n=len(items))
        return len(items)

    async def _given_up(self, item: ForwardingItem, state: str, error: str) -> None:
        await self.forwarding.mark_given_up(item, state, error)
        self.spool.bytes = max(self.spool.bytes - item.size, 0)
