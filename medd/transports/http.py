"""The HTTP transport (twisted.web): ``POST /packages`` and DICOMweb.

A package is posted as ``message/rfc822``; DICOMweb (STOW-RS, QIDO-RS,
WADO-RS) lives under ``/dicomweb`` in :mod:`medd.transports.dicomweb`. Every
error is an RFC 9457 problem document, and a request body larger than the
node's object size limit is refused from its headers, before it is read.
"""
from __future__ import annotations

import json
from io import BytesIO
from dataclasses import dataclass, field

from twisted.internet.defer import ensureDeferred
from twisted.internet.interfaces import ITCPTransport
from twisted.logger import Logger
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from medd.central.ingest import Refused, StoreFailed
from medd.plugins.hookspecs import hookimpl
from medd.plugins.interfaces import ITransport
from medd.transports.listener import EndpointListener

log = Logger()

PROBLEM_JSON = "application/problem+json"
PACKAGE_MEDIA_TYPE = "message/rfc822"
# Seconds a sender is asked to wait after medd could not make an object durable.
RETRY_AFTER = 30
# After refusing an oversized body, medd keeps reading (and dropping) what the
# client already sent so that closing the socket does not reset the
# connection before the client has read the refusal; beyond this it aborts.
DRAIN_LIMIT = 16 * 1024 * 1024


# --- problem documents ---------------------------------------------------------------------


