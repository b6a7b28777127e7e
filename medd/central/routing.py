"""Route verification and quarantine.

For each indexed object the router decides, once and durably, where it goes:
the destination comes from the package's ``To``, else the object's Names of
Intended Recipients of Results (0040,1010), else the administrator's routing
rules. Every destination is verified (it is a viewer in the directory, and
that viewer is authorised for the object's imaging centre and modality)
before an outbox row is queued; what fails verification is quarantined with
the reason, and nothing is sent.

The imaging centre is decided by who sent the object (calling AE title from
the centre's networks, or package origin, which the sender policy below
admits only from the centre authenticated), never by a tag inside it. What
central decides about a centre's objects goes back to it as status packages
in its outbox, with the overlays and reports made on its studies.
"""
from __future__ import annotations

import email.utils
import ipaddress
from dataclasses import dataclass
from functools import partial

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from medd.plugins.hookspecs import hookimpl
from medd.scheduling import CoalescingPass
from medd.storage.index import ObjectRecord
from medd.storage.routing import CorrectionError, Hold, Queue, Routing, RoutingDecision, RoutingLookups, Tell

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


@dataclass(frozen=True)
class Sender:
    """Which registered centre an object belongs to, and how that was found.

    ``own`` is True when the object came from the centre itself (not an overlay or
    report from a viewer, filed under the centre of its study); ``unknown`` says why no
    centre was found (for the quarantine)."""

    centre: str | None
    own: bool = False
    unknown: str | None = None


def _in_networks(peer: str | None, networks: tuple[str, ...]) -> bool:
    try:
        address = ipaddress.ip_address((peer or "").strip())
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(n) for n in networks)


def _from_viewer(record: ObjectRecord, lookups: RoutingLookups) -> bool:
    """Whether a package came in a registered viewer's name (which the sender policy lets in only from
    that viewer authenticated); a calling AE title never names a viewer."""
    return record.transport != "dicom" and lookups.is_viewer(record.origin.strip().lower())


def sender_of(record: ObjectRecord, lookups: RoutingLookups) -> Sender:
    """The centre that sent ``record``; for an overlay or report coming back from a viewer,
    the centre of the study it is about.

    A calling AE title is no credential: when the centre lists its networks, the title names it
    only for associations from those networks."""
    centre = lookups.centre_of(record.origin, record.transport)
    unknown = f"{record.transport} origin {record.origin!r} is not a registered centre"
    if centre is not None and record.transport == "dicom":
        networks = lookups.centre_networks(centre)
        if networks and not _in_networks(record.peer, networks):
            unknown = (f"calling AE title {record.origin!r} names centre {centre} only from its networks "
                       f"({', '.join(networks)}), and this association came from {record.peer or 'an unknown address'}")
            centre = None
    if centre is not None:
        return Sender(centre, own=True)
    # Only a registered viewer's overlay or report (which the sender policy let in only
    # authenticated) is filed under the centre of its study; from anyone else it is quarantined.
    if record.object_type in ("overlay", "report") and _from_viewer(record, lookups):
        study_centre = lookups.study_centre(record.study_instance_uid)
        if study_centre is not None:
            return Sender(study_centre)
    return Sender(None, unknown=unknown)


def _refusal(lookups: RoutingLookups, destination: str, sender: Sender, record: ObjectRecord) -> str | None:
    if not lookups.is_viewer(destination):
        return f"unknown destination {destination}: no such viewer in the directory"
    if sender.centre is None:
        return f"unknown imaging centre: {sender.unknown}"
    if not lookups.is_authorised(destination, sender.centre, record.modality or ""):
        return f"viewer {destination} is not authorised for centre {sender.centre} modality {record.modality or '-'}"
    return None


def verify(lookups: RoutingLookups, destination: str, record: ObjectRecord) -> str | None:
    """None if ``destination`` may receive ``record``; else the reason it may not."""
    return _refusal(lookups, destination, sender_of(record, lookups), record)


