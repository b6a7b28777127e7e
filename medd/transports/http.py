"""The HTTP and HTTPS transports (twisted.web): ``POST /packages`` and DICOMweb.

A package is posted as ``message/rfc822``; DICOMweb (STOW-RS, QIDO-RS,
WADO-RS) lives under ``/dicomweb`` in :mod:`medd.transports.dicomweb`. Every
error is an RFC 9457 problem document. A request body larger than the node's
object size limit, and a write (``POST /packages``, STOW-RS) that the node's
access policy refuses, are refused from the request's headers, before the
body is read.
"""
from __future__ import annotations

from io import BytesIO

from twisted.internet.defer import ensureDeferred
from twisted.internet.interfaces import ISSLTransport, ITCPTransport
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web import http
from twisted.web.server import Request, Site
from zope.interface import implementer

from medd.ingest import Refused, StoreFailed
from medd.plugins.hookspecs import hookimpl
from medd.plugins.interfaces import ITransport
from medd.transports.deadlines import Deadline, peer_host
from medd.transports.handshakes import HandshakeWatch
from medd.transports.dicomweb import DicomWebResource
from medd.transports.listener import EndpointListener
from medd.transports.tlscontexts import ServerFiles
from medd.webresource import (
    PROBLEM_JSON,
    RETRY_AFTER,
    Problem,
    ProblemResource,
    Response,
    access_claim,
    access_refusal,
    bearer_token,
    client_ip,
    json_response,
    media_type_of,
    problem_from_ingest,
    read_body,
    record_refusal,
    render_async,
    request_peer,
)

log = Logger()

PACKAGE_MEDIA_TYPE = "message/rfc822"
# After refusing an oversized body, medd keeps reading (and dropping) what the
# client already sent so that closing the socket does not reset the
# connection before the client has read the refusal; beyond this it aborts.
DRAIN_LIMIT = 16 * 1024 * 1024


# --- POST /packages ------------------------------------------------------------------------


class PackagesResource(ProblemResource):
    """``POST /packages``: one package per request, idempotent by Message-ID."""

    isLeaf = True

    def __init__(self, api):
        super().__init__()
        self.api = api

    def render_POST(self, request):
        return render_async(request, self._post)

    async def _post(self, request) -> Response:
        media_type, _ = media_type_of(request)
        if media_type != PACKAGE_MEDIA_TYPE:
            raise Problem(415, f"a package is posted as {PACKAGE_MEDIA_TYPE}, not {media_type or 'no media type'}",
                          headers={"Accept-Post": PACKAGE_MEDIA_TYPE})
        sender = admitted(request)
        data = await self.api.run_blocking(read_body, request.content)
        try:
            stored = await self.api.receive_package(data, peer=request_peer(request), credentials=bearer_token(request),
                                                    user=sender.who or None)
        except (Refused, StoreFailed) as e:
            raise problem_from_ingest(e) from e
        body = {
            "uid": stored.uid,
            "message_id": stored.message_id,
            "created": stored.created,
            "object_type": stored.object_type,
        }
        return json_response(201 if stored.created else 200, body)


class RootResource(ProblemResource):
    """``/``: the ingest resources, plus what the node mounted
    (``api.web_resources``, e.g. central's outbox and admin API)."""

    def __init__(self, api):
        super().__init__()
        self.api = api
        self.putChild(b"packages", PackagesResource(api))
        self.putChild(b"dicomweb", DicomWebResource(api))
        for name, resource in api.web_resources.items():
            self.putChild(name, resource)

    def render_GET(self, request):
        return json_response(200, {"node": "medd", "services": ["/packages", "/dicomweb"]}).body


# --- who may write, decided from the headers -------------------------------------------------

# The first path segment of a POST whose body becomes stored objects, and the access action it needs.
WRITE_ACTIONS = {b"packages": "package", b"dicomweb": "store"}


def write_action(method: bytes, path: bytes) -> str | None:
    """The access action of a request that writes objects (``POST /packages``, STOW-RS), else None."""
    if method != b"POST":
        return None
    first = path.split(b"?", 1)[0].lstrip(b"/").split(b"/", 1)[0]
    return WRITE_ACTIONS.get(first)


def admitted(request):
    """The :class:`~medd.plugins.hookspecs.AccessDecision` that let this write in from its headers.

    A write that reached its resource without one (a site other than :class:`MeddSite`) is refused."""
    decision = getattr(request, "medd_access", None)
    if decision is None or not decision.allowed:
        raise Problem(403, "this write was not admitted by the node's access policy", kind="forbidden")
    return decision


# --- the request-size guard and the site -----------------------------------------------------


