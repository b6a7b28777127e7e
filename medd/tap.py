"""twistd support: ``twistd -n medd --config etc/central.ini``."""
from __future__ import annotations

from twisted.python import usage

from medd.config import ConfigError, load_config


class Options(usage.Options):
    optParameters = [["config", "c", None, "The node's INI configuration file."]]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config is required")
        try:
            self["loaded"] = load_config(self["config"])
        except ConfigError as e:
            raise usage.UsageError(f"invalid configuration:\n{e}") from e


def makeService(options):
    from twisted.internet import reactor

    from medd.plugins.host import load_plugins
    from medd.service import check_against_plugins, make_node

    config = options["loaded"]
    plugins = load_plugins(config.disabled_plugins)
    try:
        check_against_plugins(config, plugins)
    except ConfigError as e:
        raise usage.UsageError(f"invalid configuration:\n{e}") from e
    return make_node(reactor, config, plugins)
