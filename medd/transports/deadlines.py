"""Connections cannot be held hostage: a deadline per unit of work, a cap per peer.

A :class:`Deadline` bounds one unit of work on a connection (an HTTP request,
a TLS frame, an SMTP command line or message) from its first byte; bytes
arriving do not restart it, they only earn time at ``[limits]
min_transfer_rate``. :class:`PeerCappedFactory` is the wrapping factory of
every Twisted listener: past ``[limits] max_connections_per_peer`` a peer's
new connection is closed at once.
"""
from __future__ import annotations

from collections import Counter

from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory

from medd.config import ConnectionLimits
from medd.transports.handshakes import HandshakeForwarder

log = Logger()


def peer_host(transport) -> str:
    address = transport.getPeer()
    return str(getattr(address, "host", address))


class Deadline:
    """The deadline of the unit of work a connection is receiving, on the injected reactor's clock.

    ``start`` opens a unit with ``[limits] request_timeout``; ``earn`` adds the
    time a number of bytes take at the minimum rate; ``stop`` closes the unit.
    On expiry the connection is aborted and the peer logged.
    """

    def __init__(self, reactor, limits: ConnectionLimits, transport: str):
        self.reactor = reactor
        self.limits = limits
        self.transport_name = transport
        self.protocol = None
        self.unit: str | None = None
        self._started = 0.0
        self._due = 0.0
        self._call = None

    @property
    def running(self) -> bool:
        return self.unit is not None

    def start(self, protocol, unit: str) -> None:
        """A unit begins now (a running one is replaced)."""
        self.stop()
        self.protocol = protocol
        self.unit = unit
        self._started = self.reactor.seconds()
        self._due = self._started + self.limits.request_timeout
        self._call = self.reactor.callLater(self.limits.request_timeout, self._check)

    def earn(self, size: int) -> None:
        """``size`` bytes of the unit arrived or were declared: the time they take at the minimum rate is added."""
        if self.unit is not None:
            # The timer is not moved for each chunk; it checks the due time when it fires.
            self._due += self.limits.earned(size)

    def stop(self) -> None:
        """The unit is complete."""
        self.unit = None
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _check(self) -> None:
        self._call = None
        now = self.reactor.seconds()
        if now < self._due:
            self._call = self.reactor.callLater(self._due - now, self._check)
            return
        unit, self.unit = self.unit, None
        transport = self.protocol.transport
        log.warn(
            "{transport} {unit} from {peer} not complete {seconds:.0f} s after its first byte; aborting the connection",
            transport=self.transport_name, unit=unit, peer=peer_host(transport), seconds=now - self._started,
        )
        transport.abortConnection()


class PeerCappedFactory(WrappingFactory):
    """Wraps a listener's factory; knows its connections and closes those a peer opens past its cap."""

    protocol = HandshakeForwarder

    def __init__(self, wrappedFactory, *, max_per_peer: int, label: str):
        super().__init__(wrappedFactory)
        self.max_per_peer = max_per_peer
        self.label = label
        self.per_peer: Counter[str] = Counter()

    def buildProtocol(self, addr):
        host = str(getattr(addr, "host", addr))
        if self.per_peer[host] >= self.max_per_peer:
            log.warn("{label} connection from {peer} closed: it already has {count} open (the most per peer)",
                     label=self.label, peer=host, count=self.per_peer[host])
            return None  # Twisted closes the connection at once
        protocol = super().buildProtocol(addr)
        if protocol is not None:
            protocol.medd_peer = host
            self.per_peer[host] += 1
        return protocol

    def unregisterProtocol(self, p) -> None:
        super().unregisterProtocol(p)
        host = getattr(p, "medd_peer", None)
        if host is not None:
            p.medd_peer = None
            self.per_peer[host] -= 1
            if self.per_peer[host] <= 0:
                del self.per_peer[host]