class GuardedRequest(Request):
    """A request whose body may not exceed the node's object size limit.

    A declared ``Content-Length`` over the limit is refused from the headers,
    before any of the body is read; a chunked body is refused as soon as it
    crosses the limit. Either way the body is never buffered.
    """

    max_body_size: int = 0  # set by the site
    #: The access decision that admitted a write, from its headers (see :meth:`_admit`).
    medd_access = None
    _admission = None  # the Deferred decision while it is pending
    _process_waiting = False
    # Twisted would parse form bodies on the reactor thread; no medd resource
    # takes forms, so they are left alone.
    _parsePOSTFormSubmission = False
    _refused = False
    _received = 0
    _drained = 0

    def gotLength(self, length):
        if length is not None and self.max_body_size and length > self.max_body_size:
            self._refuse_oversized(f"a request body of {length} bytes exceeds the limit of {self.max_body_size} bytes")
            return
        super().gotLength(length)
        action = write_action(self.channel._command, self.channel._path)
        if action is not None:
            self._admit(action)

    def _admit(self, action: str) -> None:
        """Ask the node's access policy about a write before its body is read.

        The connection stops being read until the answer is in (what one read
        already brought is kept, within the size limit); a refusal is answered
        at once, a ``100 Continue`` is sent only to an admitted request.
        """
        api = self.channel.site.api
        continues = (self.requestHeaders.getRawHeaders(b"expect") or [b""])[0].lower() == b"100-continue"
        self.requestHeaders.removeHeader(b"expect")
        network = self.channel._networkProducer
        network.pauseProducing()
        claim = access_claim(self, action, api.transport)
        # The channel forgets the request line once the body is in: what is audited is kept now.
        what = f"{self.channel._command.decode('latin-1')} {self.channel._path.decode('latin-1', 'replace')}"
        self._admission = api.check_access(claim)

        def decided(decision):
            self._admission = None
            if self.channel is None or self._refused:
                return
            if not decision.allowed:
                problem = access_refusal(claim, decision)
                credential = "bearer token" if claim.credentials else "client certificate" if claim.certificate else None
                ensureDeferred(record_refusal(api, problem, what, credential, claim.peer))
                self._refuse(problem)
            else:
                self.medd_access = decision
                if not self.channel._handlingRequest and continues:
                    self.channel._send100Continue()
            if self._process_waiting:
                self._process_waiting = False
                self.process()
            elif not self.channel._handlingRequest:
                network.resumeProducing()

        def failed(failure):
            log.failure("the access check of a {action} from {peer} failed", failure, action=action, peer=claim.peer)
            return Problem(503, "medd cannot check credentials now; try again later", kind="store-failed",
                           headers={"Retry-After": str(RETRY_AFTER)})

        def refuse_unchecked(problem):
            self._admission = None
            if self.channel is None or self._refused:
                return
            self._refuse(problem)
            if self._process_waiting:
                self._process_waiting = False
                self.process()
            elif not self.channel._handlingRequest:
                network.resumeProducing()

        self._admission.addCallbacks(decided, lambda f: refuse_unchecked(failed(f)))

    def handleContentChunk(self, data):
        if self._refused:
            self._drained += len(data)
            if self._drained > DRAIN_LIMIT:
                self.channel.transport.abortConnection()
            return
        self._received += len(data)
        if self.max_body_size and self._received > self.max_body_size:
            self._refuse_oversized(f"the request body exceeds the limit of {self.max_body_size} bytes")
            return
        super().handleContentChunk(data)

    def _refuse_oversized(self, detail: str) -> None:
        self._refuse(Problem(413, detail, kind="too-large", title="Request too large"))

    def _refuse(self, problem: Problem) -> None:
        """Answer ``problem`` before the body is read, then drain what the client already sent and close."""
        self._refused = True
        if self.content is not None:
            self.content.close()
        self.content = BytesIO()
        peer = client_ip(self)
        log.warn("HTTP request from {peer} refused with {status}: {detail}", peer=peer, status=problem.status,
                 detail=problem.detail)
        # The request line is not handed to the Request until the body is in,
        # so the answer is written the way Twisted answers a bad request: raw.
        body = problem.body()
        reason = http.RESPONSES.get(problem.status, b"Error").decode("ascii")
        if problem.status == 413:
            reason = "Content Too Large"
        extra = "".join(f"{name}: {value}\r\n" for name, value in problem.headers.items())
        head = (
            f"HTTP/1.1 {problem.status} {reason}\r\n"
            f"Content-Type: {PROBLEM_JSON}\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"{extra}"
            "Connection: close\r\n\r\n"
        ).encode("ascii")
        # No "100 Continue" for a body that is refused.
        self.requestHeaders.removeHeader(b"expect")
        transport = self.channel.transport
        transport.write(head + body)
        if ITCPTransport.providedBy(transport):
            transport.loseWriteConnection()
        else:
            transport.loseConnection()

    def process(self):
        if self._admission is not None:
            # The body is in before the access policy answered: wait for it.
            self._process_waiting = True
            return
        if self._refused:
            # The refusal is already on its way; the drained body is done.
            self.channel.transport.loseConnection()
            return
        super().process()


