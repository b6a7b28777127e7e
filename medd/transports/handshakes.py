"""TLS handshakes on the Twisted listeners: bounded by the request deadline, refusals audited.

A peer that sends half a ClientHello and waits is a unit of work like a
half-sent request: :class:`HandshakeWatch` opens a ``TLS handshake`` unit on
the protocol's :class:`~medd.transports.deadlines.Deadline` when TLS begins
(at connection on a TLS listener, after ``STARTTLS`` on SMTP) and closes it
when Twisted reports the handshake complete (``IHandshakeListener``). A
handshake that fails on the client's certificate (none, or one the node's
CAs do not verify) is recorded as a refused authentication.
"""
from __future__ import annotations

import ssl

from OpenSSL.SSL import Error as TLSError
from twisted.internet.interfaces import IHandshakeListener
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from zope.interface import implementer

from medd.audit import MINOR_FAILURE

log = Logger()

HANDSHAKE = "TLS handshake"


def certificate_refusal(error: BaseException | None) -> str | None:
    """Why a handshake error (pyOpenSSL's, or the standard library's on DICOM TLS) refused the
    client's certificate, or None if it is about something else."""
    if not isinstance(error, (TLSError, ssl.SSLError)):
        return None
    text = str(error)
    # An alert is the client's complaint (about the node's certificate, say), not a refusal of its own.
    if "certificate" not in text or "alert" in text:
        return None
    if "did not return a certificate" in text or "certificate required" in text:
        return "no client certificate"
    return f"client certificate refused ({text})"


def audit_certificate_refusal(api, transport: str, peer: str, reason: str) -> None:
    """Record a TLS handshake refused for its client certificate as a refused authentication (once)."""
    log.warn("{transport} TLS handshake from {peer} refused: {reason}", transport=transport, peer=peer, reason=reason)
    if api is None:
        return
    d = api.audit("auth-refused", outcome=MINOR_FAILURE, credential="client certificate", peer=peer,
                  transport=transport, detail=f"TLS handshake: {reason}")
    d.addErrback(lambda f: log.failure("cannot record a refused TLS handshake in the audit trail", f))


@implementer(IHandshakeListener)
class HandshakeWatch:
    """Mixed into a listener's protocol, which has a ``deadline`` and the node's ``api``.

    Call :meth:`tls_began` when TLS starts on the connection and
    :meth:`tls_lost` from ``connectionLost``.
    """

    handshaking = False
    #: The listener's name in logs and audit records.
    transport_label = "tls"

    def tls_began(self) -> None:
        self.handshaking = True
        self.deadline.start(self, HANDSHAKE)

    def handshakeCompleted(self) -> None:
        if self.handshaking:
            self.handshaking = False
            self.deadline.stop()

    def tls_lost(self, reason, api, peer: str) -> None:
        if not self.handshaking:
            return
        self.handshaking = False
        why = certificate_refusal(getattr(reason, "value", None))
        if why is not None:
            audit_certificate_refusal(api, self.transport_label, peer, why)


@implementer(IHandshakeListener)
class HandshakeForwarder(ProtocolWrapper):
    """The per-peer cap's protocol wrapper: passes Twisted's end-of-handshake on to the protocol it wraps.

    Under an ``ssl:`` endpoint, or after STARTTLS, the TLS layer's wrapped
    protocol is this wrapper; without it the listener's protocol would never
    learn that the handshake finished.
    """

    def handshakeCompleted(self) -> None:
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()
