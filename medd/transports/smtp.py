"""SMTP receiver (Twisted ESMTP): every message is a package for the ingest path.

The 250 after DATA is sent only once the package is fsync'd and indexed; a
refused package gets a 5xx that says why, a failure of medd itself a 451 so
the sending MTA retries. SIZE is advertised and enforced, STARTTLS offered
when ``[tls]`` names a certificate; with ``[smtp] require_starttls = yes`` a
MAIL FROM before it is answered 530.

A centre that sends mail directly authenticates with SMTP AUTH (RFC 4954,
SASL PLAIN or LOGIN), offered and accepted only once the session is
encrypted: the user name is the address it sends from, the password the
bearer token central issued to that centre (or viewer). Twisted's cred
checks it (a :class:`SenderTokenChecker` asking the node's
``medd_check_access`` policy, action ``"send"``); the token then goes with
every package of the session to the sender policy (``medd_check_sender``),
as a bearer token does over HTTP.
"""
from __future__ import annotations

import re

from dataclasses import dataclass

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import ensureDeferred, succeed
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.mail.smtp import (
    ESMTP,
    IMessage,
    IMessageDelivery,
    IMessageDeliveryFactory,
    SMTPBadRcpt,
    SMTPServerError,
)
from twisted.mail.imap4 import LOGINCredentials, PLAINCredentials
from twisted.mail.smtp import DATA as DATA_MODE
from zope.interface import implementer

from medd.audit import MINOR_FAILURE, SERIOUS_FAILURE
from medd.ingest import Refused, StoreFailed
from medd.plugins.hookspecs import AccessClaim, hookimpl
from medd.plugins.interfaces import ITransport
from medd.throttling import LoginThrottle
from medd.transports.deadlines import Deadline, peer_host
from medd.transports.handshakes import HandshakeWatch
from medd.transports.listener import EndpointListener
from medd.transports.tlscontexts import server_tls_options

log = Logger()

# RFC 5321 allows 512 octets per reply line; leave room for the code.
_MAX_REPLY_TEXT = 400


def reply_text(text: str) -> bytes:
    """One line of ASCII for a reply: reasons may quote wire data (headers,
    UIDs), which must not smuggle CR/LF or control bytes into the session."""
    flat = " ".join(str(text).split())
    flat = "".join(c if " " <= c <= "~" else "?" for c in flat)
    if len(flat) > _MAX_REPLY_TEXT:
        flat = flat[: _MAX_REPLY_TEXT - 3] + "..."
    return flat.encode("ascii")


def _too_large(size: int, limit: int) -> SMTPServerError:
    return SMTPServerError(552, reply_text(f"5.3.4 message of {size} bytes exceeds the limit of {limit} bytes"))


@implementer(IMessage)
class PackageMessage:
    """The package being received in one DATA transaction.

    Lines are kept only while the total stays within the size limit; past it
    the buffer is dropped and the rest of the data is discarded unread, so a
    client cannot make the node hold more than one object's worth of bytes.
    """

    def __init__(self, api, peer: str, credentials: str | None = None, user: str | None = None):
        self.api = api
        self.peer = peer
        self.credentials = credentials
        self.user = user
        self.limit = api.max_object_size
        self.size = 0
        self.buffer: bytearray | None = bytearray()

    def lineReceived(self, line: bytes) -> None:
        self.size += len(line) + 2
        if self.size > self.limit:
            self.buffer = None
            log.warn(
                "SMTP package from {peer} refused ({code}): over {limit} bytes",
                peer=self.peer, code=552, limit=self.limit, kind="too-large",
            )
            # ESMTP stops feeding lines and sends this reply at the final ".".
            raise _too_large(self.size, self.limit)
        self.buffer += line
        self.buffer += b"\r\n"

    def connectionLost(self) -> None:
        self.buffer = None

    def eomReceived(self):
        buffer, self.buffer = self.buffer, None
        return ensureDeferred(self._deliver(buffer))

    async def _deliver(self, buffer: bytearray):
        # Copying hundreds of megabytes is not a reactor-thread job.
        data = await self.api.run_blocking(bytes, buffer)
        del buffer
        try:
            return await self.api.receive_package(data, transport="smtp", peer=self.peer, credentials=self.credentials,
                                                  user=self.user)
        except Refused as e:
            # A conflict is permanent too: resending the same Message-ID or UID will not help.
            code, status = {"too-large": (552, "5.3.4"), "conflict": (554, "5.7.0")}.get(e.kind, (554, "5.6.0"))
            log.warn(
                "SMTP package from {peer} refused ({code}): {reason}",
                peer=self.peer, code=code, reason=e.reason, kind=e.kind,
            )
            raise SMTPServerError(code, reply_text(f"{status} {e.reason}")) from e
        except StoreFailed as e:
            log.error(
                "SMTP package from {peer} not stored ({code}): {reason}",
                peer=self.peer, code=451, reason=str(e),
            )
            # The detail (paths, database errors) is for the log, not the peer.
            raise SMTPServerError(451, b"4.3.0 the package could not be stored; try again later") from e


