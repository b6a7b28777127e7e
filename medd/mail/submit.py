"""The ``mailto:`` push sender: a package handed to the site's smarthost (``[mail] smarthost``) by
Twisted's own ESMTP client, for the mail system to route.

``smtp://host:587`` upgrades with STARTTLS, the smarthost's certificate verified against
``[mail] ca`` (or the platform's trust store) and its name; a smarthost that does not offer
STARTTLS is refused unless ``[mail] starttls = optional``. ``smtps://host:465`` is TLS from the
first byte. With ``username`` and ``password_file`` the node authenticates (AUTH, only once
encrypted). A send succeeds when the smarthost answered 250 to the message: it has taken
responsibility for it; anything else fails the attempt, which the caller retries with its backoff.
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust
from twisted.internet.threads import deferToThreadPool
from twisted.mail.smtp import ESMTPSenderFactory
from zope.interface import implementer

from medd.mail.fragments import split
from medd.mail.settings import DEFAULT_MAX_MESSAGE_SIZE, SENDER_PREFIX, mailto_address
from medd.plugins.hookspecs import hookimpl
from medd.plugins.interfaces import ISender
from medd.transports.push import LFLines, envelope


class NoSmarthost(Exception):
    """A ``mailto:`` destination on a node without ``[mail] smarthost``."""


def protected(package: bytes, settings: dict) -> bytes:
    """Blocking: ``package`` signed and encrypted (S/MIME) when ``[mail]`` names this node's S/MIME
    identity and the recipient's certificate is known (central: the viewer's registered one; a gateway
    or viewer: ``smime_recipient``, central's); else as it is."""
    pem = settings.get(SENDER_PREFIX + "smime_recipient_pem")
    recipient = settings.get(SENDER_PREFIX + "smime_recipient")
    if not settings.get(SENDER_PREFIX + "smime_certificate") or not (pem or recipient):
        return package
    from cryptography import x509

    from medd.mail.smime import SmimeIdentity, protect

    identity = SmimeIdentity.from_files(settings[SENDER_PREFIX + "smime_certificate"],
                                        settings[SENDER_PREFIX + "smime_private_key"])
    certificate = pem.encode("ascii") if pem else Path(recipient).read_bytes()
    return protect(package, identity, x509.load_pem_x509_certificate(certificate))


def _read_credentials(settings: dict) -> tuple[bytes | None, bytes | None]:
    """Blocking: (CA PEM, password) from the files ``[mail]`` names, either may be None."""
    ca = settings.get(SENDER_PREFIX + "ca")
    password = settings.get(SENDER_PREFIX + "password_file")
    return (Path(ca).read_bytes() if ca else None,
            Path(password).read_bytes().strip() if password else None)


@implementer(ISender)
class SmarthostSender:
    """Sends each package as one message through ``[mail] smarthost`` to a ``mailto:`` address."""

    schemes = ("mailto",)

    def send(self, reactor, url, package, settings):
        return ensureDeferred(self._send(reactor, url, package, settings))

    async def _send(self, reactor, url, package, settings) -> None:
        recipient = mailto_address(url)
        smarthost = settings.get(SENDER_PREFIX + "smarthost")
        if not smarthost:
            raise NoSmarthost(f"{url} needs [mail] smarthost: this node sends mail only through one")
        parts = urlsplit(smarthost)
        pool = reactor.getThreadPool()
        ca, password = await deferToThreadPool(reactor, pool, _read_credentials, settings)
        package = await deferToThreadPool(reactor, pool, protected, package, settings)
        trust = Certificate.loadPEM(ca) if ca else platformTrust()
        context = optionsForClientTLS(parts.hostname, trustRoot=trust)
        username = settings.get(SENDER_PREFIX + "username")
        sender, _ = envelope(package)
        # Above [mail] max_message_size, message/partial fragments (RFC 2046 5.2.2); each must be taken.
        limit = int(settings.get(SENDER_PREFIX + "max_message_size", DEFAULT_MAX_MESSAGE_SIZE))
        messages = await deferToThreadPool(reactor, pool, split, package, limit)
        for message in messages:
            done: Deferred = Deferred()
            factory = ESMTPSenderFactory(
                username.encode() if username else None, password, sender, [recipient], LFLines(message), done,
                retries=0, timeout=float(settings.get(SENDER_PREFIX + "timeout", 60)), contextFactory=context,
                requireAuthentication=username is not None,
                requireTransportSecurity=settings.get(SENDER_PREFIX + "starttls", "required") != "optional",
                hostname=parts.hostname,
            )
            factory.noisy = False
            if parts.scheme == "smtps":
                reactor.connectSSL(parts.hostname, parts.port or 465, factory, context)
            else:
                reactor.connectTCP(parts.hostname, parts.port or 587, factory)
            await done


class MailToCentral:
    """``post_package`` for a viewer whose packages go to central by mail (``[central] packages =
    mailto:…``): the smarthost's acceptance is the send; any failure is retried as central being away."""

    def __init__(self, reactor, url: str, settings: dict):
        self.reactor, self.url, self.settings = reactor, url, settings

    async def post_package(self, data: bytes) -> int:
        from medd.pull import CentralUnavailable

        try:
            await SmarthostSender().send(self.reactor, self.url, data, self.settings)
        except Exception as e:
            raise CentralUnavailable(f"mail to {self.url}: {type(e).__name__}: {e}") from e
        return 250


@hookimpl
def medd_register_senders(register) -> None:
    register(SmarthostSender())