def _receipts(record: ObjectRecord, sender: Sender, queue: list[Queue], hold: list[Hold],
              lookups: RoutingLookups) -> tuple[list[Queue], list[Tell]]:
    """What goes back to the centre: for its own objects, status packages (received, then routed
    or quarantined); for a viewer's overlay or report on its study, the result itself (and
    "reported" for each of its images of the study).

    A result can reach central before any image of its study from a centre (the images were
    quarantined as an unknown centre's, or are still on their way): it was decided with no
    centre. The first of the centre's images of the study then sends it home, and each image
    is told "reported" for the reports its study already has."""
    home = lookups.centre_outbox(sender.centre)
    if home is None:
        return [], []
    uid = record.sop_instance_uid
    if sender.own:
        tell = [Tell(home, "received", uid, params=(("time", record.received_at.isoformat()),))]
        tell += [Tell(home, "routed", uid, q.destination, (("viewer", q.destination),)) for q in queue]
        tell += [Tell(home, "quarantined", uid, h.destination or h.reason, (("reason", h.reason),)) for h in hold]
        if record.object_type != "image":
            return [], tell
        results = [(r, kind, centre) for r, kind, centre in lookups.study_results(record.study_instance_uid)
                   if centre in (None, sender.centre)]
        late = [Queue(home, f"result home to centre {sender.centre} (it came before the study's images)", uid=r)
                for r, _, centre in results if centre is None]
        tell += [Tell(home, "reported", uid, r, (("report", r),)) for r, kind, _ in results if kind == "report"]
        return late, tell
    tell = []
    if record.object_type == "report":
        tell = [Tell(home, "reported", image, uid, (("report", uid),))
                for image in lookups.centre_images(record.study_instance_uid, sender.centre)]
    return [Queue(home, f"result home to centre {sender.centre}")], tell


def route(record: ObjectRecord, lookups: RoutingLookups, node_name: str) -> RoutingDecision:
    """Decide where ``record`` goes and whether it may go there (the routing policy)."""
    sender = sender_of(record, lookups)
    centre = sender.centre
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
        if record.object_type in ("overlay", "report") and (centre is not None or _from_viewer(record, lookups)):
            outcome = "attached"  # kept with its image/study; no rule sends it on
        else:
            reason = "no route: no package To, no (0040,1010) recipients and no matching rule"
            if centre is None:  # say first what an administrator has to fix first
                reason = f"unknown imaging centre: {sender.unknown}; {reason}"
            hold.append(Hold(None, reason))
            outcome = "quarantined"
    for destination in destinations:
        reason = _refusal(lookups, destination, sender, record)
        if reason is None:
            queue.append(Queue(destination, f"routed by {source}"))
        else:
            hold.append(Hold(destination, reason))
            outcome = "quarantined"
    home, tell = _receipts(record, sender, queue, hold, lookups)
    return RoutingDecision(record.sop_instance_uid, centre, outcome, tuple(queue + home), tuple(hold), tuple(tell))


def correct_route(routing: Routing, entry_id: int, destination: str, admin: str) -> Deferred:
    """An administrator's correction: release a quarantine entry to ``destination`` if it passes
    verification; fails with :class:`CorrectionError` otherwise."""
    return routing.correct_route(entry_id, destination, admin, verify)


class Router:
    """Routes every object that has no routing decision yet.

    ``kick()`` is called when objects were stored and once at start-up; the
    work list is the database itself, so a crash loses no decision.
    """

    def __init__(self, routing: Routing, node_name: str, on_routed=None, metrics=None):
        self.routing = routing
        # :class:`medd.metrics.NodeMetrics` (or None): counts the decisions by outcome.
        self.metrics = metrics
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
            for decision in batch.decisions:
                if self.metrics is not None:
                    self.metrics.routed(decision.outcome)
                for hold in decision.hold:
                    log.warn("quarantined {uid} for {destination}: {reason}", uid=decision.uid,
                             destination=hold.destination or "-", reason=hold.reason)
            # Only a pass that queued something gives the outbox work (a quarantine does not).
            if self.on_routed is not None and any(d.queue or d.tell for d in batch.decisions):
                self.on_routed()