@implementer(IMessage)
class FurtherRecipient:
    """Stands for the second and later recipients of one message: the package
    is ingested once, by the first recipient's :class:`PackageMessage`."""

    def lineReceived(self, line: bytes) -> None:
        pass

    def eomReceived(self):
        return succeed(None)

    def connectionLost(self) -> None:
        pass


@implementer(IMessageDelivery)
class PackageDelivery:
    """One mail transaction (MAIL FROM to the end of DATA)."""

    def __init__(self, api, peer: str, credentials: str | None = None, user: str | None = None):
        self.api = api
        self.peer = peer
        self.credentials = credentials
        self.user = user
        self.message: PackageMessage | None = None

    def receivedHeader(self, helo, origin, recipients):
        # The package is parsed, not relayed; a Received: line would only
        # change its bytes.
        return None

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):
        # Routing and its verification come later; any well-formed recipient is accepted.
        if not user.dest.local.strip(b'"'):
            raise SMTPBadRcpt(user, 553, "5.1.3 empty recipient")
        return self._message

    def _message(self):
        if self.message is None:
            self.message = PackageMessage(self.api, self.peer, self.credentials, self.user)
            return self.message
        return FurtherRecipient()


@implementer(IMessageDeliveryFactory)
class PackageDeliveryFactory:
    """Per connection: a fresh :class:`PackageDelivery` for each MAIL FROM; after AUTH, one that
    carries the sender's token (``credentials``)."""

    def __init__(self, api, peer: str, credentials: str | None = None, user: str | None = None):
        self.api = api
        self.peer = peer
        self.credentials = credentials
        self.user = user

    def getMessageDelivery(self) -> PackageDelivery:
        return PackageDelivery(self.api, self.peer, self.credentials, self.user)


# -- AUTH (twisted.cred) -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SmtpLogin:
    """The avatar ID of a successful AUTH: who (the address given as user name), the token it
    proved and the name of the centre or viewer that token is."""

    address: str
    token: str
    name: str = ""


class AuthThrottled(Exception):
    """Too many failed AUTH attempts for this user or from this client: answered 454, nothing checked."""

    def __init__(self, retry_after: int):
        super().__init__(f"too many failed authentications; try again in {retry_after} s")
        self.retry_after = retry_after


