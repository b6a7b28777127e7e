"""twistd support: ``twistd -n medd --config etc/central.ini``."""
from __future__ import annotations

from twisted.python import usage

from medd.config import ConfigError
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


def makeService(options):
    from twisted.internet import reactor

    from medd.service import NodeService

    return NodeService(reactor, options["validated"])
