"""A service that listens on a Twisted endpoint string.

Like Twisted's ``StreamServerEndpointService``, plus a public way to learn
the bound address (tests and the demo listen on port 0).
"""
from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory


class EndpointListener(Service):
    log = Logger()

    def __init__(self, reactor, description: str, factory, label: str):
        self.reactor = reactor
        self.description = description
        # Wrapped to know the open connections: stopping a listener closes
        # them too, or kept-alive clients would still talk to a stopped node.
        self.factory = WrappingFactory(factory)
        self.label = label
        self.port = None
        self._waiting: list[Deferred] = []

    def startService(self) -> None:
        super().startService()
        d = serverFromString(self.reactor, self.description).listen(self.factory)

        def listening(port):
            self.port = port
            host = port.getHost()
            self.log.info("{label} listening on {host}:{port}", label=self.label, host=getattr(host, "host", host), port=getattr(host, "port", ""))
            waiting, self._waiting = self._waiting, []
            for w in waiting:
                w.callback(port)

        def failed(failure):
            self.log.failure("{label} cannot listen on {description}", failure, label=self.label, description=self.description)
            waiting, self._waiting = self._waiting, []
            for w in waiting:
                w.errback(failure)

        d.addCallbacks(listening, failed)

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
        for protocol in list(self.factory.protocols):
            protocol.transport.loseConnection()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None
