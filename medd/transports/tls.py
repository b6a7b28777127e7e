"""The TLS socket transport: length-framed packages over TLS, each answered.

Wire format, in both directions, inside a TLS connection::

    frame  = length payload
    length = 4 bytes, unsigned, big-endian: the number of payload bytes
    payload

The client sends one package (the MIME bytes of :mod:`medd.package`) per
frame and may pipeline several frames without waiting (the server stores
frames that arrived together as one batch). The server answers every package
frame with exactly one reply frame, in the order the frames arrived; a reply
payload is a UTF-8 JSON object:

- ``{"status": "ok", "message_id": ..., "uid": ..., "object_type": ..., "created": true|false}``
  — sent only once the object is fsync'd and indexed (``created`` is false when
  it was already stored: resending is safe).
- ``{"status": "refused", "kind": "invalid"|"too-large"|"unauthenticated"|"conflict",
  "reason": ...}`` — the package is bad (``conflict``: its Message-ID or UID is
  already held for another origin, or with other content); resending it
  unchanged will not help. The connection stays
  usable, except after a frame longer than the node's ``max_object_size``:
  that one is refused as ``too-large`` without being read, and the server then
  closes the connection.
- ``{"status": "retry", "reason": ...}`` — medd could not make the object
  durable (disk, database); send it again later.

With ``[tls] client_ca`` configured the server requires a client certificate
signed by one of those CAs (mutual TLS) and names the peer by the
certificate's subject common name; otherwise by its IP address.
"""
from __future__ import annotations

import json

from cryptography.x509.oid import NameOID
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.internet.interfaces import ISSLTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from medd.ingest import Refused, StoreFailed
from medd.plugins.hookspecs import AccessClaim, hookimpl
from medd.plugins.interfaces import ITransport
from medd.transports.deadlines import Deadline, peer_host
from medd.transports.handshakes import HandshakeWatch
from medd.transports.listener import EndpointListener
from medd.transports.tlscontexts import ServerFiles, client_tls_options
from medd.webresource import certificate_identity

# Reply frames are small JSON objects; a client refuses anything bigger.
MAX_REPLY_SIZE = 64 * 1024
#: A connection stops reading while the frames it holds (waiting, or being stored) reach either.
BATCH_BYTES = 32 * 1024 * 1024
BATCH_FRAMES = 64

def _encode(reply: dict) -> bytes:
    return json.dumps(reply, separators=(",", ":")).encode("utf-8")


def _set_nodelay(transport) -> None:
    # Without TCP_NODELAY each small reply waits for the peer's delayed ACK
    # (~40 ms), which caps a pipelined sender at a couple of dozen packages/s.
    set_nodelay = getattr(transport, "setTcpNoDelay", None)
    if set_nodelay is not None:
        set_nodelay(True)


