"""The gateway role's services: forwarding to central, the watched folder, the
requestor of central's receipts and results, results to the centre's PACS, and the hooks the gateway
implements (which modalities may associate; what is queued for central)."""
from __future__ import annotations

from urllib.parse import urlsplit

from twisted.application.service import MultiService
from twisted.logger import Logger

from medd.gateway.forwarding import ForwardingService
from medd.gateway.results import ResultsToPacs
from medd.gateway.settings import GatewaySettings
from medd.gateway.watch import WatchedFolder
from medd.plugins.hookspecs import hookimpl
from medd.pull import CentralClient, Requestor


class GatewayHooks:
    """The gateway's implementations of medd's hooks, registered with the node's plugin manager."""

    log = Logger()

    def __init__(self, settings: GatewaySettings, forwarder: ForwardingService, results: ResultsToPacs | None):
        self.accept_ae = frozenset(settings.accept_ae)
        self.forwarder = forwarder
        self.results = results

    @hookimpl
    def medd_accept_association(self, calling_ae: str, called_ae: str, peer: str) -> str | None:
        if self.accept_ae and calling_ae not in self.accept_ae:
            return f"calling AE title {calling_ae!r} is not in [gateway] accept_ae"
        return None

    @hookimpl
    def medd_object_stored(self, stored) -> None:
        # Both queue rows were written with the index row; these only count and kick: what the
        # centre sent goes to central, what central sent back goes to the PACS.
        self.forwarder.object_stored(stored)
        if self.results is not None:
            self.results.object_stored(stored)


class GatewayServices(MultiService):
    """Children of a gateway node. ``node.forwarding`` (the connector) and ``node.spool`` (the ingest's
    admission check) are built with the node, before its ingest."""

    def __init__(self, node, settings: GatewaySettings, sender_settings: dict | None = None):
        super().__init__()
        self.settings = settings
        clock = node.clock
        scheme = urlsplit(settings.central).scheme
        sender = node.plugins.senders.get(scheme)
        if sender is None:
            raise ValueError(f"no push sender is loaded for {scheme}:// ([gateway] central)")
        self.forwarder = ForwardingService(node.reactor, node.forwarding, node.ingest, node.plugins.object_types,
                                          sender, settings, node.spool, clock, sender_settings=sender_settings)
        self.forwarder.setName("forwarding")
        self.forwarder.setServiceParent(self)
        self.results = None
        if settings.results_to is not None:
            self.results = ResultsToPacs(node.reactor, node.forwarding, node.ingest, settings.results_to,
                                         settings.backoff, clock, timeout=settings.timeout)
            self.results.setName("results-to-pacs")
            self.results.setServiceParent(self)
        self.hooks = GatewayHooks(settings, self.forwarder, self.results)
        node.plugins.manager.register(self.hooks, name="medd-gateway")
        self.client = None
        if settings.outbox is not None:
            self.client = CentralClient(node.reactor, settings.outbox)
            self.requestor = Requestor(self.client, node.ingest, settings.outbox, clock)
            self.requestor.setName("requestor")
            self.requestor.setServiceParent(self)
        if settings.watch is not None:
            self.watch = WatchedFolder(settings.watch, node.ingest, settings.watch_interval, clock)
            self.watch.setName("watch")
            self.watch.setServiceParent(self)

    def stopService(self):
        d = super().stopService()
        if self.client is None:
            return d

        def close(result):
            closed = self.client.close()
            return closed.addCallback(lambda _: result) if closed is not None else result

        return d.addBoth(close) if d is not None else close(None)
