"""Pulling from central's outbox, for any node that central keeps packages for.

A viewer and a gateway both fetch what central holds for them the same way:
``GET /outbox`` lists it, ``GET /outbox/{id}`` is the package
(``message/rfc822``), ``POST /outbox/{id}/ack`` says it is durable here.
:class:`CentralClient` speaks that HTTP (and ``POST /packages``) with the
node's bearer token; :class:`Requestor` polls with it on the injected clock,
hands each package to the node's own ingest, and acknowledges it only once
the ingest has made it durable. A crash between storing and acknowledging
means central offers the package again; the ingest is idempotent by
Message-ID and UID, so it is not stored twice. While central is unreachable
the requestor backs off exponentially and then resumes.

Failures come back as two kinds: :class:`CentralUnavailable` (worth retrying
later: central down, 5xx, a token central does not know yet) and
:class:`CentralRefused` (central answered that this package is bad; sending
it again will not help).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import urlsplit

import treq
from treq.client import HTTPClient
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool

from medd.ingest import Refused
from medd.scheduling import Backoff, CoalescingPass, PassService
from medd.transports.tlscontexts import HttpsPolicy


@dataclass(frozen=True)
class PullSettings:
    """Where central is and how this node reaches it."""

    url: str  # base URL, no trailing slash: https://central.example:8443
    token: str | None  # this node's bearer token on central (None: it authenticates by client_cert)
    poll_interval: float
    # Between attempts while central is unreachable: base seconds, doubling up to max_delay.
    backoff: Backoff = Backoff(base=1.0, max_delay=300.0)
    timeout: float = 60.0
    # PEM of the CA that signed central's HTTPS certificate (None: the platform's trust store).
    ca: str | None = None
    # PEM of this node's client certificate and key, presented to central over HTTPS.
    client_cert: str | None = None

def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP address (127.0.0.0/8, ::1)."""
    import ipaddress

    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def clear_http_problem(url: str, allow_http: bool) -> str | None:
    """Why ``url`` may not be used to reach central, or None.

    Over plain ``http://`` the node's bearer token and patients' images cross
    the network in clear text; that is refused unless central is on this
    host (loopback) or the site says ``allow_http = yes`` (a link already
    protected by a VPN or TLS-terminating proxy).
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or allow_http or is_loopback(parts.hostname or ""):
        return None
    return (f"{url} is clear-text HTTP to another host: tokens and images would cross the network "
            "unencrypted; use https:// (with ca), or set allow_http = yes if the link is protected otherwise")


PACKAGE_MEDIA_TYPE = "message/rfc822"
# Statuses that say the package itself is unacceptable.
REFUSED_STATUSES = (400, 413, 415, 422)


class CentralUnavailable(Exception):
    """Central could not be reached or could not answer now; try again later."""


class CentralRefused(Exception):
    """Central refused a package for good; ``status`` and ``detail`` say why."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


def _detail(body: bytes) -> str:
    try:
        doc = json.loads(body)
        return str(doc.get("detail") or doc)
    except (ValueError, AttributeError):
        return body[:200].decode("utf-8", "replace")


class CentralClient:
    """central's ``/outbox`` and ``/packages`` over one persistent connection pool (treq), every
    request with the node's bearer token, or over HTTPS with its client certificate.

    Central's HTTPS certificate is verified for the URL's host name against
    ``settings.ca`` (else the platform's trust store), TLS 1.2 or later
    (:mod:`medd.transports.tlscontexts`). The CA and certificate files are
    read here: build the client while the node is assembled.
    """

    def __init__(self, reactor, settings: PullSettings, *, pool: HTTPConnectionPool | None = None):
        self.reactor = reactor
        self.settings = settings
        self.pool = pool or HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 4
        policy = HttpsPolicy.from_files(settings.ca, settings.client_cert)
        self.http = HTTPClient(Agent(reactor, contextFactory=policy, pool=self.pool))

    def close(self):
        return self.pool.closeCachedConnections()

    def _headers(self, **extra: str) -> dict:
        if self.settings.token is None:
            return extra
        return {"Authorization": f"Bearer {self.settings.token}", **extra}

    async def _request(self, method: str, path: str, **kw) -> tuple[int, bytes, object]:
        url = f"{self.settings.url}{path}"
        try:
            response = await self.http.request(method, url, headers=self._headers(**kw.pop("headers", {})),
                                               timeout=self.settings.timeout, reactor=self.reactor, **kw)
            body = await treq.content(response)
        except Exception as e:  # connection refused, DNS, TLS, timeout, reset
            self._fresh_connections()
            raise CentralUnavailable(f"{method} {url}: {type(e).__name__}: {e}") from e
        if response.code >= 500:
            self._fresh_connections()
        return response.code, body, response

    def _fresh_connections(self) -> None:
        # After a failure the next attempt connects anew rather than reusing a
        # kept-alive connection to a process that is going away (or a proxy's).
        d = self.pool.closeCachedConnections()
        if d is not None:
            d.addErrback(lambda _: None)

    async def list_outbox(self) -> list[dict]:
        """The packages central holds for this node, oldest first."""
        code, body, _ = await self._request("GET", "/outbox")
        if code != 200:
            raise CentralUnavailable(f"GET /outbox answered {code}: {_detail(body)}")
        try:
            items = json.loads(body)
        except ValueError as e:
            raise CentralUnavailable(f"GET /outbox answered with something that is not JSON: {e}") from e
        return [i for i in items if isinstance(i, dict) and isinstance(i.get("id"), int)]

    async def fetch(self, delivery_id: int) -> bytes:
        code, body, _ = await self._request("GET", f"/outbox/{delivery_id}")
        if code != 200:
            raise CentralUnavailable(f"GET /outbox/{delivery_id} answered {code}: {_detail(body)}")
        return body

    async def ack(self, delivery_id: int) -> None:
        code, body, _ = await self._request("POST", f"/outbox/{delivery_id}/ack")
        if code != 200:
            raise CentralUnavailable(f"POST /outbox/{delivery_id}/ack answered {code}: {_detail(body)}")

    async def post_package(self, data: bytes) -> int:
        code, body, _ = await self._request("POST", "/packages", data=data,
                                            headers={"Content-Type": PACKAGE_MEDIA_TYPE})
        if 200 <= code < 300:
            return code
        if code in REFUSED_STATUSES:
            raise CentralRefused(code, _detail(body))
        raise CentralUnavailable(f"POST /packages answered {code}: {_detail(body)}")

