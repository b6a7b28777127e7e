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
from functools import partial

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from medd.plugins.hookspecs import hookimpl
from medd.scheduling import CoalescingPass
from medd.storage.index import ObjectRecord
from medd.storage.routing import CorrectionError, Hold, Queue, Routing, RoutingDecision, RoutingLookups

__all__ = ["CorrectionError", "Router", "RoutingService", "SenderPolicy", "correct_route", "route", "verify"]

log = Logger()

# What viewers send back to central: see SenderPolicy.
VIEWER_TYPES = ("status", "overlay", "report")


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


def sending_centre(record: ObjectRecord, lookups: RoutingLookups) -> str | None:
    """The centre that sent ``record``; for an overlay or report coming back
    from a viewer, the centre of the study it is about."""
    centre = lookups.centre_of(record.origin, record.transport)
    if centre is not None or record.object_type not in ("overlay", "report"):
        return centre
    for origin, transport in lookups.study_senders(record.study_instance_uid):
        centre = lookups.centre_of(origin, transport)
        if centre is not None:
            return centre
    return None


def _refusal(lookups: RoutingLookups, destination: str, centre: str | None, record: ObjectRecord) -> str | None:
    if not lookups.is_viewer(destination):
        return f"unknown destination {destination}: no such viewer in the directory"
    if centre is None:
        return f"unknown imaging centre: {record.transport} origin {record.origin!r} is not a registered centre"
    if not lookups.is_authorised(destination, centre, record.modality or ""):
        return f"viewer {destination} is not authorised for centre {centre} modality {record.modality or '-'}"
    return None


def verify(lookups: RoutingLookups, destination: str, record: ObjectRecord) -> str | None:
    """None if ``destination`` may receive ``record``; else the reason it may not."""
    return _refusal(lookups, destination, sending_centre(record, lookups), record)


def route(record: ObjectRecord, lookups: RoutingLookups, node_name: str) -> RoutingDecision:
    """Decide where ``record`` goes and whether it may go there (the routing policy)."""
    centre = sending_centre(record, lookups)
    to = lookups.package_destination(record.sop_instance_uid)
    if to and to != node_name.lower() and to.partition("@")[2] != node_name.lower():
        destinations, source = [to], "package To"
    elif _addresses(record.intended_recipients):
        destinations, source = _addresses(record.intended_recipients), "(0040,1010) intended recipients"
    else:
        destinations = lookups.matching_rules(centre, record.modality or "", record.object_type)
        source = "routing rule"
    outcome, queue, hold = "routed", [], []
    if not destinations:
        if record.object_type in ("overlay", "report"):
            outcome = "attached"  # kept with its image/study; no rule sends it on
        else:
            hold.append(Hold(None, "no route: no package To, no (0040,1010) recipients and no matching rule"))
            outcome = "quarantined"
    for destination in destinations:
        reason = _refusal(lookups, destination, centre, record)
        if reason is None:
            queue.append(Queue(destination, f"routed by {source}"))
        else:
            hold.append(Hold(destination, reason))
            outcome = "quarantined"
    return RoutingDecision(record.sop_instance_uid, centre, outcome, tuple(queue), tuple(hold))


def correct_route(routing: Routing, entry_id: int, destination: str, admin: str) -> Deferred:
    """An administrator's correction: release a quarantine entry to ``destination`` if it passes
    verification; fails with :class:`CorrectionError` otherwise."""
    return routing.correct_route(entry_id, destination, admin, verify)


class Router:
    """Routes every object that has no routing decision yet.

    ``kick()`` is called when objects were stored and once at start-up; the
    work list is the database itself, so a crash loses no decision.
    """

    def __init__(self, routing: Routing, node_name: str, on_routed=None):
        self.routing = routing
        self.policy = partial(route, node_name=node_name)
        self.on_routed = on_routed
        # Every object with an id at or below the floor has a decision, so a
        # pass after a new object looks at new rows only, not the whole
        # table. A full pass (floor 0) runs at start and now and then, for
        # ids that a concurrent transaction committed out of order.
        self._floor = 0
        self._full = True
        self._pass = CoalescingPass(self._route, "routing")

    def kick(self, full: bool = False) -> Deferred:
        """Deferred number of objects routed by a pass that began after this call."""
        if full:
            self._full = True
        return self._pass.kick()

    async def _route(self) -> int:
        routed = 0
        while True:
            start, self._full = (0 if self._full else self._floor), False
            batch = await self.routing.route_undecided(self.policy, start)
            if not batch.decisions:
                return routed
            self._floor = max(self._floor, batch.last_id)
            routed += len(batch.decisions)
            if self.on_routed is not None:
                self.on_routed()


class RoutingService(Service):
    """Central's router and outbox, as one child service of the node.

    Subscribes to ``medd_object_stored`` like any plugin would, so a stored
    object is routed at once; at start-up it routes whatever a crash left
    undecided and resumes pending deliveries.
    """

    def __init__(self, reactor, config, plugins, storage, api, settings=None):
        from medd.central.outbox import DeliveryService
        from medd.central.settings import central_node_settings

        self.storage = storage
        # One clock for everything central does: the connectors' stamps and
        # the services' timers and comparisons.
        self.clock = storage.clock
        # ``settings``: [delivery] and [push] as the node's validation parsed them.
        settings = settings or central_node_settings(config)
        self.router = Router(storage.routing, config.name, on_routed=self._routed)
        self.outbox = DeliveryService(
            reactor, storage.deliveries, api, plugins.senders, config.name,
            settings.delivery.retry, settings=settings.push.for_senders(),
        )
        self.poll_interval = settings.delivery.poll_interval
        self.route_delay = settings.delivery.route_delay
        self._pending = None
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

    def kick(self) -> Deferred:
        """Route and deliver now (after an administrator's correction, say).

        Fires once a routing pass and then a delivery pass that both began
        after this call are done (the delivery pass starts the push workers;
        :meth:`DeliveryService.settled` waits for them)."""
        return ensureDeferred(self._kick())

    async def _kick(self) -> None:
        await self.router.kick()
        await self.outbox.kick()

    def _tick(self):
        # Every twelfth poll re-reads the whole table (see Router._floor).
        self._ticks += 1
        self.router.kick(full=self._ticks % 12 == 1)
        return self.outbox.kick()

    def startService(self) -> None:
        super().startService()
        self.outbox.start()
        # The poll picks up what the CLI changed in the database (a released
        # quarantine entry, a new viewer) and anything a missed kick left.
        self._ticks = 0
        self._poll = LoopingCall(self._tick)
        self._poll.clock = self.clock
        self._poll.start(self.poll_interval, now=True)

    def stopService(self) -> Deferred:
        super().stopService()
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        return self.outbox.stop()


class SenderPolicy:
    """Central's answer to ``medd_check_sender``: who sends what back from viewers.

    A status, overlay or report package whose From is a registered viewer is
    accepted only from that viewer authenticated: its bearer token (HTTP) or
    a TLS client certificate whose CN is its address. Otherwise anyone could
    mark an image opened in the viewer's name, or attach a report as it.
    Registered with the node's plugin manager by central's assembly.
    """

    def __init__(self, directory):
        self.directory = directory

    @hookimpl
    def medd_check_sender(self, claim):
        if claim.object_type not in VIEWER_TYPES:
            return None
        return ensureDeferred(self._check(claim))

    async def _check(self, claim) -> str | None:
        origin = claim.origin
        found = await self.directory.claimants(origin, claim.credentials)
        named, by_token = found.named, found.authenticated
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
