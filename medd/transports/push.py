"""Built-in push senders: SMTP, the TLS socket transport, and HTTP(S).

A push viewer's URL picks the sender: ``smtp://host:port``,
``tls://host:port``, ``http(s)://host[:port]/packages``. Each send succeeds
only when the receiver acknowledged the package (SMTP 250, TLS ``ok`` frame,
HTTP 2xx), which medd receivers give only once the object is durable.
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from twisted.internet.defer import ensureDeferred
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from medd.plugins.hookspecs import hookimpl
from medd.plugins.interfaces import IBatchSender, ISender


class PushRefused(Exception):
    """The receiver answered, and did not accept the package."""


def envelope(package: bytes) -> tuple[str, str]:
    """(From, To) addresses, read from the header block only."""
    import email
    import email.utils

    end = package.find(b"\r\n\r\n")
    msg = email.message_from_bytes(package[: end + 4 if end >= 0 else len(package)])
    _, sender = email.utils.parseaddr(msg["From"])
    _, recipient = email.utils.parseaddr(msg["To"])
    return sender, recipient


class LFLines:
    """The package as a file of LF-terminated lines, converted chunk by chunk.

    Twisted's SMTP client reads the message in chunks on the reactor and
    turns every LF into CRLF itself, so CRLF input would arrive as
    "\r\r\n"; converting lazily avoids a second whole-package copy.
    """

    def __init__(self, package: bytes):
        self.view = memoryview(package)
        self.pos = 0

    def seek(self, offset: int, whence: int = 0) -> None:
        # Twisted rewinds the message before each connection attempt.
        if (offset, whence) != (0, 0):
            raise ValueError("only a rewind to the start is supported")
        self.pos = 0

    def read(self, size: int = -1) -> bytes:
        if self.pos >= len(self.view):
            return b""
        end = len(self.view) if size is None or size < 0 else min(self.pos + size, len(self.view))
        if end < len(self.view) and self.view[end - 1] == 0x0D:
            end += 1  # never split a CRLF across two chunks
        chunk = bytes(self.view[self.pos:end])
        self.pos = end
        return chunk.replace(b"\r\n", b"\n")


@implementer(ISender)
class SmtpSender:
    schemes = ("smtp",)

    def send(self, reactor, url, package, settings):
        from twisted.mail.smtp import sendmail

        parts = urlsplit(url)
        sender, recipient = envelope(package)
        return sendmail(parts.hostname, sender, [recipient], LFLines(package), port=parts.port or 25,
                        reactor=reactor, requireTransportSecurity=False)


@implementer(IBatchSender)
class TlsSender:
    schemes = ("tls",)

    def send(self, reactor, url, package, settings):
        return ensureDeferred(self._send(reactor, url, package, settings))

    async def _send(self, reactor, url, package, settings):
        from medd.transports.tls import send_packages

        parts = urlsplit(url)
        ca, client = await _tls_credentials(reactor, settings)
        (reply,) = await send_packages(reactor, parts.hostname, parts.port, [package], ca_pem=ca, client_cert=client)
        if reply.get("status") != "ok":
            raise PushRefused(f"{reply.get('status')}: {reply.get('reason')}")
        return reply

    def send_batch(self, reactor, url, packages, settings):
        """Every package pipelined over one TLS connection; one reply each (see :class:`IBatchSender`)."""
        return ensureDeferred(self._send_batch(reactor, url, list(packages), settings))

    async def _send_batch(self, reactor, url, packages, settings):
        from medd.transports.tls import TransferIncomplete, send_packages

        parts = urlsplit(url)
        try:
            ca, client = await _tls_credentials(reactor, settings)
            return await send_packages(reactor, parts.hostname, parts.port, packages, ca_pem=ca, client_cert=client)
        except TransferIncomplete as e:
            answered, reason = list(e.replies), e.reason
        except Exception as e:  # cannot connect, TLS handshake refused, …: nothing was answered
            answered, reason = [], f"{type(e).__name__}: {e}"
        return answered + [{"status": "retry", "reason": reason}] * (len(packages) - len(answered))


def _tls_credentials(reactor, settings):
    """Deferred (CA PEM, client certificate PEM) from the sender settings, either may be None,
    read off the reactor thread."""

    def read() -> tuple[bytes | None, bytes | None]:
        ca = Path(settings["tls_ca"]).read_bytes() if settings.get("tls_ca") else None
        client = Path(settings["tls_client_cert"]).read_bytes() if settings.get("tls_client_cert") else None
        return ca, client

    return deferToThreadPool(reactor, reactor.getThreadPool(), read)


@implementer(ISender)
class HttpSender:
    schemes = ("http", "https")

    def send(self, reactor, url, package, settings):
        return ensureDeferred(self._send(reactor, url, package, settings))

    async def _send(self, reactor, url, package, settings):
        import treq
        from twisted.web.client import Agent, HTTPConnectionPool

        from medd.transports.tlscontexts import HttpsPolicy

        pool = HTTPConnectionPool(reactor, persistent=False)
        # [push] tls_ca (a gateway's [gateway] ca): the CA that signed the
        # receiver's HTTPS certificate, else the platform's trust store; and
        # tls_client_cert (a gateway's [gateway] client_cert), presented to it.
        policy = await deferToThreadPool(reactor, reactor.getThreadPool(), HttpsPolicy.from_files,
                                         settings.get("tls_ca"), settings.get("tls_client_cert"))
        client = treq.client.HTTPClient(Agent(reactor, contextFactory=policy, pool=pool))
        headers = {b"Content-Type": [b"message/rfc822"]}
        if settings.get("http_token"):
            headers[b"Authorization"] = [b"Bearer " + settings["http_token"].encode()]
        response = await client.post(url, data=package, headers=headers)
        body = await response.content()
        if not 200 <= response.code < 300:
            raise PushRefused(f"HTTP {response.code}: {body[:300].decode('utf-8', 'replace')}")
        return response.code


@hookimpl
def medd_register_senders(register) -> None:
    for sender in (SmtpSender(), TlsSender(), HttpSender()):
        register(sender)
