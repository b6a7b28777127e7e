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

        ``api`` is a :class:`medd.plugins.api.TransportAPI`: the narrow
        facade through which received data enters the node.
        """


class IObjectQueries(Interface):
    """The read-only queries a transport may run on the node's index (DICOMweb).

    Every method returns a Deferred. Matches are
    :class:`medd.storage.index.Match` values; records are
    :class:`medd.storage.index.ObjectRecord`.
    """

    def search_studies(matches, limit, offset):
        """Study-level rows (dicts of study attributes, ``modalities``, counts)."""

    def search_series(study_uid, matches, limit, offset):
        """Series-level rows (dicts) of one study, or of all when ``study_uid`` is None."""

    def search_instances(study_uid, series_uid, matches, limit, offset):
        """Instance records (DICOM objects only)."""

    def object_by_uid(uid):
        """The record of one object, or None."""

    def read_blob(digest):
        """The stored bytes of an object (restored from the archive if evicted)."""

    def cached_metadata(digests):
        """``{digest: WADO-RS metadata (dicom+json bytes)}`` for those objects whose metadata the node keeps
        (:mod:`medd.dicomjson`); empty on a node without a metadata cache."""

    def cache_metadata(documents):
        """Keep ``{digest: dicom+json bytes}`` for :meth:`cached_metadata` (nothing on a node without a cache)."""


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


class ISweepableBlobStore(IBlobStore):
    """A blob store that can list its old blobs, so that the node's sweep
    (:mod:`medd.blobsweep`) can remove those no row references. Optional: a
    store without it is never swept."""

    def stale(before, prefix):
        """The digests beginning with ``prefix`` (two hex digits) of blobs last written or
        re-put before ``before`` (seconds since the epoch). Blocking."""

    def delete_stale(digest, before):
        """Remove ``digest`` only if it is still older than ``before``; True if removed. Blocking."""


class IArchive(Interface):
    """Lifetime storage: append-only volumes of objects, written sequentially.

    A volume is named by its path relative to the archive root
    (``<centre>/<modality>/vol-NNNNNN.tar``). The catalogue in the database
    says how far each volume is committed (``end``); the backend never
    trusts bytes past it. Every method is blocking: call it on the archive
    thread pool. A full or offline target raises ``OSError``.
    """

    description = Attribute("One line for logs and `medd plugins`, e.g. the target.")

    def append(volume, end, members):
        """Append ``members`` (:class:`medd.storage.archive.Member`) to ``volume``.

        Bytes past ``end`` (a half-written member left by a crash) are
        dropped first. Returns one :class:`medd.storage.archive.Placement`
        per member, in order, once they are durable.
        """

    def close(volume, end):
        """Write the end-of-archive marker after ``end``; return ``(size, sha256 of the volume)``."""

    def read(volume, offset, size):
        """``size`` bytes at ``offset`` of ``volume``."""

    def checksum(volume, size):
        """SHA-256 (hex) of the first ``size`` bytes of ``volume``."""

    def scan(volume):
        """Read ``volume`` from start to end; yield a :class:`medd.storage.archive.Scanned` per member."""

    def recover(volume, end):
        """Drop whatever lies past ``end`` in ``volume``; return how many bytes were dropped."""


class ISender(Interface):
    """Pushes a package to a node at a URL (central -> push viewer)."""

    schemes = Attribute("URL schemes this sender handles, e.g. ('smtp',).")

    def send(reactor, url, package, settings):
        """Deferred that fires when the receiver has acknowledged ``package``
        (bytes) as durable, and fails with the reason otherwise.

        ``settings`` is the node's ``[push]`` section as validated at start
        (``tls_ca`` and ``tls_client_cert`` resolved against the config
        file's folder, ``http_token``); a sender that reads other ``[push]``
        keys declares them with ``medd_register_config``.
        """


class IBatchSender(ISender):
    """A sender that can carry several packages over one connection (a gateway's batch to central)."""

    def send_batch(reactor, url, packages, settings):
        """Deferred list with one reply per package of ``packages``, in order:
        ``{"status": "ok"}`` once the receiver has made that package durable,
        ``{"status": "refused", "reason": ...}`` when it never will take it,
        ``{"status": "retry", "reason": ...}`` when it was not taken now (the
        connection failed or ended before that package was answered).
        Never fails as a whole: a connection that cannot be made answers
        every package ``retry``.
        """
