"""The plugin host: finds plugins through the ``medd`` entry-point group,
calls their registration hooks and checks what they register."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import inspect

import pluggy
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface.verify import verifyObject

from medd.plugins import hookspecs
from medd.plugins.interfaces import IArchive, IBlobStore, IObjectType, ISender, ITransport

log = Logger()

STORAGE_INTERFACES = {"blobstore": IBlobStore, "archive": IArchive}


async def hook_value(value):
    """What a hook implementation answered, awaited if it answered a Deferred or a coroutine
    (decision hooks may answer either, or a plain value)."""
    if isinstance(value, Deferred):
        return await value
    if inspect.isawaitable(value):
        return await value
    return value


class PluginError(Exception):
    """A plugin registered something unusable."""


@dataclass
class Plugins:
    """Everything the loaded plugins registered, by kind."""

    manager: pluggy.PluginManager
    object_types: list = field(default_factory=list)
    transports: dict = field(default_factory=dict)
    storage: dict = field(default_factory=dict)  # (kind, name) -> factory
    senders: dict = field(default_factory=dict)  # URL scheme -> ISender
    sources: dict = field(default_factory=dict)  # (kind, name) -> plugin name
    # Declared with medd_register_config: section -> {key: plugin name}, and
    # [(section, check, plugin name)] to run at validation.
    config_keys: dict = field(default_factory=dict)
    config_checks: list = field(default_factory=list)

    def object_type(self, name: str):
        for t in self.object_types:
            if t.name == name:
                return t
        return None

    def listing(self) -> dict[str, list[tuple[str, str]]]:
        """{kind: [(name, provided by)]} for `medd plugins`."""
        out: dict[str, list[tuple[str, str]]] = {"object type": [], "transport": [], "sender": [], "storage": []}
        for t in self.object_types:
            out["object type"].append((t.name, self.sources[("object type", t.name)]))
        for name in sorted(self.transports):
            out["transport"].append((name, self.sources[("transport", name)]))
        for scheme in sorted(self.senders):
            out["sender"].append((scheme, self.sources[("sender", scheme)]))
        for kind, name in sorted(self.storage):
            out["storage"].append((f"{kind}:{name}", self.sources[("storage", f"{kind}:{name}")]))
        return out


def load_plugins(disabled: Iterable[str] = (), extra: Iterable[object] = ()) -> Plugins:
    """Load every ``medd`` entry point except ``disabled``, plus ``extra`` objects.

    ``disabled`` names entry points (as `medd plugins` shows them); a blocked
    plugin is never imported.
    """
    pm = pluggy.PluginManager("medd")
    pm.add_hookspecs(hookspecs)
    for name in disabled:
        pm.set_blocked(name)
    pm.load_setuptools_entrypoints("medd")
    for obj in extra:
        pm.register(obj)
    try:
        # A medd_* function that matches no hookspec (a misspelt hook) would
        # otherwise load silently and never be called.
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise PluginError(f"{pm.get_name(e.plugin) or e.plugin!r}: {e}") from e
    plugins = Plugins(manager=pm)

    # Registration runs plugin by plugin so that every registered item is
    # attributed to the entry point that provided it.
    _current = ["?"]

    def caller() -> str:
        return _current[0]

    def register_object_type(obj) -> None:
        _verify(obj, IObjectType, "object type", caller())
        if plugins.object_type(obj.name) is not None:
            raise PluginError(f"object type {obj.name!r} registered twice (by {caller()})")
        plugins.object_types.append(obj)
        plugins.sources[("object type", obj.name)] = caller()

    def register_transport(obj) -> None:
        _verify(obj, ITransport, "transport", caller())
        if obj.name in plugins.transports:
            raise PluginError(f"transport {obj.name!r} registered twice (by {caller()})")
        plugins.transports[obj.name] = obj
        plugins.sources[("transport", obj.name)] = caller()

    def register_sender(obj) -> None:
        _verify(obj, ISender, "sender", caller())
        for scheme in obj.schemes:
            if scheme in plugins.senders:
                raise PluginError(f"sender for {scheme}: registered twice (by {caller()})")
            plugins.senders[scheme] = obj
            plugins.sources[("sender", scheme)] = caller()

    def register_storage(kind: str, name: str, factory: Callable) -> None:
        if kind not in STORAGE_INTERFACES:
            raise PluginError(f"{caller()} registered unknown storage kind {kind!r}")
        plugins.storage[(kind, name)] = factory
        plugins.sources[("storage", f"{kind}:{name}")] = caller()

    def register_config(section: str, keys: Iterable[str], check: Callable | None = None) -> None:
        if isinstance(keys, str):
            raise PluginError(f"{caller()} registered [{section}] keys as one string; pass a list of key names")
        declared = plugins.config_keys.setdefault(section, {})
        for key in keys:
            declared.setdefault(key.lower(), caller())
        if check is not None:
            plugins.config_checks.append((section, check, caller()))

    for plugin in pm.get_plugins():
        _current[0] = pm.get_name(plugin) or repr(plugin)
        for hookname, register in (
            ("medd_register_object_types", register_object_type),
            ("medd_register_transports", register_transport),
            ("medd_register_storage", register_storage),
            ("medd_register_senders", register_sender),
            ("medd_register_config", register_config),
        ):
            impls = [i for i in getattr(pm.hook, hookname).get_hookimpls() if i.plugin is plugin]
            for impl in impls:
                impl.function(register)
    plugins.object_types.sort(key=lambda t: t.rank)
    return plugins


def _verify(obj, iface, kind: str, source: str) -> None:
    try:
        verifyObject(iface, obj)
    except Exception as e:  # zope raises several Invalid subclasses
        raise PluginError(f"{source} registered a {kind} that does not provide {iface.__name__}: {e}") from e


def check_storage(plugins: Plugins, kind: str, obj, name: str) -> None:
    _verify(obj, STORAGE_INTERFACES[kind], f"{kind} backend", plugins.sources[("storage", f"{kind}:{name}")])