class Problem(Exception):
    """An HTTP error answered with an RFC 9457 problem document."""

    def __init__(self, status: int, detail: str, *, kind: str | None = None, title: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        # Problems specific to medd have their own type; plain HTTP errors are about:blank.
        self.type = f"urn:medd:problem:{kind}" if kind else "about:blank"
        self.title = title or http.RESPONSES.get(status, b"Error").decode("ascii")
        self.headers = headers or {}

    def document(self, instance: str | None = None) -> dict:
        doc = {"type": self.type, "title": self.title, "status": self.status, "detail": self.detail}
        if instance:
            doc["instance"] = instance
        return doc

    def body(self, instance: str | None = None) -> bytes:
        return json.dumps(self.document(instance)).encode("utf-8")


def problem_from_ingest(error: Exception) -> Problem:
    """The problem a refusal or failure of the ingest path is reported as."""
    if isinstance(error, Refused):
        if error.kind == "too-large":
            return Problem(413, error.reason, kind="too-large", title="Object too large")
        if error.kind == "unauthenticated":
            return Problem(403, error.reason, kind="unauthenticated", title="Sender not authenticated")
        return Problem(400, error.reason, kind="invalid", title="Invalid object")
    if isinstance(error, StoreFailed):
        return Problem(503, str(error), kind="store-failed", title="Not stored, try again later",
                       headers={"Retry-After": str(RETRY_AFTER)})
    raise TypeError(f"not an ingest error: {error!r}")


@dataclass
class Response:
    """What a handler answers: status, media type, body and extra headers."""

    status: int
    media_type: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def json_response(status: int, value, media_type: str = "application/json", **headers: str) -> Response:
    return Response(status, media_type, json.dumps(value).encode("utf-8"), dict(headers))


def client_ip(request) -> str:
    address = request.getClientAddress()
    return getattr(address, "host", None) or str(address)


def bearer_token(request) -> str | None:
    """The token of an ``Authorization: Bearer`` header, if there is one."""
    scheme, _, token = (request.getHeader("authorization") or "").strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def media_type_of(request) -> tuple[str, dict[str, str]]:
    """The request's media type (lower case) and its parameters."""
    from multipart import parse_options_header

    value = (request.getHeader("content-type") or "").strip()
    if not value:
        return "", {}
    media_type, params = parse_options_header(value)
    return media_type.lower(), {k.lower(): v for k, v in params.items()}


def write_problem(request, problem: Problem) -> None:
    request.setResponseCode(problem.status)
    request.setHeader("Content-Type", PROBLEM_JSON)
    for name, value in problem.headers.items():
        request.setHeader(name, value)
    request.write(problem.body(request.uri.decode("latin-1", "replace")))
    request.finish()


def write_response(request, response: Response) -> None:
    request.setResponseCode(response.status)
    request.setHeader("Content-Type", response.media_type)
    for name, value in response.headers.items():
        request.setHeader(name, value)
    request.setHeader("Content-Length", str(len(response.body)))
    if request.method != b"HEAD":
        request.write(response.body)
    request.finish()


def render_async(request, handler) -> object:
    """Run ``await handler(request)`` and answer with its :class:`Response`.

    A :class:`Problem` becomes a problem document; anything else unexpected
    is logged and answered 500. Nothing is written to a client that went away.
    """
    gone = []
    request.notifyFinish().addErrback(lambda _: gone.append(True))

    async def run():
        try:
            response = await handler(request)
        except Problem as problem:
            log_refusal(request, problem)
            if not gone:
                write_problem(request, problem)
            return
        except Exception:
            log.failure("{method} {uri} failed", method=request.method.decode("latin-1"),
                        uri=request.uri.decode("latin-1", "replace"))
            if not gone:
                write_problem(request, Problem(500, "internal error; see the node's log"))
            return
        if response is not None and not gone:
            write_response(request, response)

    ensureDeferred(run())
    return NOT_DONE_YET


def log_refusal(request, problem: Problem) -> None:
    level = log.error if problem.status >= 500 else log.warn
    level(
        "{method} {uri} from {peer} refused with {status}: {detail}",
        method=request.method.decode("latin-1"), uri=request.uri.decode("latin-1", "replace"),
        peer=client_ip(request), status=problem.status, detail=problem.detail,
    )


class ProblemResource(Resource):
    """A resource whose errors (404, 405) are problem documents, not HTML."""

    def getChild(self, path, request):
        return NotFound()

    def render(self, request):
        handler = getattr(self, "render_" + request.method.decode("ascii", "replace"), None)
        if handler is None:
            allowed = sorted(name[len("render_"):] for name in dir(self) if name.startswith("render_"))
            problem = Problem(405, f"{request.method.decode('latin-1')} is not allowed here",
                              headers={"Allow": ", ".join(allowed)})
            log_refusal(request, problem)
            write_problem(request, problem)
            return NOT_DONE_YET
        return handler(request)


class NotFound(Resource):
    isLeaf = True

    def render(self, request):
        problem = Problem(404, f"no resource at {request.path.decode('latin-1', 'replace')}")
        log_refusal(request, problem)
        write_problem(request, problem)
        return NOT_DONE_YET


# --- POST /packages ------------------------------------------------------------------------


def read_body(content) -> bytes:
    """Blocking: the whole received body (it may be spooled to a temporary file)."""
    content.seek(0)
    return content.read()


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
        data = await self.api.run_blocking(read_body, request.content)
        try:
            stored = await self.api.receive_package(data, transport="http", peer=client_ip(request),
                                                    credentials=bearer_token(request))
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
    """``/``: the ingest resources, plus whatever the node registered in
    ``api.web_resources`` (``{b"name": Resource}``, e.g. central's outbox and
    admin API), looked up per request so late registrations are served too."""

    def __init__(self, api):
        super().__init__()
        from medd.transports.dicomweb import DicomWebResource

        self.api = api
        self.putChild(b"packages", PackagesResource(api))
        self.putChild(b"dicomweb", DicomWebResource(api))

    def getChild(self, path, request):
        registered = getattr(self.api, "web_resources", None) or {}
        resource = registered.get(path)
        return resource if resource is not None else super().getChild(path, request)

    def render_GET(self, request):
        return json_response(200, {"node": "medd", "services": ["/packages", "/dicomweb"]}).body


# --- the request-size guard and the site -----------------------------------------------------


class GuardedRequest(Request):
    """A request whose body may not exceed the node's object size limit.

    A declared ``Content-Length`` over the limit is refused from the headers,
    before any of the body is read; a chunked body is refused as soon as it
    crosses the limit. Either way the body is never buffered.
    """

    max_body_size: int = 0  # set by the site
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
        self._refused = True
        if self.content is not None:
            self.content.close()
        self.content = BytesIO()
        peer = client_ip(self)
        log.warn("HTTP request from {peer} refused with 413: {detail}", peer=peer, detail=detail)
        # The request line is not handed to the Request until the body is in,
        # so the answer is written the way Twisted answers a bad request: raw.
        problem = Problem(413, detail, kind="too-large", title="Request too large")
        body = problem.body()
        head = (
            "HTTP/1.1 413 Content Too Large\r\n"
            f"Content-Type: {PROBLEM_JSON}\r\n"
            f"Content-Length: {len(body)}\r\n"
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
        if self._refused:
            # The refusal is already on its way; the drained body is done.
            self.channel.transport.loseConnection()
            return
        super().process()


class NoDelayChannel(http.HTTPChannel):
    """An HTTP/1.1 channel with Nagle's algorithm off, so small responses are not delayed."""

    def connectionMade(self):
        super().connectionMade()
        transport = self.transport
        # Under TLS the TCP transport is one wrapper down.
        for candidate in (transport, getattr(transport, "transport", None)):
            if candidate is not None and ITCPTransport.providedBy(candidate):
                candidate.setTcpNoDelay(True)
                break


class MeddSite(Site):
    protocol = NoDelayChannel

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
        return EndpointListener(api.reactor, endpoint, MeddSite(api), "http")


@hookimpl
def medd_register_transports(register) -> None:
    register(HttpTransport())
