"""What a plugin object must provide, stated with zope.interface.

Tests check built-ins with ``verifyObject``; the host checks every registered
plugin the same way, so a third-party plugin that forgets a method is refused
at start-up, not at 3 a.m.
"""
from __future__ import annotations

from zope.interface import Attribute, Interface


class IObjectType(Interface):
    """One kind of object a package can carry (image, overlay, report, status)."""

    name = Attribute("The type token used in Medd-Attachment, e.g. 'image'.")
    rank = Attribute("Lower ranks are asked first when classifying content.")

    def recognise(content):
        """True if this type carries ``content`` (a :class:`medd.objects.Content`)."""

    def identifier(content):
        """The :class:`medd.package.AttachmentId` taken from ``content`` itself."""

    def validate(claimed, content):
        """Raise :class:`medd.objects.InvalidObject` unless ``claimed`` matches ``content``."""


class ITransport(Interface):
    """A way packages or objects travel: a listener on a node, later a sender."""

    name = Attribute("The transport name and its key under [listen].")
    description = Attribute("One line for `medd plugins`.")

    def listener(endpoint, api):
        """An ``IService`` listening on ``endpoint`` (an endpoint string).

        ``api`` is a :class:`medd.central.ingest.ReceiverAPI`: the narrow
        facade through which received data enters the node.
        """


class IBlobStore(Interface):
    """Durable, content-addressed storage for object bytes."""

    def put(data):
        """Store ``data`` durably (fsync'd); return a :class:`medd.storage.blobstore.BlobRef`.

        Blocking: call it on a thread pool.
        """

    def get(digest):
        """The bytes stored under ``digest``. Blocking."""

    def exists(digest):
        """True if ``digest`` is stored. Blocking."""

    def delete(digest):
        """Remove ``digest`` if present. Blocking."""
