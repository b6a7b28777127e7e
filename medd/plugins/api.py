"""What a transport plugin may do on a node: the narrow API it is handed.

A transport receives one :class:`TransportAPI` per listener. Through it, and
nothing else, it may hand received data to the node's ingest path, run a
short blocking call off the reactor, read its own config section and the
node's TLS settings (both frozen), know the size limit, serve the HTTP
resources the node mounted, and answer DICOMweb queries through the typed
:class:`~medd.plugins.interfaces.IObjectQueries`. It never sees the database,
the role's services or the rest of the configuration.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from medd.config import ConnectionLimits, PartLimits
from medd.plugins.interfaces import IObjectQueries

log = Logger()


class CannotListen(Exception):
    """A listener could not bind its endpoint; the node must not run without it.

    A transport's listener raises it from ``privilegedStartService`` (or from
    ``startService`` when that was not called first), before the reactor
    runs, so twistd and ``medd demo`` stop at once with its one line.
    """

    def __init__(self, transport: str, endpoint: str, reason: str):
        self.transport, self.endpoint, self.reason = transport, endpoint, reason
        super().__init__(f"cannot listen for {transport} on {endpoint}: {reason}")

    @classmethod
    def from_error(cls, transport: str, endpoint: str, error: BaseException) -> "CannotListen":
        """From the OSError (or Twisted's CannotListenError wrapping one) that the bind raised."""
        cause = getattr(error, "socketError", None) or error
        reason = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
        return cls(transport, endpoint, reason[:1].lower() + reason[1:])


@dataclass(frozen=True)
class TLSSettings:
    """The node's ``[tls]`` section, paths resolved (None where not configured)."""

    certificate: str | None = None
    private_key: str | None = None
    # PEM of the CAs whose client certificates a TLS listener requires.
    client_ca: str | None = None


class WebMounts:
    """The HTTP resources a node mounts beside ``/packages`` and ``/dicomweb``.

    The node's role (or a plugin it hosts) calls :meth:`mount` while the node
    is being assembled; the HTTP transport serves every mount at
    ``/<name>``. Once the listeners are built the set is frozen.
    """

    def __init__(self):
        self._resources: dict[bytes, object] = {}
        self._frozen = False

    def mount(self, name: str | bytes, resource) -> None:
        """Serve ``resource`` (a ``twisted.web`` resource) at ``/<name>``."""
        key = name.encode("ascii") if isinstance(name, str) else name
        if self._frozen:
            raise RuntimeError(f"/{key.decode()} mounted after the listeners were built")
        if key in self._resources:
            raise ValueError(f"/{key.decode()} is mounted twice")
        self._resources[key] = resource

    def freeze(self) -> Mapping[bytes, object]:
        self._frozen = True
        return MappingProxyType(self._resources)


class TransportAPI:
    """The node as one transport's listener sees it. See the module docstring."""

    def __init__(self, reactor, ingest, *, transport: str, node_name: str, settings: Mapping[str, str],
                 tls: TLSSettings, web_resources: Mapping[bytes, object], queries=None,
                 limits: ConnectionLimits = ConnectionLimits(), audit=None, clock=None, metrics_page=None):
        self.reactor = reactor
        #: The node's one clock (``seconds()``), for what is compared over time (throttles); the reactor by default.
        self.clock = clock or reactor
        self._ingest = ingest
        self.transport = transport
        self.node_name = node_name
        #: The transport's own config section (``[<transport name>]``), read-only.
        self.settings: Mapping[str, str] = MappingProxyType(dict(settings))
        self.tls = tls
        #: Largest object or package the node accepts, in bytes.
        self.max_object_size: int = ingest.max_object_size
        #: ``[limits]`` part counts of multipart bodies (packages, STOW-RS).
        self.part_limits: PartLimits = ingest.part_limits
        #: ``[limits]`` deadlines and the per-peer connection cap every listener applies.
        self.limits: ConnectionLimits = limits
        #: The HTTP resources the node mounted, ``{b"name": resource}``, read-only.
        self.web_resources: Mapping[bytes, object] = web_resources
        #: :class:`~medd.plugins.interfaces.IObjectQueries` over the node's index (DICOMweb).
        self.queries = queries
        self._audit = audit
        #: The node's metrics page (a ``twisted.web`` resource serving ``/metrics``), for the listener that serves it.
        self.metrics_page = metrics_page

    def audit(self, event: str, **fields) -> Deferred:
        """Record an access or a refusal in the node's audit trail (:meth:`medd.audit.AuditTrail.record`:
        ``event`` is one of :data:`medd.audit.EVENTS`); Deferred None once it is committed."""
        if self._audit is None:
            return succeed(None)
        return self._audit.record(event, transport=fields.pop("transport", self.transport), **fields)

    def receive_dicom(self, data: bytes, *, origin: str, peer: str | None = None, transport: str | None = None,
                      user: str | None = None) -> Deferred:
        """Ingest a bare DICOM Part 10 object; Deferred :class:`medd.ingest.Stored`.

        Fails with :class:`medd.ingest.Refused` (bad data: refuse for good)
        or :class:`medd.ingest.StoreFailed` (medd could not store it: the
        sender should retry). ``origin`` is who sent it (a calling AE title,
        a client address); ``peer`` the connection's client IP, kept with the
        object (central checks a centre's AE title against its networks); ``user`` the name of the
        credential the sender proved, if it did (a centre's, a viewer's: its audit records' user).
        """
        return self._ingest.receive_dicom(data, transport=transport or self.transport, origin=origin, peer=peer,
                                          user=user)

    def receive_dicom_waiting(self, data: bytes, *, origin: str, peer: str | None = None,
                              transport: str | None = None, user: str | None = None):
        """:meth:`receive_dicom` from a thread of the transport's own that waits for the outcome
        (never the reactor's): parses and writes the object on that thread and returns the
        :class:`medd.ingest.Stored`, or raises as the Deferred would fail."""
        return self._ingest.receive_dicom_waiting(data, transport=transport or self.transport, origin=origin,
                                                  peer=peer, user=user)

    def accept_association(self, calling_ae: str, called_ae: str, peer: str) -> Deferred:
        """Deferred None if a DICOM peer may open an association, else the reason to reject it
        (the node's ``medd_accept_association`` decision)."""
        return self._ingest.accept_association(calling_ae, called_ae, peer)

    def receive_package(self, data: bytes, *, peer: str | None = None, credentials: str | None = None,
                        transport: str | None = None, user: str | None = None) -> Deferred:
        """Ingest a package; as :meth:`receive_dicom`.

        ``peer`` is the connection's identity (client IP, or a verified TLS
        client certificate's CN); ``credentials`` what the sender
        authenticated with (an HTTP bearer token); ``user`` the name of the credential it proved.
        """
        return self._ingest.receive_package(data, transport=transport or self.transport, peer=peer,
                                            credentials=credentials, user=user)

    def receive_packages(self, frames: list[bytes], *, peer: str | None = None, credentials: str | None = None,
                         transport: str | None = None, user: str | None = None) -> list[Deferred]:
        """Ingest packages that arrived together on one connection (pipelined), in order: one
        Deferred each, as :meth:`receive_package` gives; see :meth:`medd.ingest.Ingest.receive_packages`."""
        return self._ingest.receive_packages(frames, transport=transport or self.transport, peer=peer,
                                             credentials=credentials, user=user)

    def run_blocking(self, fn, *args) -> Deferred:
        """Run a short blocking call (reading a request body, parsing) off the reactor."""
        return self._ingest.run_blocking(fn, *args)

    def check_access(self, claim) -> Deferred:
        """Deferred :class:`~medd.plugins.hookspecs.AccessDecision` for an
        :class:`~medd.plugins.hookspecs.AccessClaim`: what the node's
        ``medd_check_access`` policy says, and a refusal when none answers."""
        return check_access(self._ingest.plugins.manager, claim)

    def pixel_data_retrieved(self, uid: str, who: str, peer: str | None = None) -> Deferred:
        """Tell the node's ``medd_pixel_data_retrieved`` hooks that ``who`` (at ``peer``) was sent the pixel
        data of ``uid``; Deferred None once they are done (a hook's failure is logged, never raised)."""
        return pixel_data_retrieved(self._ingest.plugins.manager, uid, who, peer)


def check_access(manager, claim) -> Deferred:
    """Ask the ``medd_check_access`` hook; no answer is a refusal (nothing is served anonymously)."""
    from medd.plugins.hookspecs import AccessDecision
    from medd.plugins.host import hook_value

    async def decide():
        verdict = await hook_value(manager.hook.medd_check_access(claim=claim))
        if verdict is None:
            return AccessDecision(False, reason="this node has no access policy for it; nothing is served anonymously")
        return verdict

    return ensureDeferred(decide())


def pixel_data_retrieved(manager, uid: str, who: str, peer: str | None) -> Deferred:
    from medd.plugins.host import hook_value

    async def notify():
        for result in manager.hook.medd_pixel_data_retrieved(uid=uid, who=who, peer=peer):
            try:
                await hook_value(result)
            except Exception:
                log.failure("a medd_pixel_data_retrieved hook failed for {uid}", uid=uid)

    return ensureDeferred(notify())


@implementer(IObjectQueries)
class IndexQueries:
    """:class:`~medd.plugins.interfaces.IObjectQueries` over a node's object index and ingest."""

    def __init__(self, index, ingest, metadata_cache=None):
        self._index = index
        self._ingest = ingest
        self._metadata = metadata_cache  # a MetadataCache connector, on a node that keeps one (the viewer)

    def search_studies(self, matches, limit=100, offset=0) -> Deferred:
        return self._index.search_studies(matches, limit, offset)

    def search_series(self, study_uid, matches, limit=100, offset=0) -> Deferred:
        return self._index.search_series(study_uid, matches, limit, offset)

    def search_instances(self, study_uid, series_uid, matches, limit=100, offset=0) -> Deferred:
        return self._index.search_instances(study_uid, series_uid, matches, limit, offset)

    def object_by_uid(self, uid) -> Deferred:
        return self._index.object_by_uid(uid)

    def read_blob(self, digest) -> Deferred:
        return self._ingest.read_blob(digest)

    def cached_metadata(self, digests) -> Deferred:
        if self._metadata is None:
            return succeed({})
        return self._metadata.documents(digests)

    def cache_metadata(self, documents) -> Deferred:
        if self._metadata is None or not documents:
            return succeed(None)
        return self._metadata.put(documents)
