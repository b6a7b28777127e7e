"""The HTTP plumbing every node's web resources share, whatever the role:
RFC 9457 problem documents, responses of async handlers, bearer tokens and
request bodies. The HTTP transport, central's API and the viewer's reading
room all answer through it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from medd.ingest import Refused, StoreFailed

log = Logger()

PROBLEM_JSON = "application/problem+json"
# Seconds a sender is asked to wait after medd could not make an object durable.
RETRY_AFTER = 30


# --- problem documents ---------------------------------------------------------------------


class Problem(Exception):
    """An HTTP error answered with an RFC 9457 problem document."""

    def __init__(self, status: int, detail: str, *, kind: str | None = None, title: str | None = None,
                 headers: dict[str, str] | None = None, who: str | None = None, audited: bool = False):
        super().__init__(detail)
        # A 401/403 is a refused authentication: recorded in the node's audit trail (with ``who``, if the
        # credential named someone) unless it already is (``audited``: the ingest records its own).
        self.who = who
        self.audited = audited
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
            return Problem(403, error.reason, kind="unauthenticated", title="Sender not authenticated",
                           audited=error.audited)
        if error.kind == "conflict":
            return Problem(409, error.reason, kind="conflict", title="Identifier already held")
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


@dataclass(frozen=True)
class PeerCertificate:
    """A client certificate the HTTPS listener verified against ``[tls] client_ca``."""

    common_name: str  # the subject's CN, lower case: a viewer's or a centre's address
    sha256: str  # hex fingerprint of the DER certificate


def peer_certificate(request) -> PeerCertificate | None:
    """The verified client certificate of ``request``, on an HTTPS listener that verifies them;
    None otherwise (plain HTTP, no certificate, or an ``ssl:`` endpoint medd did not configure)."""
    site = getattr(request.channel, "site", None)
    if not getattr(site, "identify_by_certificate", False):
        return None
    get = getattr(request.channel.transport, "getPeerCertificate", None)
    cert = get() if get is not None else None
    if cert is None:
        return None
    return certificate_identity(cert.to_cryptography())


def certificate_identity(x509) -> PeerCertificate | None:
    """The CN and fingerprint of a verified client certificate (a ``cryptography`` certificate);
    None if its subject has no CN."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    names = x509.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        return None
    return PeerCertificate(str(names[0].value).strip().lower(), x509.fingerprint(hashes.SHA256()).hex())


def request_peer(request) -> str:
    """Who a request comes from: a verified client certificate's CN, else the client's IP address."""
    certified = peer_certificate(request)
    return certified.common_name if certified is not None else client_ip(request)


def bearer_token(request) -> str | None:
    """The token of an ``Authorization: Bearer`` header, if there is one."""
    scheme, _, token = (request.getHeader("authorization") or "").strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def require_bearer(request) -> str:
    """The bearer token of ``request``; a 401 problem when there is none."""
    token = bearer_token(request)
    if token is None:
        raise unauthorised("this resource needs Authorization: Bearer <token>")
    return token


def unauthorised(detail: str, *, invalid_token: bool = False) -> Problem:
    """401: no credential, or one that proves no one (RFC 6750 section 3)."""
    challenge = 'Bearer realm="medd"' + (', error="invalid_token"' if invalid_token else "")
    return Problem(401, detail, kind="unauthorised", title="Unauthorized", headers={"WWW-Authenticate": challenge})


def access_refusal(claim, decision) -> Problem:
    """The problem an access refusal is answered with: 403 for an authenticated claimant, else 401."""
    if decision.authenticated:
        return Problem(403, f"{claim.action} refused: {decision.reason}", kind="forbidden", who=decision.who or None)
    return unauthorised(f"{claim.action} needs credentials: {decision.reason}", invalid_token=claim.presented)


def client_certificate_sha256(request) -> str | None:
    """SHA-256 (hex) of the TLS client certificate the peer presented on this request's connection, if any.

    The handshake proved the peer holds its key; whose it is, the node's directory decides.
    """
    from twisted.internet.interfaces import ISSLTransport

    transport = getattr(getattr(request, "channel", None), "transport", None)
    if transport is None or not ISSLTransport.providedBy(transport):
        return None
    try:
        cert = transport.getPeerCertificate()
    except Exception:
        return None
    if cert is None:
        return None
    from cryptography.hazmat.primitives import hashes

    return cert.to_cryptography().fingerprint(hashes.SHA256()).hex()


def access_claim(request, action: str, transport: str):
    """The :class:`~medd.plugins.hookspecs.AccessClaim` of a request: its bearer token,
    client certificate, cookies and the headers that tell where a browser's request came from
    (available once its headers are in)."""
    from medd.plugins.hookspecs import AccessClaim

    cookies = {k.decode("latin-1"): v.decode("latin-1") for k, v in request.received_cookies.items()}
    return AccessClaim(action=action, transport=transport, peer=client_ip(request), credentials=bearer_token(request),
                       cookies=cookies, certificate=client_certificate_sha256(request),
                       origin=request.getHeader("origin"), host=request.getHeader("host"),
                       fetch_site=request.getHeader("sec-fetch-site"))


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
            await audit_refusal(request, problem)
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


async def audit_refusal(request, problem: Problem) -> None:
    """Record a 401/403 in the audit trail of the node whose HTTP listener took the request
    (its site carries the listener's :class:`~medd.plugins.api.TransportAPI`)."""
    api = getattr(getattr(request, "site", None), "api", None)
    credential = "bearer token" if bearer_token(request) else "session" if request.received_cookies else None
    await record_refusal(api, problem, f"{request.method.decode('latin-1')} {request.path.decode('latin-1', 'replace')}",
                         credential, client_ip(request))


async def record_refusal(api, problem: Problem, what: str, credential: str | None, peer: str | None) -> None:
    """Record ``problem``, a 401/403 answered to ``what`` (method and path), once, through ``api``."""
    if problem.status not in (401, 403) or problem.audited or api is None:
        return
    problem.audited = True
    try:
        await api.audit("auth-refused", outcome=4, user=problem.who, credential=credential, peer=peer,
                        detail=f"{what}: {problem.status} {problem.detail}")
    except Exception:
        log.failure("cannot record a refusal in the audit trail")


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


def read_body(content) -> bytes:
    """Blocking: the whole received body (it may be spooled to a temporary file)."""
    content.seek(0)
    return content.read()