class NoDelayChannel(HandshakeWatch, http.HTTPChannel):
    """An HTTP/1.1 channel with Nagle's algorithm off, so small responses are not delayed,
    and a deadline on each request.

    A request is due ``[limits] request_timeout`` after its first byte, plus
    the time its body's bytes take at ``min_transfer_rate``; Twisted's idle
    timer, which every byte resets, only closes connections that say nothing.
    """

    deadline: Deadline | None = None

    def connectionMade(self):
        api = self.site.api
        self.deadline = Deadline(api.reactor, api.limits, "http")
        super().connectionMade()
        if ISSLTransport.providedBy(self.transport):
            self.transport_label = "https"
            self.tls_began()  # the request deadline bounds the handshake too
        transport = self.transport
        # Under TLS the TCP transport is one wrapper down.
        for candidate in (transport, getattr(transport, "transport", None)):
            if candidate is not None and ITCPTransport.providedBy(candidate):
                candidate.setTcpNoDelay(True)
                break

    def dataReceived(self, data):
        if data and not self._handlingRequest and not self.deadline.running:
            self.deadline.start(self, "request")
        super().dataReceived(data)

    def rawDataReceived(self, data):
        if not self._handlingRequest:
            self.deadline.earn(len(data))  # the body, as it arrives
        super().rawDataReceived(data)

    def allContentReceived(self):
        self.deadline.stop()
        super().allContentReceived()

    def connectionLost(self, reason):
        if self.deadline is not None:
            self.deadline.stop()
        self.tls_lost(reason, self.site.api, peer_host(self.transport))
        super().connectionLost(reason)


class MeddSite(Site):
    protocol = NoDelayChannel
    #: True on an HTTPS listener that verifies client certificates against [tls] client_ca.
    identify_by_certificate = False

    def __init__(self, api):
        super().__init__(RootResource(api))
        self.api = api
        max_size = api.max_object_size

        class _Request(GuardedRequest):
            max_body_size = max_size

        self.requestFactory = _Request
        self.displayTracebacks = False

    def log(self, request):
        # Access logging goes through twisted.logger like everything else.
        log.debug(
            "{peer} {method} {uri} {code}", peer=client_ip(request), method=request.method.decode("latin-1"),
            uri=request.uri.decode("latin-1", "replace"), code=request.code,
        )


@implementer(ITransport)
class HttpTransport:
    name = "http"
    description = "HTTP receiver: POST /packages and DICOMweb STOW-RS, QIDO-RS, WADO-RS (twisted.web)"

    def listener(self, endpoint: str, api):
        return EndpointListener(api.reactor, endpoint, MeddSite(api), "http", api.limits)


#: ``[https] client_certificates``: what the HTTPS listener asks of a client when ``[tls] client_ca`` is set.
CLIENT_CERTIFICATE_MODES = ("optional", "required")


@implementer(ITransport)
class HttpsTransport:
    """The same site over TLS (``[listen] https``), from the node's ``[tls]`` files, TLS 1.2+ with
    the BCP 195 suites. With ``[tls] client_ca`` a client certificate is verified when presented
    (``[https] client_certificates = optional``, the default: bearer tokens still work) or
    required (``= required``); a verified certificate's CN names the peer (the outbox, a package's
    sender). An ``ssl:`` endpoint string is used as it is, and names peers by address only."""

    name = "https"
    description = "HTTPS receiver: the HTTP transport's site over TLS, client certificates optional or required"

    def listener(self, endpoint: str, api):
        site = MeddSite(api)
        if endpoint.startswith("ssl:"):
            return EndpointListener(api.reactor, endpoint, site, "https", api.limits)
        files = ServerFiles.read(api.tls, f"https listener on {endpoint!r}")
        required = (api.settings.get("client_certificates") or "optional").strip() == "required"
        # Only a certificate this node verified against [tls] client_ca may name a peer.
        site.identify_by_certificate = files.client_ca is not None
        tls = TLSMemoryBIOFactory(files.options(require_client_certificate=required), False, site)
        return EndpointListener(api.reactor, endpoint, tls, "https", api.limits)


def check_https_section(section) -> None:
    mode = section.get("client_certificates")
    if mode is not None and mode not in CLIENT_CERTIFICATE_MODES:
        section.problem("client_certificates", f"must be one of {', '.join(CLIENT_CERTIFICATE_MODES)}, not {mode!r}")


@hookimpl
def medd_register_transports(register) -> None:
    register(HttpTransport())
    register(HttpsTransport())


@hookimpl
def medd_register_config(register) -> None:
    # [https] client_certificates: optional (default) or required, when [tls] client_ca is set.
    register("https", ["client_certificates"], check_https_section)
