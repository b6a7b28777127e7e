"""The two shapes every background loop in medd takes, whatever the role:
exponential backoff between failed attempts, and a pass that is re-run (once)
when it is kicked while already running. Time comes from the clock each user
injects, never from the wall."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable, Generic, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.logger import Logger

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Seconds to wait after ``failures`` consecutive failures: ``base``,
    then multiplied by ``multiplier`` each time, never above ``max_delay``."""

    base: float
    max_delay: float
    multiplier: float = 2.0

    def delay(self, failures: int) -> float:
        return min(self.base * self.multiplier ** max(failures - 1, 0), self.max_delay)


class CoalescingPass(Generic[T]):
    """Runs ``await work()`` on :meth:`kick`; kicks during a pass make one more pass.

    With a ``clock``, :meth:`schedule` kicks it later on that clock (the next
    poll, a retry after backoff); a pass scheduled that way is replaced by the
    next :meth:`schedule` and dropped by any :meth:`kick` before it.

    A caller of :meth:`kick` gets a Deferred that fires with the result of a
    pass that *began after* the kick (so what it wrote is seen), however
    many kicks came meanwhile. A failing pass is logged and fires its
    waiters with None; the next kick runs again.
    """

    log = Logger()

    def __init__(self, work: Callable[[], Awaitable[T]], name: str, clock=None):
        self._work = work
        self.name = name
        self.clock = clock
        self._scheduled = None
        self.running = False
        self._again = False
        self._waiters: list[Deferred] = []
        self._idle: list[Deferred] = []

    def kick(self) -> Deferred:
        self.unschedule()
        d: Deferred = Deferred()
        self._waiters.append(d)
        if self.running:
            self._again = True
        else:
            ensureDeferred(self._run())
        return d

    async def _run(self) -> None:
        self.running = True
        try:
            while True:
                self._again = False
                waiters, self._waiters = self._waiters, []
                try:
                    result = await self._work()
                except Exception:
                    self.log.failure("{name} failed; it runs again on the next kick", name=self.name)
                    result = None
                for d in waiters:
                    d.callback(result)
                if not self._again:
                    break
        finally:
            self.running = False
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def schedule(self, delay: float) -> None:
        """Kick ``delay`` seconds from now on the clock, instead of when scheduled before."""
        self.unschedule()
        self._scheduled = self.clock.callLater(delay, self.kick)

    def not_yet(self, due) -> bool:
        """True if ``due`` (an aware datetime, e.g. a queue head's next attempt) is still ahead on
        the clock; the next pass is then scheduled for it. What a drain loop over a queue asks of its head."""
        wait = due.timestamp() - self.clock.seconds()
        if wait <= 0:
            return False
        self.schedule(wait)
        return True

    def unschedule(self) -> None:
        """Drop the scheduled kick, if any (a stopping service; a kick that came first)."""
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None

    def idle(self) -> Deferred:
        """A Deferred that fires once no pass is running (at once if none is): what a
        stopping service waits for, without starting another pass."""
        if not self.running:
            return succeed(None)
        d: Deferred = Deferred()
        self._idle.append(d)
        return d


class PassService(Service):
    """A service whose work is one :class:`CoalescingPass` (``self._pass``, set by the subclass):
    a pass at start; at stop, nothing more is scheduled and the Deferred fires once a pass in
    progress has finished (a pass checks ``self._stopped`` between steps)."""

    _pass: CoalescingPass
    _stopped = False

    def startService(self) -> None:
        super().startService()
        self._stopped = False
        self.kick()

    def stopService(self):
        super().stopService()
        self._stopped = True
        self._pass.unschedule()
        return self._pass.idle()

    def kick(self) -> Deferred:
        """Run a pass now; fires with the result of a pass that began after this call."""
        return self._pass.kick()

    def idle(self) -> Deferred:
        """Fires once no pass is under way (one the clock started, say)."""
        return self._pass.idle()