@dataclass(frozen=True)
class PollResult:
    """What one pass over central's outbox did."""

    listed: int = 0
    stored: int = 0  # new objects in the local inbox
    acknowledged: int = 0
    refused: int = 0
    error: str | None = None  # set when the pass stopped because central was unavailable


class Requestor(PassService):
    """Polls central's outbox every ``poll_interval`` on the clock, backing off while central is
    unavailable; ``kick()`` polls now."""

    log = Logger()

    def __init__(self, client, ingest, settings: PullSettings, clock):
        self.client = client  # CentralClient, or a fake with the same coroutines
        self.ingest = ingest  # the node's Ingest: receive_package(data, transport=, peer=)
        self.settings = settings
        self.clock = clock
        self.peer = urlsplit(settings.url).hostname or settings.url
        self.failures = 0  # consecutive passes that failed
        self.last_result: PollResult | None = None
        self._pass = CoalescingPass(self._poll, "requesting from central", clock)
        # Message-IDs this node refused: not downloaded again on every pass.
        self._refused: set[str] = set()
        self._stopped = False

    # -- polling -------------------------------------------------------------------------------------

    async def _poll(self) -> PollResult:
        """One pass; then the next one is due after the interval, or after the backoff if it failed."""
        if self._stopped:
            return PollResult()
        result = await self._pass_over_outbox()
        self.last_result = result
        if result.error is None:
            self.failures = 0
            delay = self.settings.poll_interval
        else:
            self.failures += 1
            delay = self.settings.backoff.delay(self.failures)
            self.log.warn("central {url} unavailable ({error}); retrying in {delay:.1f}s (failure {n})",
                          url=self.settings.url, error=result.error, delay=delay, n=self.failures)
        if self.running and not self._stopped:
            self._pass.schedule(delay)
        return result

    async def _pass_over_outbox(self) -> PollResult:
        listed = stored = acknowledged = refused = 0
        try:
            items = await self.client.list_outbox()
            listed = len(items)
            for item in items:
                if self._stopped:
                    break
                if item.get("message_id") in self._refused:
                    continue
                data = await self.client.fetch(item["id"])
                try:
                    outcome = await self.ingest.receive_package(data, transport="pull", peer=self.peer)
                except Refused as e:
                    # Not acknowledged: it stays on central, in state "sent", for its administrator.
                    refused += 1
                    self._refused.add(item.get("message_id"))
                    self.log.error("package {id} ({uid}) from central refused: {reason}", id=item["id"],
                                   uid=item.get("uid"), reason=e.reason)
                    continue
                stored += bool(outcome.created)
                await self.client.ack(item["id"])
                acknowledged += 1
        except CentralUnavailable as e:
            return PollResult(listed, stored, acknowledged, refused, error=str(e))
        except Exception as e:  # StoreFailed (disk full, database down) and the unforeseen
            self.log.failure("requesting from central failed")
            return PollResult(listed, stored, acknowledged, refused, error=f"{type(e).__name__}: {e}")
        if acknowledged or refused:
            self.log.info("requested from central: {listed} waiting, {stored} new, {acked} acknowledged, {refused} refused",
                          listed=listed, stored=stored, acked=acknowledged, refused=refused)
        return PollResult(listed, stored, acknowledged, refused)
