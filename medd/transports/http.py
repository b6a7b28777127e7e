"""http transport (under construction)."""
from zope.interface import implementer

from medd.plugins.hookspecs import hookimpl
from medd.plugins.interfaces import ITransport


@implementer(ITransport)
class _Placeholder:
    name = "http"
    description = "http (not implemented yet)"

    def listener(self, endpoint, api):
        raise NotImplementedError("http")


@hookimpl
def medd_register_transports(register) -> None:
    register(_Placeholder())
