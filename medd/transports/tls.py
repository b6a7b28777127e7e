"""tls transport (under construction)."""
from zope.interface import implementer

from medd.plugins.hookspecs import hookimpl
from medd.plugins.interfaces import ITransport


@implementer(ITransport)
class _Placeholder:
    name = "tls"
    description = "tls (not implemented yet)"

    def listener(self, endpoint, api):
        raise NotImplementedError("tls")


@hookimpl
def medd_register_transports(register) -> None:
    register(_Placeholder())
