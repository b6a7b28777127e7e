"""The hooks a medd plugin may implement.

Every plugin, built-in or third-party, is a module or object registered under
the ``medd`` entry-point group that implements some of these hooks. Each
registration hook receives a small ``register`` callable, never the
application: a plugin says what it provides, and medd decides when to use it.
An implementation whose name starts with ``medd_`` but matches no hook here
is an error when the plugins are loaded (a misspelt hook never loads
silently).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, Optional, Union

import pluggy

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from medd.plugins.settings import SectionCheck
    from medd.storage.index import ObjectRecord

hookspec = pluggy.HookspecMarker("medd")
hookimpl = pluggy.HookimplMarker("medd")


@dataclass(frozen=True)
class SenderClaim:
    """Who a received package says it is from, and how it came.

    ``origin`` is the package's From (lower case), a claim; ``peer`` is the
    connection's identity (client IP, or the CN of a verified TLS client
    certificate); ``credentials`` is what the sender authenticated with
    (an HTTP bearer token), if anything.
    """

    object_type: str
    origin: str
    transport: str
    peer: Optional[str] = None
    credentials: Optional[str] = None
    #: The study an overlay or report is about (from the object itself), if any.
    study_uid: Optional[str] = None
    #: The address whose registered S/MIME certificate verified the package's signature, if any.
    signer: Optional[str] = None


@hookspec
def medd_register_object_types(register: Callable[[Any], None]) -> None:
    """Register object types with ``register(object_type)``.

    Each object type provides :class:`medd.plugins.interfaces.IObjectType`.
    """


@hookspec
def medd_register_transports(register: Callable[[Any], None]) -> None:
    """Register transports with ``register(transport)``.

    Each transport provides :class:`medd.plugins.interfaces.ITransport`; its
    ``name`` is the key under ``[listen]`` that configures its listener, and
    the config section of the same name is its own
    (:attr:`medd.plugins.api.TransportAPI.settings`).
    """


@hookspec
def medd_register_senders(register: Callable[[Any], None]) -> None:
    """Register push senders with ``register(sender)``.

    Each sender provides :class:`medd.plugins.interfaces.ISender` and handles
    the URL schemes it names (a push viewer's URL picks its sender).
    """


@hookspec
def medd_register_storage(register: Callable[[str, str, Callable[[Any], Any]], None]) -> None:
    """Register storage backends with ``register(kind, name, factory)``.

    ``kind`` is ``"blobstore"`` (:class:`~medd.plugins.interfaces.IBlobStore`,
    picked by ``[storage] backend``) or ``"archive"``
    (:class:`~medd.plugins.interfaces.IArchive`, picked by ``[archive]
    backend``); ``factory(config)`` returns an object providing it.
    """


@hookspec(firstresult=True)
def medd_check_sender(claim: SenderClaim) -> "Union[None, str, Deferred, Awaitable[Optional[str]]]":
    """Decision: may this sender send this package in this name?

    Return None (or a Deferred/coroutine of None) to accept, or the reason
    for refusing it as a string: the package is then refused as
    unauthenticated (HTTP 403, SMTP 554, TLS ``refused``) and nothing of it
    is stored. The first implementation that answers decides; a node with no
    implementation accepts every sender. Central implements it for the
    packages viewers send back (status, overlay, report).
    """


@hookspec(firstresult=True)
def medd_smime_certificate(address: str) -> "Union[None, bytes, Deferred, Awaitable[Optional[bytes]]]":
    """Decision: the S/MIME certificate (PEM) registered for the sender ``address``, or None.

    A package signed with S/MIME is verified against it before anything else; central answers from
    its directory (``medd centres add … --smime-cert FILE``).
    """


@hookspec
def medd_object_stored(stored: "ObjectRecord") -> "Union[None, Deferred, Awaitable[None]]":
    """Notification: an object was stored and indexed for the first time.

    May return a Deferred or coroutine; the ingest waits for it, but a
    failure is only logged, never un-acknowledges the object.
    """


@hookspec
def medd_register_config(
    register: "Callable[[str, Iterable[str], Optional[Callable[[SectionCheck], None]]], None]",
) -> None:
    """Declare the config keys this plugin reads with ``register(section, keys, check=None)``.

    A key no core section, role or plugin declares is refused at start as a
    likely typo, so a plugin declares every key it reads, in its own section
    (a transport's is ``[<transport name>]``) or beside the node's (a storage
    backend's keys in ``[storage]`` or ``[archive]``). ``check``, if given, is
    called once per validation (``medd check-config`` and twistd alike) with
    a :class:`medd.plugins.settings.SectionCheck` of that section, present or
    not, and reports each unusable value with ``check.problem(key, message)``.
    It must not raise, block or touch the network.
    """


@dataclass(frozen=True)
class AccessClaim:
    """Who asks to read or write over HTTP, with what.

    ``action`` is ``"query"`` (QIDO-RS), ``"retrieve"`` (WADO-RS), ``"store"``
    (STOW-RS), ``"package"`` (``POST /packages``), ``"send"`` (SMTP AUTH: ``peer``
    is the user name) or ``"associate"`` (DICOM TLS: ``peer`` is the verified
    client certificate's CN; an allowed decision names the centre the
    association is). ``credentials`` is an HTTP bearer token;
    ``certificate`` the SHA-256 (hex) of a TLS client certificate the peer
    presented and proved; ``cookies`` the request's cookies (a reading-room
    session); ``peer`` the client address. Writes are decided from the
    request's headers, before its body is read. ``origin``, ``host`` and
    ``fetch_site`` are the request's ``Origin``, ``Host`` and ``Sec-Fetch-Site``
    headers, for a policy that admits a browser's cookie only from its own
    pages (a CSRF defence).
    """

    action: str
    transport: str
    peer: Optional[str] = None
    credentials: Optional[str] = None
    cookies: Any = None
    certificate: Optional[str] = None
    origin: Optional[str] = None
    host: Optional[str] = None
    fetch_site: Optional[str] = None

    @property
    def presented(self) -> bool:
        """Whether the claimant presented any credential at all (else a refusal is 401)."""
        return bool(self.credentials or self.certificate or self.cookies)


@dataclass(frozen=True)
class AccessDecision:
    """The answer to an :class:`AccessClaim`: allowed or not, for whom, and why not.

    ``authenticated`` says the credential proved who the claimant is: a refusal of an
    authenticated claimant is 403, of anyone else 401. ``role`` is what the claimant is
    (``"admin"``, ``"reader"``, ``"centre"``, ``"viewer"``, ``"radiologist"``,
    ``"central"``) and ``address`` the package address it writes as, if any."""

    allowed: bool
    who: str = ""
    reason: str = ""
    authenticated: bool = False
    role: str = ""
    address: str = ""


@hookspec(firstresult=True)
def medd_check_access(claim: AccessClaim) -> "Union[None, AccessDecision, Deferred, Awaitable[AccessDecision]]":
    """Decision: may this claimant query, retrieve, store or post a package? Return an
    :class:`AccessDecision` (or a Deferred/coroutine of one), or None for no
    opinion. Nothing is served anonymously: with no implementation, or none
    that answers, the request is refused. Central and the viewer each
    implement it for their role.
    """


@hookspec
def medd_pixel_data_retrieved(uid: str, who: str, peer: Optional[str]) -> "Union[None, Deferred, Awaitable[None]]":
    """Notification: the pixel data of object ``uid`` was sent, over a query protocol (DICOMweb WADO-RS
    frames or the whole instance, not a thumbnail), to ``who`` (the :class:`AccessDecision`'s claimant)
    at ``peer`` (the client address).

    Called once per object and response, after the response was written. May return a Deferred or
    coroutine, which is awaited; a failure is only logged. The viewer implements it to record that a
    radiologist opened an image.
    """


@hookspec(firstresult=True)
def medd_accept_association(
    calling_ae: str, called_ae: str, peer: str,
) -> "Union[None, str, Deferred, Awaitable[Optional[str]]]":
    """Decision: may this DICOM peer open an association at all?

    Asked once per A-ASSOCIATE-RQ, before any C-STORE: ``calling_ae`` and
    ``called_ae`` as the request states them (stripped), ``peer`` the
    client's IP address. Return None (or a Deferred/coroutine of None) to go
    on negotiating, or the reason for refusing: the association is then
    rejected (A-ASSOCIATE-RJ, rejected-permanent, "calling AE title not
    recognised") and the reason logged. A node with no implementation
    accepts every peer. The gateway implements it with ``[gateway]
    accept_ae``.
    """
