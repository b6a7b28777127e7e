"""The requestor: fetches the packages central holds for this viewer.

On an interval (and at once on ``kick()``) it lists central's ``/outbox``,
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
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger

from medd.ingest import Refused
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
    log = Logger()

    def __init__(self, client, api, settings: CentralSettings, clock):
        self.client = client  # CentralClient, or a fake with the same coroutines
        self.api = api  # the node's Ingest: receive_package(data, transport=, peer=)
        self.settings = settings
        self.clock = clock
        self.peer = urlsplit(settings.url).hostname or settings.url
        self.failures = 0  # consecutive passes that failed
        self.last_result: PollResult | None = None
        self._next_call = None
        self._running = False
        self._again = False
        self._waiters: list[Deferred] = []
        # Message-IDs this node refused: not downloaded again on every pass.
        self._refused: set[str] = set()
        self._stopped = False
        self._idle: list[Deferred] = []

    # -- service -------------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopped = False
        self.kick()

    def stopService(self):
        """Stop polling; the Deferred fires once a pass in progress has finished."""
        super().stopService()
        self._stopped = True
        self._cancel_next()
        if self._running:
            d = Deferred()
            self._idle.append(d)
            return d
        return None

    # -- polling -------------------------------------------------------------------------------------

    def kick(self) -> Deferred:
        """Poll now; the Deferred fires with the :class:`PollResult` of a pass that began after this call."""
        d = Deferred()
        self._waiters.append(d)
        if self._running:
            self._again = True
        else:
            self._cancel_next()
            ensureDeferred(self._run())
        return d

    def _cancel_next(self) -> None:
        if self._next_call is not None and self._next_call.active():
            self._next_call.cancel()
        self._next_call = None

    def _schedule(self, delay: float) -> None:
        self._cancel_next()
        if self.running and not self._stopped:
            self._next_call = self.clock.callLater(delay, self.kick)

    async def _run(self) -> None:
        self._running = True
        delay = self.settings.poll_interval
        try:
            while True:
                self._again = False
                waiters, self._waiters = self._waiters, []
                result = await self._pass()
                self.last_result = result
                if result.error is None:
                    self.failures = 0
                    delay = self.settings.poll_interval
                else:
                    self.failures += 1
                    delay = self.settings.backoff(self.failures)
                    self.log.warn("central {url} unavailable ({error}); retrying in {delay:.1f}s (failure {n})",
                                  url=self.settings.url, error=result.error, delay=delay, n=self.failures)
                for d in waiters:
                    d.callback(result)
                if not self._again or self._stopped:
                    break
        finally:
            self._running = False
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)
        self._schedule(delay)

    async def _pass(self) -> PollResult:
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
                    outcome = await self.api.receive_package(data, transport="pull", peer=self.peer)
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
