"""The ``metrics`` listener: the node's Prometheus page, ``GET /metrics`` (medd/metrics.py).

A listener of its own, so that a site binds it to a private interface
(``[listen] metrics = tcp:9100:interface=127.0.0.1``) and scrapes it without a
credential; it serves nothing else.
"""
from __future__ import annotations

from twisted.web.server import Site
from zope.interface import implementer

from medd.plugins.hookspecs import hookimpl
from medd.plugins.interfaces import ITransport
from medd.transports.listener import EndpointListener


@implementer(ITransport)
class MetricsTransport:
    name = "metrics"
    description = "Prometheus metrics: GET /metrics, in the text exposition format (prometheus_client)"

    def listener(self, endpoint: str, api):
        site = Site(api.metrics_page)
        site.displayTracebacks = False
        return EndpointListener(api.reactor, endpoint, site, "metrics", api.limits)


@hookimpl
def medd_register_transports(register) -> None:
    register(MetricsTransport())
