"""The requestor: fetches the packages central holds for this viewer.

On an interval of the injected clock (and at once on ``kick()``) it lists central's ``/outbox``,
downloads each package, hands it to the node's own ingest, and acknowledges
it only once the ingest has made it durable. A crash between storing and
acknowledging means central offers the package again; the ingest is
idempotent by Message-ID and UID, so it is not stored twice. While central
is unreachable the requestor backs off exponentially and then resumes.
"""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from medd.ingest import Refused
from medd.scheduling import CoalescingPass
from medd.viewer.central_client import CentralUnavailable
from medd.viewer.settings import CentralSettings


@dataclass(frozen=True)
class PollResult:
    """What one pass over central's outbox did."""

    listed: int = 0
    stored: int = 0  # new objects in the local inbox
    acknowledged: int = 0
    refused: int = 0
    error: str | None = None  # set when the pass stopped because central was unavailable


class Requestor(Service):
    """Polls central's outbox every ``poll_interval`` on the clock, backing off while central is
    unavailable; ``kick()`` polls now."""

    log = Logger()

    def __init__(self, client, ingest, settings: CentralSettings, clock):
        self.client = client  # CentralClient, or a fake with the same coroutines
        self.ingest = ingest  # the node's Ingest: receive_package(data, transport=, peer=)
        self.settings = settings
        self.clock = clock
        self.peer = urlsplit(settings.url).hostname or settings.url
        self.failures = 0  # consecutive passes that failed
        self.last_result: PollResult | None = None
        self._pass = CoalescingPass(self._poll, "requesting from central", clock)
        # Message-IDs this node refused: not downloaded again on every pass.
        self._refused: set[str] = set()
        self._stopped = False

    # -- service -------------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopped = False
        self.kick()

    def stopService(self):
        """Stop polling; the Deferred fires once a pass in progress has finished."""
        super().stopService()
        self._stopped = True
        self._pass.unschedule()
        return self._pass.idle()

    # -- polling -------------------------------------------------------------------------------------

    def kick(self) -> Deferred:
        """Poll now; the Deferred fires with the :class:`PollResult` of a pass that began after this call."""
        return self._pass.kick()

    def idle(self) -> Deferred:
        """A Deferred that fires once no pass is under way (one the clock started, say)."""
        return self._pass.idle()

    async def _poll(self) -> PollResult:
        """One pass; then the next one is due after the interval, or after the backoff if it failed."""
        if self._stopped:
            return PollResult()
        result = await self._pass_over_outbox()
        self.last_result = result
        if result.error is None:
            self.failures = 0
            delay = self.settings.poll_interval
        else:
            self.failures += 1
            delay = self.settings.backoff.delay(self.failures)
            self.log.warn("central {url} unavailable ({error}); retrying in {delay:.1f}s (failure {n})",
                          url=self.settings.url, error=result.error, delay=delay, n=self.failures)
        if self.running and not self._stopped:
            self._pass.schedule(delay)
        return result

    async def _pass_over_outbox(self) -> PollResult:
        listed = stored = acknowledged = refused = 0
        try:
            items = await self.client.list_outbox()
            listed = len(items)
            for item in items:
                if self._stopped:
                    break
                if item.get("message_id") in self._refused:
                    continue
                data = await self.client.fetch(item["id"])
                try:
                    outcome = await self.ingest.receive_package(data, transport="pull", peer=self.peer)
                except Refused as e:
                    # Not acknowledged: it stays on central, in state "sent", for its administrator.
                    refused += 1
                    self._refused.add(item.get("message_id"))
                    self.log.error("package {id} ({uid}) from central refused: {reason}", id=item["id"],
                                   uid=item.get("uid"), reason=e.reason)
                    continue
                stored += bool(outcome.created)
                await self.client.ack(item["id"])
                acknowledged += 1
        except CentralUnavailable as e:
            return PollResult(listed, stored, acknowledged, refused, error=str(e))
        except Exception as e:  # StoreFailed (disk full, database down) and the unforeseen
            self.log.failure("requesting from central failed")
            return PollResult(listed, stored, acknowledged, refused, error=f"{type(e).__name__}: {e}")
        if acknowledged or refused:
            self.log.info("requested from central: {listed} waiting, {stored} new, {acked} acknowledged, {refused} refused",
                          listed=listed, stored=stored, acked=acknowledged, refused=refused)
        return PollResult(listed, stored, acknowledged, refused)
