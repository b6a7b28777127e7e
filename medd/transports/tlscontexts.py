"""The TLS contexts of every medd listener and client, to one policy (BCP 195).

RFC 9325 (BCP 195): TLS 1.2 or later only (never SSL, TLS 1.0 or 1.1), and
under TLS 1.2 only forward-secret AEAD cipher suites (no NULL, export, RC4,
3DES or CBC suites); TLS 1.3's suites are all AEAD. The Twisted listeners
(the TLS socket, HTTPS, SMTP STARTTLS) and clients (the push senders, the
link to central) get pyOpenSSL contexts from here; the DICOM TLS listener,
which pynetdicom runs on the standard library's :mod:`ssl`, gets an
:class:`ssl.SSLContext` with the same rules.
"""
from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from pathlib import Path

from twisted.internet.ssl import (
    AcceptableCiphers,
    Certificate,
    CertificateOptions,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

# OpenSSL cipher string for TLS 1.2: ECDHE/DHE key exchange with AES-GCM or ChaCha20-Poly1305 only.
BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!EXPORT:!RC4:!3DES:!MD5:!SHA1"

_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def _policy() -> dict:
    """The CertificateOptions keywords that apply BCP 195."""
    return {
        "raiseMinimumTo": TLSVersion.TLSv1_2,
        "acceptableCiphers": AcceptableCiphers.fromOpenSSLCipherString(BCP195_CIPHERS),
    }


def pem_certificates(pem: bytes) -> list[Certificate]:
    """Every certificate in a PEM bundle, in order."""
    blocks = _PEM_CERTIFICATE.findall(pem)
    if not blocks:
        raise ValueError("no PEM certificate found")
    return [Certificate.loadPEM(block) for block in blocks]


def _bytes(pem: bytes | str) -> bytes:
    return pem.encode("ascii") if isinstance(pem, str) else pem


# -- servers -----------------------------------------------------------------------------------------


def server_tls_options(certificate_pem: bytes, key_pem: bytes, client_ca_pem: bytes | None = None, *,
                       require_client_certificate: bool = True) -> CertificateOptions:
    """TLS server options from PEM bytes.

    With ``client_ca_pem``, a client certificate is verified against those
    CAs: required (the handshake fails without one), or with
    ``require_client_certificate=False`` optional (a client may present none,
    but one it presents must verify). Certificates after the first in
    ``certificate_pem`` are sent as the chain.
    """
    _, *chain = pem_certificates(certificate_pem)
    # loadPEM takes the first certificate and the private key it finds.
    private = PrivateCertificate.loadPEM(certificate_pem + b"\n" + key_pem)
    kwargs = {}
    if client_ca_pem is not None:
        cas = [c.original for c in pem_certificates(client_ca_pem)]
        # trustRoot cannot be combined with requireCertificate; verify + caCerts is the same check.
        kwargs.update(verify=True, caCerts=cas, requireCertificate=require_client_certificate)
    return CertificateOptions(
        privateKey=private.privateKey.original,
        certificate=private.original,
        extraCertChain=[c.original for c in chain],
        **_policy(),
        **kwargs,
    )


@dataclass(frozen=True)
class ServerFiles:
    """The PEM bytes of a node's ``[tls]`` section, read once while the node is assembled."""

    certificate: bytes
    private_key: bytes
    client_ca: bytes | None = None

    @classmethod
    def read(cls, tls, listener: str) -> "ServerFiles":
        """From :class:`medd.plugins.api.TLSSettings`; ValueError naming ``listener`` when a file is missing."""
        if not (tls.certificate and tls.private_key):
            raise ValueError(f"the {listener} listener needs [tls] certificate and private_key")
        return cls(
            Path(tls.certificate).read_bytes(), Path(tls.private_key).read_bytes(),
            Path(tls.client_ca).read_bytes() if tls.client_ca else None,
        )

    def options(self, *, require_client_certificate: bool = True) -> CertificateOptions:
        return server_tls_options(self.certificate, self.private_key, self.client_ca,
                                  require_client_certificate=require_client_certificate)


def stdlib_server_context(tls) -> ssl.SSLContext:
    """An :class:`ssl.SSLContext` for a server (pynetdicom's DICOM TLS) from ``[tls]``, to the same
    policy: TLS 1.2+, the BCP 195 suites, and with ``client_ca`` a client certificate required."""
    if not (tls.certificate and tls.private_key):
        raise ValueError("the dicom_tls listener needs [tls] certificate and private_key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.load_cert_chain(tls.certificate, tls.private_key)
    if tls.client_ca:
        context.load_verify_locations(cafile=tls.client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def stdlib_client_context(ca: str | None = None, client_cert: str | None = None) -> ssl.SSLContext:
    """An :class:`ssl.SSLContext` for a client (pynetdicom as a DICOM TLS SCU) to the same policy:
    the server verified against ``ca`` (else the platform's store), ``client_cert`` (PEM of
    certificate and key) presented when given."""
    context = ssl.create_default_context(cafile=ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_CIPHERS)
    if client_cert:
        context.load_cert_chain(client_cert)
    return context


# -- clients -----------------------------------------------------------------------------------------


def client_tls_options(server_name: str, *, ca_pem: bytes | str | None = None, client_cert: bytes | str | None = None):
    """Client TLS options: verify the server as ``server_name`` against
    ``ca_pem`` (else the platform's trust store); present ``client_cert``
    (PEM holding certificate and private key) when given."""
    trust = trustRootFromCertificates(pem_certificates(_bytes(ca_pem))) if ca_pem is not None else platformTrust()
    own = PrivateCertificate.loadPEM(_bytes(client_cert)) if client_cert is not None else None
    return optionsForClientTLS(server_name, trustRoot=trust, clientCertificate=own, extraCertificateOptions=_policy())


@implementer(IPolicyForHTTPS)
class HttpsPolicy:
    """For treq/Agent: verify each HTTPS server by its host name against a CA (else the platform's
    trust store), present a client certificate when one is configured, to the BCP 195 policy."""

    def __init__(self, ca_pem: bytes | None = None, client_cert_pem: bytes | None = None):
        self.ca_pem = ca_pem
        self.client_cert_pem = client_cert_pem

    @classmethod
    def from_files(cls, ca_path: str | None = None, client_cert_path: str | None = None) -> "HttpsPolicy":
        """Blocking file reads: at assembly, or off the reactor thread."""
        return cls(Path(ca_path).read_bytes() if ca_path else None,
                   Path(client_cert_path).read_bytes() if client_cert_path else None)

    def creatorForNetloc(self, hostname: bytes, port: int):
        return client_tls_options(hostname.decode("ascii"), ca_pem=self.ca_pem, client_cert=self.client_cert_pem)


__all__ = ["BCP195_CIPHERS", "HttpsPolicy", "ServerFiles", "client_tls_options",
           "pem_certificates", "server_tls_options", "stdlib_client_context", "stdlib_server_context"]
