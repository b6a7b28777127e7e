"""The hooks a medd plugin may implement.

Every plugin, built-in or third-party, is a module or object registered under
the ``medd`` entry-point group that implements some of these hooks. Each
registration hook receives a small ``register`` object, never the
application: a plugin says what it provides, and medd decides when to use it.
"""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("medd")
hookimpl = pluggy.HookimplMarker("medd")


@hookspec
def medd_register_object_types(register) -> None:
    """Register object types with ``register(object_type)``.

    Each object type provides :class:`medd.plugins.interfaces.IObjectType`.
    """


@hookspec
def medd_register_transports(register) -> None:
    """Register transports with ``register(transport)``.

    Each transport provides :class:`medd.plugins.interfaces.ITransport`; its
    ``name`` is the key under ``[listen]`` that configures its listener.
    """


@hookspec
def medd_register_senders(register) -> None:
    """Register push senders with ``register(sender)``.

    Each sender provides :class:`medd.plugins.interfaces.ISender` and handles
    the URL schemes it names (a push viewer's URL picks its sender).
    """


@hookspec
def medd_register_storage(register) -> None:
    """Register storage backends with ``register(kind, name, factory)``.

    ``kind`` is ``"blobstore"`` or ``"archive"``; ``factory(config)``
    returns an object providing the matching interface.
    """


@hookspec
def medd_object_stored(stored) -> None:
    """Notification: an object was stored and indexed (a :class:`StoredObject`).

    May return a Deferred or coroutine; the host waits for it but a failure
    is only logged, never un-acknowledges the object.
    """