@implementer(ICredentialsChecker)
class SenderTokenChecker:
    """Checks an AUTH user name (a sender's address) and password (its token) against the node's
    access policy (``medd_check_access``, action ``"send"``): on central, the token of the centre
    or viewer that address belongs to. A node without such a policy accepts no one.

    Failures are throttled per user, per client address and per both, as the reading room's
    logins are (:class:`~medd.throttling.LoginThrottle`, shared by the listener's connections),
    and each is recorded as a refused authentication."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, api, throttle: LoginThrottle | None = None, client: str = ""):
        self.api = api
        self.throttle = throttle
        self.client = client

    def requestAvatarId(self, credentials):
        return ensureDeferred(self._check(credentials))

    async def _check(self, credentials) -> SmtpLogin:
        try:
            address = credentials.username.decode("utf-8").strip().lower()
            token = credentials.password.decode("utf-8").strip()
        except (AttributeError, UnicodeDecodeError) as e:
            raise UnauthorizedLogin("user name and password must be UTF-8") from e
        if not address or not token:
            raise UnauthorizedLogin("empty user name or password")
        wait = self.throttle.attempt(address, self.client) if self.throttle is not None else 0
        if wait:
            log.warn("SMTP AUTH as {address} from {peer} throttled for {wait} s", address=address, peer=self.client,
                     wait=wait)
            await self._refused(address, SERIOUS_FAILURE, f"throttled for {wait} s after failed attempts")
            raise AuthThrottled(wait)
        decision = await self.api.check_access(
            AccessClaim(action="send", transport="smtp", peer=address, credentials=token))
        if not decision.allowed:
            log.warn("SMTP AUTH as {address} refused: {reason}", address=address, reason=decision.reason)
            await self._refused(address, MINOR_FAILURE, decision.reason)
            raise UnauthorizedLogin(decision.reason)
        if self.throttle is not None:
            self.throttle.succeeded(address, self.client)
        return SmtpLogin(address, token, decision.who)

    async def _refused(self, address: str, outcome: int, reason: str) -> None:
        try:
            await self.api.audit("auth-refused", outcome=outcome, user=address, credential="password",
                                 peer=self.client or None, detail=f"SMTP AUTH: {reason}")
        except Exception:
            log.failure("cannot record a refused SMTP AUTH in the audit trail")


@implementer(IRealm)
class SenderRealm:
    """Gives an authenticated session a delivery factory whose packages carry its token."""

    def __init__(self, api, peer: str):
        self.api = api
        self.peer = peer

    def requestAvatar(self, avatar_id: SmtpLogin, mind, *interfaces):
        if IMessageDeliveryFactory not in interfaces:
            raise NotImplementedError("only IMessageDeliveryFactory")
        log.info("SMTP sender at {peer} authenticated as {address}", peer=self.peer, address=avatar_id.address)
        factory = PackageDeliveryFactory(self.api, self.peer, credentials=avatar_id.token, user=avatar_id.name or None)
        return IMessageDeliveryFactory, factory, lambda: None


_SIZE_PARAM = re.compile(rb"^SIZE=(?P<size>\S*)$", re.I)


class PackageSMTP(HandshakeWatch, ESMTP):
    """ESMTP with SIZE, package-specific end-of-data replies and a few
    hardenings of Twisted's server for a public-facing port."""

    noisy = False

    def __init__(self, api, context_factory=None, *, require_starttls: bool = False):
        super().__init__(chal={b"PLAIN": PLAINCredentials, b"LOGIN": LOGINCredentials}, contextFactory=context_factory)
        self.api = api
        self.require_starttls = require_starttls
        self.host = api.node_name
        self._tls_just_started = False
        # A command line is due [limits] request_timeout after its first byte; a
        # message after its DATA command, plus its bytes at the minimum rate.
        # Twisted's idle timer, which every line resets, only closes silent connections.
        self.deadline = Deadline(api.reactor, api.limits, "smtp")

    def connectionMade(self) -> None:
        # Replies are small and the client waits for each one.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        peer = getattr(self.transport.getPeer(), "host", str(self.transport.getPeer()))
        self.deliveryFactory = PackageDeliveryFactory(self.api, peer)
        throttle = getattr(self.factory, "auth_throttle", None)
        self.portal = Portal(SenderRealm(self.api, peer), [SenderTokenChecker(self.api, throttle, peer)])
        super().connectionMade()
        self.transport_label = "smtp"
        if ISSLTransport.providedBy(self.transport):
            self.tls_began()  # an ssl: endpoint: TLS from the first byte

    @property
    def encrypted(self) -> bool:
        """After STARTTLS, or on a listener that is TLS from the start (an ``ssl:`` endpoint)."""
        return self.startedTLS or ISSLTransport.providedBy(self.transport)

    def extensions(self):
        ext = super().extensions()
        ext[b"SIZE"] = [str(self.api.max_object_size).encode("ascii")]
        if not self.encrypted:
            # A password is never offered a place in clear text (RFC 4954 4).
            del ext[b"AUTH"]
        return ext

    def ext_AUTH(self, rest: bytes) -> None:
        if not self.encrypted:
            self.sendCode(538, b"5.7.11 encryption required: STARTTLS first")
            return
        super().ext_AUTH(rest)

    def _ebAuthenticated(self, reason) -> None:
        self.challenger = None
        if reason.check(AuthThrottled):
            # RFC 4954: a temporary failure; the client may try again later.
            self.challenge = None
            self.sendCode(454, reply_text(f"4.7.0 {reason.value}"))
            return
        super()._ebAuthenticated(reason)

    def do_MAIL(self, rest: bytes) -> None:
        if self.require_starttls and not self.encrypted:
            self.sendCode(530, b"5.7.0 must issue a STARTTLS command first")
            return
        m = self.mail_re.match(rest)
        if not self._from and m and m.group("opts"):
            for param in m.group("opts").split():
                size = _SIZE_PARAM.match(param)
                if size is None:
                    continue
                if not size.group("size").isdigit():
                    self.sendCode(501, b"5.5.4 SIZE needs a number of bytes")
                    return
                declared = int(size.group("size"))
                if declared > self.api.max_object_size:
                    log.warn(
                        "SMTP package from {peer} refused ({code}): declared SIZE {size} over {limit} bytes",
                        peer=self.deliveryFactory.peer, code=552, size=declared,
                        limit=self.api.max_object_size, kind="too-large",
                    )
                    error = _too_large(declared, self.api.max_object_size)
                    self.sendCode(error.code, error.resp)
                    return
        super().do_MAIL(rest)

    def _messageHandled(self, resultList) -> None:
        # Twisted answers 550 to any failure; the sender needs to know whether
        # to give up (5xx) or retry (4xx), and why.
        for success, result in resultList:
            if not success:
                if result.check(SMTPServerError):
                    self.sendCode(result.value.code, result.value.resp)
                else:
                    log.failure("SMTP delivery from {peer} failed", result, peer=self.deliveryFactory.peer)
                    self.sendCode(451, b"4.3.0 local error; try again later")
                return
        stored = next(r for _, r in resultList if r is not None)
        what = "stored" if stored.created else "already stored"
        self.sendCode(250, reply_text(f"2.0.0 {stored.object_type} {stored.uid} {what}"))

    def lineLengthExceeded(self, line: bytes) -> None:
        # Twisted's SMTP answers 500 but keeps the over-long partial line in
        # its buffer, which then grows with every read; close instead.
        super().lineLengthExceeded(line)
        self._buffer = b""
        self.transport.loseConnection()

    def ext_STARTTLS(self, rest: bytes) -> None:
        started = self.startedTLS
        super().ext_STARTTLS(rest)
        if self.startedTLS and not started:
            # RFC 3207 4.2: forget what the client said in clear text.
            peer = self.transport.getPeer()
            self._helo = (None, getattr(peer, "host", str(peer)))
            self._from = None
            self._to = []
            self._tls_just_started = True
            self.tls_began()  # the handshake is due like a command line

    def lineReceived(self, line: bytes):
        if self._tls_just_started:
            # Clear text that arrived in the same read as STARTTLS was sent
            # before encryption; acting on it after the switch would let a
            # man in the middle inject commands (CVE-2011-0411).
            return None
        return super().lineReceived(line)

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self._tls_just_started:
            self._tls_just_started = False
            self._buffer = b""
        if self.mode == DATA_MODE:
            if self.deadline.unit != "message":
                self.deadline.start(self, "message")
            self.deadline.earn(len(data))
        elif self.handshaking:
            pass  # STARTTLS was just answered: the handshake's unit runs
        elif self._buffer:
            if self.deadline.unit != "command line":
                self.deadline.start(self, "command line")
        else:
            self.deadline.stop()

    def connectionLost(self, reason) -> None:
        self.deadline.stop()
        self.tls_lost(reason, self.api, peer_host(self.transport))
        super().connectionLost(reason)


