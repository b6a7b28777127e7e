"""Packages from the viewer to central (status messages, overlays, reports),
sent durably in the background.

A queued package is first written to the blob store and recorded through the
:class:`~medd.storage.outgoing.OutgoingPackages` connector, so it survives a
restart; it is then POSTed to central's ``/packages`` in the order queued,
backing off (on the injected clock) while central is unavailable, until
central answers 2xx. Central is idempotent by Message-ID, so a package sent
again after a crash is not stored twice.
"""
from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from medd.scheduling import Backoff, CoalescingPass
from medd.storage.outgoing import LOST, REFUSED, OutgoingPackage, OutgoingPackages
from medd.pull import CentralRefused, CentralUnavailable


class OutgoingService(Service):
    """Sends queued packages to central; ``queue()`` adds one, ``kick()`` sends what is due now."""

    log = Logger()

    def __init__(self, packages: OutgoingPackages, ingest, blobs, client, backoff: Backoff, clock):
        self.packages = packages
        self.ingest = ingest  # the node's Ingest: read_blob, run_blocking
        self.blobs = blobs
        self.client = client  # CentralClient, or a fake with the same coroutines
        self.backoff = backoff
        self.clock = clock
        self._pass = CoalescingPass(self._drain, "sending packages to central", clock)
        self._stopped = False

    def startService(self) -> None:
        super().startService()
        self._stopped = False
        self.kick()  # whatever a restart left waiting

    def stopService(self):
        """Stop sending; the Deferred fires once a send in progress has finished."""
        super().stopService()
        self._stopped = True
        self._pass.unschedule()
        return self._pass.idle()

    async def queue(self, package: bytes, *, message_id: str, attachment: str, uid: str) -> int:
        """Make ``package`` durable and queue it for central; returns its row id once it is on disk."""
        blob = await self.ingest.run_blocking(self.blobs.put, package)
        row_id = await self.packages.queue(message_id, attachment, uid, blob.digest)
        self.log.info("queued {attachment} for central ({message_id})", attachment=attachment, message_id=message_id)
        self.kick()
        return row_id

    def kick(self) -> Deferred:
        """Send what is due; the Deferred fires with how many packages a pass that began after this call sent."""
        return self._pass.kick()

    def idle(self) -> Deferred:
        """A Deferred that fires once no pass is under way (one the clock started, say)."""
        return self._pass.idle()

    async def _drain(self) -> int:
        """Send waiting packages in order until none is left or the head of the line is not due yet."""
        sent = 0
        while not self._stopped:
            head = await self.packages.head_of_line()
            if head is None:
                break
            if self._pass.not_yet(head.next_attempt_at):
                break  # anything queued meanwhile is behind the head; it waits with it
            sent += await self._send(head)
        return sent

    async def _send(self, pkg: OutgoingPackage) -> bool:
        try:
            data = await self.ingest.read_blob(pkg.digest)
            await self.client.post_package(data)
        except CentralRefused as e:
            self.log.error("central refused {attachment} ({message_id}): {detail}", attachment=pkg.attachment,
                           message_id=pkg.message_id, detail=e.detail)
            await self.packages.mark_given_up(pkg, REFUSED, str(e))
            return False
        except FileNotFoundError as e:
            self.log.error("the bytes of {attachment} ({message_id}) are gone from the blob store; not sent",
                           attachment=pkg.attachment, message_id=pkg.message_id)
            await self.packages.mark_given_up(pkg, LOST, f"package bytes missing: {e}")
            return False
        except CentralUnavailable as e:
            delay = self.backoff.delay(pkg.attempts + 1)
            self.log.warn("cannot send {attachment} to central ({error}); attempt {n}, next in {delay:.1f}s",
                          attachment=pkg.attachment, error=str(e), n=pkg.attempts + 1, delay=delay)
            await self.packages.retry_later(pkg, delay, f"{type(e).__name__}: {e}")
            return False
        await self.packages.mark_sent(pkg)
        # The package bytes are central's now; the object itself stays in the local inbox.
        try:
            await self.ingest.run_blocking(self.blobs.delete, pkg.digest)
        except OSError:
            self.log.failure("cannot remove the sent package {message_id} from the blob store", message_id=pkg.message_id)
        self.log.info("sent {attachment} to central", attachment=pkg.attachment)
        return True
