"""Built-in push senders: SMTP, the TLS socket transport, and HTTP(S).

A push viewer's URL picks the sender: ``smtp://host:port``,
``tls://host:port``, ``http(s)://host[:port]/packages``. Each send succeeds
only when the receiver acknowledged the package (SMTP 250, TLS ``ok`` frame,
HTTP 2xx), which medd receivers give only once the object is durable.
"""
from __future__ import annotations

from io import BytesIO
from pathlib import Path
from urllib.parse import urlsplit

from twisted.internet.defer import ensureDeferred
from zope.interface import implementer

from medd.plugins.hookspecs import hookimpl
from medd.plugins.interfaces import ISender


class PushRefused(Exception):
    """The receiver answered, and did not accept the package."""


def _envelope(package: bytes) -> tuple[str, str]:
    import email

    msg = email.message_from_bytes(package.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n")
    _, sender = email.utils.parseaddr(msg["From"])
    _, recipient = email.utils.parseaddr(msg["To"])
    return sender, recipient


@implementer(ISender)
class SmtpSender:
    schemes = ("smtp",)

    def send(self, reactor, url, package, settings):
        from twisted.mail.smtp import sendmail

        parts = urlsplit(url)
        sender, recipient = _envelope(package)
        # Twisted's SMTP client reads the message as LF-terminated lines and
        # sends each with CRLF; CRLF input would arrive as "\r\r\n".
        text = package.replace(b"\r\n", b"\n")
        return sendmail(parts.hostname, sender, [recipient], BytesIO(text), port=parts.port or 25,
                        reactor=reactor, requireTransportSecurity=False)


@implementer(ISender)
class TlsSender:
    schemes = ("tls",)

    def send(self, reactor, url, package, settings):
        return ensureDeferred(self._send(reactor, url, package, settings))

    async def _send(self, reactor, url, package, settings):
        from medd.transports.tls import send_packages

        parts = urlsplit(url)
        ca = Path(settings["tls_ca"]).read_bytes() if settings.get("tls_ca") else None
        client = Path(settings["tls_client_cert"]).read_bytes() if settings.get("tls_client_cert") else None
        (reply,) = await send_packages(reactor, parts.hostname, parts.port, [package], ca_pem=ca, client_cert=client)
        if reply.get("status") != "ok":
            raise PushRefused(f"{reply.get('status')}: {reply.get('reason')}")
        return reply


@implementer(ISender)
class HttpSender:
    schemes = ("http", "https")

    def send(self, reactor, url, package, settings):
        return ensureDeferred(self._send(reactor, url, package, settings))

    async def _send(self, reactor, url, package, settings):
        import treq
        from twisted.web.client import Agent, HTTPConnectionPool

        pool = HTTPConnectionPool(reactor, persistent=False)
        client = treq.client.HTTPClient(Agent(reactor, pool=pool))
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