class PackageFrameReceiver(HandshakeWatch, Int32StringReceiver, TimeoutMixin):
    """Server side of one connection: package frames in, one reply frame each.

    Frames are stored in batches: the frames that arrived while the previous
    batch was being stored go to the ingest together (one hop per stage, one
    commit; :meth:`medd.ingest.Ingest.receive_packages`), and each is answered
    in arrival order as soon as it is durable. The connection stops reading
    while frames waiting and being stored hold :data:`BATCH_BYTES` or
    :data:`BATCH_FRAMES` (one frame of any size is always taken), which lets
    TCP push back on a fast sender.
    """

    log = Logger()

    # A connection that neither sends nor waits on a reply for this long is closed.
    idle_timeout = 300

    def __init__(self, api, *, identify_by_certificate: bool = False):
        self.api = api
        self.MAX_LENGTH = api.max_object_size
        self.identify_by_certificate = identify_by_certificate
        self._peer: str | None = None
        self._sender: str | None = None
        self._closing = False
        self._connected = False
        # Inside dataReceived, and a batch's end asked for reading to resume there.
        self._receiving = False
        self._resume_pending = False
        self._arrived = bytearray()
        # Frames received and not yet handed to the ingest; the batch being stored, if any.
        self._frames: list[bytes] = []
        self._held = 0  # bytes of the frames waiting and being stored
        self._busy = False
        self._too_large: str | None = None  # the refusal of a too-large frame, sent after the replies before it
        # A frame is due [limits] request_timeout after its first byte, plus its length at the minimum rate;
        # the idle timer above only closes connections that send nothing.
        self.deadline = Deadline(api.reactor, api.limits, "tls")

    def callLater(self, period, func):
        return self.api.reactor.callLater(period, func)

    def connectionMade(self) -> None:
        self._connected = True
        _set_nodelay(self.transport)
        self.setTimeout(self.idle_timeout)
        if ISSLTransport.providedBy(self.transport):
            self.tls_began()  # the frame deadline bounds the handshake too

    def connectionLost(self, reason) -> None:
        self._connected = False
        self.setTimeout(None)
        self.deadline.stop()
        self.tls_lost(reason, self.api, peer_host(self.transport))

    def timeoutConnection(self) -> None:
        self.log.info("tls connection from {peer} idle for {seconds} s; closing", peer=self.peer, seconds=self.idle_timeout)
        if self._closing:
            # Still waiting for the peer's close_notify after a refusal: stop waiting.
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    @property
    def peer(self) -> str:
        """The client certificate's subject CN under mutual TLS, else the peer's address."""
        if self._peer is None:
            self._peer = self._identify()
        return self._peer

    def _identify(self) -> str:
        if self.identify_by_certificate:
            cert = self.transport.getPeerCertificate()
            if cert is not None:
                subject = cert.to_cryptography().subject
                names = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
                return str(names[0].value) if names else subject.rfc4514_string()
        address = self.transport.getPeer()
        return str(getattr(address, "host", address))

    async def _sender_name(self) -> str | None:
        """The name of the centre or viewer whose registered client certificate this connection
        presented (asked of the node's access policy once per connection), for the audit trail."""
        if self._sender is None:
            self._sender = ""
            cert = self.transport.getPeerCertificate() if self.identify_by_certificate else None
            identity = certificate_identity(cert.to_cryptography()) if cert is not None else None
            if identity is not None:
                decision = await self.api.check_access(
                    AccessClaim(action="package", transport="tls", peer=identity.common_name, certificate=identity.sha256))
                self._sender = decision.who if decision.allowed else ""
        return self._sender or None

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return  # after a too-large frame nothing more is read
        self.resetTimeout()
        self._arrived += data
        if self._receiving:
            # Re-entered while frames are being taken off the buffer (the
            # receiver trims its buffer only when its loop ends), or while a
            # batch is handed over: the loop below takes these bytes next.
            return
        self._receiving = True
        try:
            while not self._closing:
                if (self._arrived or self._resume_pending) and not self.paused:
                    # Frames answered at once (a refusal before any work) end their
                    # batch here, and what follows is taken by this loop, not by recursion.
                    self._resume_pending = False
                    more, self._arrived = bytes(self._arrived), bytearray()
                    self._take(more)
                elif self._frames and not self._busy:
                    self._store_batch()
                else:
                    break
        finally:
            self._receiving = False

    def _take(self, data: bytes) -> None:
        if not self.deadline.running and (data or self._unprocessed) and not self.paused:
            self.deadline.start(self, "frame")
        # The frame's bytes earn time as they arrive, not as declared: a
        # header claiming max_object_size does not buy hours.
        self.deadline.earn(len(data))
        super().dataReceived(data)

    def stringReceived(self, frame: bytes) -> None:
        self.deadline.stop()
        self._frames.append(frame)
        self._held += len(frame)
        if self._held >= BATCH_BYTES or len(self._frames) >= BATCH_FRAMES:
            self.pauseProducing()

    def _store_batch(self) -> None:
        frames, self._frames = self._frames, []
        self._busy = True
        self.setTimeout(None)
        d = ensureDeferred(self._answer_all(frames))
        d.addErrback(lambda f: self.log.failure("tls reply to {peer} failed", f, peer=self.peer))
        d.addBoth(self._stored)

    async def _answer_all(self, frames: list[bytes]) -> None:
        outcomes = self.api.receive_packages(frames, transport="tls", peer=self.peer, user=await self._sender_name())
        for frame, outcome in zip(frames, outcomes):
            reply = await self._answer(outcome, len(frame))
            self._held -= len(frame)
            if self._connected:
                self.sendString(_encode(reply))

    def _stored(self, _) -> None:
        self._busy = False
        if not self._connected:
            return
        if self._closing:  # after a too-large frame: answer the frames before it, then refuse it
            if self._frames:
                self._store_batch()
            else:
                self._refuse_too_large()
            return
        if not self._frames:
            self.setTimeout(self.idle_timeout)
        if self.paused and self._held < BATCH_BYTES and len(self._frames) < BATCH_FRAMES:
            self.paused = False
            self.transport.resumeProducing()
        self._resume_pending = True
        if not self._receiving:
            self.dataReceived(b"")  # the next batch, and frames the receiver held while paused

    async def _answer(self, outcome: Deferred, size: int) -> dict:
        try:
            stored = await outcome
        except Refused as e:
            self._log_refusal(e.reason, e.kind, size)
            return {"status": "refused", "kind": e.kind, "reason": e.reason}
        except StoreFailed as e:
            self.log.error("tls package from {peer} not stored: {reason}", peer=self.peer, reason=str(e))
            return {"status": "retry", "reason": str(e)}
        except Exception as e:
            self.log.failure("tls package from {peer} failed", peer=self.peer)
            return {"status": "retry", "reason": f"internal error: {type(e).__name__}"}
        return {
            "status": "ok",
            "message_id": stored.message_id,
            "uid": stored.uid,
            "object_type": stored.object_type,
            "created": stored.created,
        }

    def lengthLimitExceeded(self, length: int) -> None:
        reason = f"too large: a frame of {length} bytes exceeds the limit of {self.MAX_LENGTH} bytes"
        self._log_refusal(reason, "too-large", length)
        self._closing = True
        self._too_large = reason
        self.deadline.stop()  # the idle timer bounds the wait for the peer's close
        if self._busy:
            return  # answered after the frames before it (_stored)
        if self._frames:
            self._store_batch()
        else:
            self._refuse_too_large()

    def _refuse_too_large(self) -> None:
        self.setTimeout(self.idle_timeout)  # bounds the wait for the peer's close
        self.sendString(_encode({"status": "refused", "kind": "too-large", "reason": self._too_large}))
        # The rest of the frame is still on its way; it is read and dropped
        # (dataReceived) until the peer answers the TLS close, so that the
        # refusal is not lost to a TCP reset.
        self.transport.loseConnection()

    def _log_refusal(self, reason: str, kind: str, size: int) -> None:
        self.log.warn(
            "tls package from {peer} refused ({kind}): {reason}",
            peer=self.peer, kind=kind, reason=reason, size=size,
        )


