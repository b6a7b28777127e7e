"""twistd support: ``twistd -n medd --config etc/central.ini``."""
from __future__ import annotations

from twisted.application.service import MultiService
from twisted.logger import ILogObserver
from twisted.python import usage

from medd.config import ConfigError
from medd.plugins.api import CannotListen
from medd.plugins.host import PluginError


class Options(usage.Options):
    optParameters = [["config", "c", None, "The node's INI configuration file."]]

    def postOptions(self) -> None:
        # The whole validation, the same one `medd check-config` runs: twistd
        # refuses to start on any problem, before a port is bound.
        from medd.validation import validate_file

        if not self["config"]:
            raise usage.UsageError("--config is required")
        try:
            self["validated"] = validate_file(self["config"])
        except ConfigError as e:
            raise usage.UsageError(f"invalid configuration:\n{e}") from e
        except PluginError as e:
            raise usage.UsageError(f"cannot load the plugins: {e}") from e


class TwistdNode(MultiService):
    """The service twistd runs: the node, and a listener that cannot bind ends twistd in one line.

    twistd calls ``privilegedStartService`` before the reactor runs, and the
    node's listeners bind there (as Twisted's own ``strports`` services do
    with ``_raiseSynchronously``); an exception from it ends twistd. In the
    foreground it would be a traceback, so it becomes ``sys.exit(line)``,
    twistd's own way out for start-up errors; a daemonised twistd passes the
    exception's text to the waiting parent through its status pipe, which
    prints it and exits 1.
    """

    def __init__(self, node, *, foreground: bool, log_observer=None):
        super().__init__()
        self.node = node
        self.foreground = foreground
        self.log_observer = log_observer
        node.setServiceParent(self)

    def setServiceParent(self, parent) -> None:
        # twistd asks the application for an ILogObserver before it makes its own from the
        # command line: that is how [log] format = json takes the place of its text lines.
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListen as e:
            if self.foreground:
                raise SystemExit(f"medd: {e}") from None
            raise


def makeService(options):
    from twisted.internet import reactor

    from medd.service import NodeService

    # options.parent is twistd's own ServerOptions (absent when a test parses ours alone).
    parent = getattr(options, "parent", None)
    foreground = bool(parent["nodaemon"]) if parent is not None else True
    settings = options["validated"]
    observer = None
    if settings.config.log_format == "json" and parent is not None and not parent.get("syslog"):
        from medd.logs import json_log_observer

        observer = json_log_observer(parent.get("logfile"), foreground)
    return TwistdNode(NodeService(reactor, settings), foreground=foreground, log_observer=observer)
