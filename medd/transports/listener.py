"""A service that listens on a Twisted endpoint string.

Like Twisted's ``StreamServerEndpointService`` with ``_raiseSynchronously``
(what ``strports.service`` builds for twistd), plus a public way to learn the
bound address (tests and the demo listen on port 0) and one clear
:class:`~medd.plugins.api.CannotListen` when the endpoint cannot be bound.
"""
from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from medd.config import ConnectionLimits
from medd.plugins.api import CannotListen
from medd.transports.deadlines import PeerCappedFactory


class EndpointListener(Service):
    log = Logger()

    def __init__(self, reactor, description: str, factory, label: str, limits: ConnectionLimits = ConnectionLimits()):
        self.reactor = reactor
        self.description = description
        # Wrapped to know the open connections: stopping a listener closes
        # them too, or kept-alive clients would still talk to a stopped node;
        # and a peer cannot hold more than its share of them.
        self.factory = PeerCappedFactory(factory, max_per_peer=limits.max_connections_per_peer, label=label)
        self.label = label
        self.port = None
        self._listening: Deferred | None = None
        self._waiting: list[Deferred] = []

    def privilegedStartService(self) -> None:
        # Bind here, before the reactor runs (twistd calls this first, as
        # root if it must): a port that cannot be had raises CannotListen
        # and the node does not start without its listener.
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        if self._listening is None:
            self._listen()

    def _listen(self) -> None:
        binding = True  # while listen() runs: a failure now is raised to whoever started us
        failed_now: list[CannotListen] = []

        def listening(port):
            self.port = port
            host = port.getHost()
            self.log.info("{label} listening on {host}:{port}", label=self.label, host=getattr(host, "host", host), port=getattr(host, "port", ""))
            waiting, self._waiting = self._waiting, []
            for w in waiting:
                w.callback(port)

        def failed(failure):
            error = CannotListen.from_error(self.label, self.description, failure.value)
            waiting, self._waiting = self._waiting, []
            for w in waiting:
                w.errback(error)
            if binding:
                failed_now.append(error)  # tcp:, ssl: and unix: endpoints all bind at once
            else:
                # An endpoint that binds later (none of the built-in ones) can
                # only say so: the reactor is running and the node is started.
                self.log.critical("medd: {error}", error=str(error))

        self._listening = serverFromString(self.reactor, self.description).listen(self.factory)
        self._listening.addCallbacks(listening, failed)
        binding = False
        if failed_now:
            raise failed_now[0]

    def whenListening(self) -> Deferred:
        """Fires with the listening port (at once if already listening)."""
        d = Deferred()
        if self.port is not None:
            d.callback(self.port)
        else:
            self._waiting.append(d)
        return d

    def stopService(self):
        super().stopService()
        self._listening = None
        for protocol in list(self.factory.protocols):
            protocol.transport.loseConnection()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None