class PackageFrameFactory(Factory):
    def __init__(self, api, *, identify_by_certificate: bool = False):
        self.api = api
        self.identify_by_certificate = identify_by_certificate

    def buildProtocol(self, addr):
        protocol = PackageFrameReceiver(self.api, identify_by_certificate=self.identify_by_certificate)
        protocol.factory = self
        return protocol


def tls_listener(endpoint: str, api) -> EndpointListener:
    """The listening service: an ``ssl:`` endpoint as configured, any other
    endpoint wrapped in TLS from ``[tls] certificate`` / ``private_key`` (and
    ``client_ca``: mutual TLS), to the BCP 195 policy of :mod:`medd.transports.tlscontexts`."""
    if endpoint.startswith("ssl:"):
        return EndpointListener(api.reactor, endpoint, PackageFrameFactory(api), "tls", api.limits)
    files = ServerFiles.read(api.tls, f"tls listener on {endpoint!r}")
    frames = PackageFrameFactory(api, identify_by_certificate=files.client_ca is not None)
    return EndpointListener(api.reactor, endpoint, TLSMemoryBIOFactory(files.options(), False, frames), "tls", api.limits)


# -- the client ------------------------------------------------------------------------------


class TransferIncomplete(Exception):
    """The connection ended before every package was answered.

    ``replies`` holds the replies received, in order; packages after them
    are in an unknown state and must be sent again.
    """

    def __init__(self, replies: list[dict], reason: str):
        super().__init__(f"{len(replies)} replies received before the connection ended: {reason}")
        self.replies = replies
        self.reason = reason


class PackageFrameSender(Int32StringReceiver):
    """Client side: pipelines package frames and collects one reply per frame."""

    MAX_LENGTH = MAX_REPLY_SIZE

    def __init__(self, packages: list[bytes]):
        self.packages = packages
        self.replies: list[dict] = []
        self.answered: Deferred = Deferred()
        self.closed: Deferred = Deferred()
        self._problem: str | None = None

    def connectionMade(self) -> None:
        _set_nodelay(self.transport)
        if not self.packages:
            self._finish()
            return
        for package in self.packages:
            self.sendString(package)

    def stringReceived(self, frame: bytes) -> None:
        try:
            reply = json.loads(frame)
            if not isinstance(reply, dict) or "status" not in reply:
                raise ValueError("not a reply object")
        except ValueError as e:
            self._problem = f"unreadable reply frame: {e}"
            self.transport.abortConnection()
            return
        self.replies.append(reply)
        if len(self.replies) == len(self.packages):
            self._finish()

    def lengthLimitExceeded(self, length: int) -> None:
        self._problem = f"a reply frame of {length} bytes is not a reply"
        self.transport.abortConnection()

    def _finish(self) -> None:
        self.answered.callback(self.replies)
        self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        if not self.answered.called:
            self.answered.errback(TransferIncomplete(self.replies, self._problem or reason.getErrorMessage()))
        self.closed.callback(None)


async def send_packages(
    reactor,
    host: str,
    port: int,
    packages: list[bytes],
    *,
    ca_pem: bytes | str | None = None,
    client_cert: bytes | str | None = None,
    server_name: str | None = None,
) -> list[dict]:
    """Send ``packages`` over one TLS connection; the reply to each, in order.

    The server is verified against ``ca_pem`` (or the platform's trust store)
    under ``server_name`` (default ``host``; an IP address is checked against
    the certificate's IP SANs). Raises :class:`TransferIncomplete` if the
    connection ends before every package is answered.
    """
    options = client_tls_options(server_name or host, ca_pem=ca_pem, client_cert=client_cert)
    endpoint = wrapClientTLS(options, HostnameEndpoint(reactor, host, port))
    sender = PackageFrameSender(list(packages))
    await connectProtocol(endpoint, sender)
    try:
        return await sender.answered
    finally:
        await sender.closed


# -- the plugin ------------------------------------------------------------------------------


@implementer(ITransport)
class TlsTransport:
    name = "tls"
    description = "length-framed packages over TLS, each acknowledged or refused with a reason"

    def listener(self, endpoint: str, api):
        return tls_listener(endpoint, api)


@hookimpl
def medd_register_transports(register) -> None:
    register(TlsTransport())

