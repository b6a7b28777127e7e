"""The viewer's HTTP client for central: the pull outbox and POST /packages.

One persistent connection pool (treq over twisted.web's Agent); every
request carries the viewer's bearer token. Failures come back as two kinds:
:class:`CentralUnavailable` (worth retrying later: central down, 5xx, a
token central does not know yet) and :class:`CentralRefused` (central
answered that this package is bad; sending it again will not help).
"""
from __future__ import annotations

import json

import treq
from treq.client import HTTPClient
from twisted.web.client import Agent, HTTPConnectionPool

from medd.viewer.settings import CentralSettings

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
    def __init__(self, reactor, settings: CentralSettings, *, pool: HTTPConnectionPool | None = None):
        self.reactor = reactor
        self.settings = settings
        self.pool = pool or HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 4
        self.http = HTTPClient(Agent(reactor, pool=self.pool))

    def close(self):
        return self.pool.closeCachedConnections()

    def _headers(self, **extra: str) -> dict:
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
        """The packages central holds for this viewer, oldest first."""
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