class PackageSMTPFactory(ServerFactory):
    noisy = False

    def __init__(self, api, context_factory=None, *, require_starttls: bool = False):
        self.api = api
        self.context_factory = context_factory
        self.require_starttls = require_starttls
        #: Failed AUTH attempts, per user and per client, across the listener's connections.
        self.auth_throttle = LoginThrottle(api.clock)

    def buildProtocol(self, addr) -> PackageSMTP:
        protocol = PackageSMTP(self.api, self.context_factory, require_starttls=self.require_starttls)
        protocol.factory = self
        # The idle timeout runs on the node's reactor, not the global one.
        protocol.callLater = self.api.reactor.callLater
        return protocol


def starttls_context(certificate: str, private_key: str):
    """The STARTTLS context from the PEM files named in ``[tls]``, to the BCP 195 policy
    (:mod:`medd.transports.tlscontexts`; no client certificate is asked for).

    Blocking file reads: called once, while the node is assembled.
    """
    try:
        with open(certificate, "rb") as f:
            cert_pem = f.read()
        with open(private_key, "rb") as f:
            key_pem = f.read()
        return server_tls_options(cert_pem, key_pem)
    except Exception as e:
        raise ValueError(
            f"[tls] certificate {certificate} / private_key {private_key} cannot be used for STARTTLS: {e}"
        ) from e


@implementer(ITransport)
class SMTPTransport:
    name = "smtp"
    description = "SMTP receiver (Twisted ESMTP) for packages, with SIZE, STARTTLS and AUTH PLAIN/LOGIN over TLS"

    def listener(self, endpoint: str, api):
        context = None
        if api.tls.certificate and api.tls.private_key:
            context = starttls_context(api.tls.certificate, api.tls.private_key)
        require = _yes(api.settings.get("require_starttls"))
        factory = PackageSMTPFactory(api, context, require_starttls=require)
        return EndpointListener(api.reactor, endpoint, factory, "smtp", api.limits)


def _yes(text: str | None) -> bool:
    return (text or "no").strip().lower() in ("yes", "true", "on", "1")


def check_smtp_section(section) -> None:
    text = section.get("require_starttls")
    if text is not None and text.strip().lower() not in ("yes", "no", "true", "false", "on", "off", "1", "0"):
        section.problem("require_starttls", f"must be yes or no, not {text!r}")


@hookimpl
def medd_register_transports(register) -> None:
    register(SMTPTransport())


@hookimpl
def medd_register_config(register) -> None:
    # [smtp] require_starttls: refuse MAIL FROM (530) until the session is encrypted ([tls] certificate needed).
    register("smtp", ["require_starttls"], check_smtp_section)