class RoutingService(Service):
    """Central's router and outbox, as one child service of the node.

    Subscribes to ``medd_object_stored`` like any plugin would, so a stored
    object is routed at once; at start-up it routes whatever a crash left
    undecided and resumes pending deliveries.
    """

    def __init__(self, reactor, config, plugins, storage, api, settings=None, metrics=None, sender_settings=None):
        from medd.central.outbox import DeliveryService
        from medd.central.settings import central_node_settings

        self.storage = storage
        # One clock for everything central does: the connectors' stamps and
        # the services' timers and comparisons.
        self.clock = storage.clock
        # ``settings``: [delivery] and [push] as the node's validation parsed them.
        settings = settings or central_node_settings(config)
        self.router = Router(storage.routing, config.name, on_routed=self._routed, metrics=metrics)
        self.outbox = DeliveryService(
            reactor, storage.deliveries, api, plugins.senders, config.name,
            # [mail]'s keys (the mailto: sender's) beside [push]'s.
            settings.delivery.retry, settings={**settings.push.for_senders(), **(sender_settings or {})},
            directory=storage.directory, failover_after=settings.delivery.failover_after,
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


# Transports whose peer is a verified client certificate's CN when one was presented (an IP address,
# which is never a package address, otherwise).
CERTIFIED_TRANSPORTS = ("tls", "https")
# Transports on which a centre can prove itself: a bearer token over HTTP(S), the SMTP AUTH password
# (accepted only after STARTTLS), a client certificate over TLS or HTTPS.
AUTHENTICATING_TRANSPORTS = ("http", "https", "tls", "smtp")


class SenderPolicy:
    """Central's answer to ``medd_check_sender``: who may send what in whose name.

    The sender is who its connection proves it to be: the centre or viewer
    whose bearer token came with it (HTTP(S), or the SMTP AUTH password), or
    over the TLS socket or HTTPS the centre or viewer one of whose addresses
    is its verified client certificate's CN.
    The package's From is only a claim, checked against that:

    - From a registered centre's address: only from that centre authenticated
      (over SMTP: AUTH after STARTTLS with its token); an overlay or report
      only on a study of its own.
    - From a registered viewer's address: only from that viewer
      authenticated, and only what a viewer makes (status, overlay, report).
    - From any other address: never a status, overlay or report (anyone could
      attach a "signed" report to a study); never from an authenticated
      centre or viewer writing in another's name. An image is let through, to
      be quarantined as from an unknown centre.

    Registered with the node's plugin manager by central's assembly.
    """

    def __init__(self, directory):
        self.directory = directory

    @hookimpl
    def medd_check_sender(self, claim):
        return ensureDeferred(self._check(claim))

    @hookimpl
    def medd_smime_certificate(self, address: str):
        d = self.directory.smime_certificate(address)
        return d.addCallback(lambda pem: pem.encode("ascii") if pem else None)

    async def _check(self, claim) -> str | None:
        origin = claim.origin
        # Whether the study is the centre's own matters only for an overlay or report.
        study = claim.study_uid if claim.object_type in ("overlay", "report") else None
        # A verified S/MIME signature names its signer as a verified client certificate does.
        certified = claim.signer or (claim.peer if claim.transport in CERTIFIED_TRANSPORTS else None)
        found = await self.directory.sender_facts(origin, claim.credentials, study, certified)
        if found.named_centre is not None:
            refusal = self._centre_refusal(claim, found.named_centre, found.centre)
            if refusal is None and claim.object_type in ("overlay", "report") and not found.own_study:
                refusal = (f"centre {found.named_centre.name} may send a {claim.object_type} only on a study of its "
                           f"own, and study {claim.study_uid or '(none)'} is not")
            return refusal
        if found.named_viewer is not None:
            if found.viewer is None or found.viewer.address != origin:
                return (f"a {claim.object_type} package from viewer {origin} must be sent authenticated as that "
                        "viewer (its bearer token over HTTP, or its client certificate over TLS)")
            if claim.object_type not in VIEWER_TYPES:
                return (f"viewer {origin} may send only what a viewer makes (status, overlay, report), "
                        f"not an {claim.object_type}")
            return None
        if claim.object_type in VIEWER_TYPES:
            return (f"a {claim.object_type} is accepted only from a registered viewer or centre, authenticated; "
                    f"{origin} is neither")
        sender = found.centre.name if found.centre else found.viewer.address if found.viewer else None
        if sender is not None:
            return f"{sender} is authenticated, and sends only in its own name, not as {origin}"
        return None

    @staticmethod
    def _centre_refusal(claim, named, authenticated) -> str | None:
        if ((claim.transport in AUTHENTICATING_TRANSPORTS or claim.signer) and authenticated is not None
                and authenticated.name == named.name):
            return None
        how = ("signed with S/MIME by its registered certificate"
               if claim.transport == "imap" else
               "over SMTP: AUTH (after STARTTLS) with its address and token, or signed with S/MIME"
               if claim.transport == "smtp" else
               "its bearer token over HTTP(S), or its client certificate over TLS or HTTPS")
        return f"a package from centre {named.name} ({claim.origin}) must be sent authenticated as that centre: {how}"
