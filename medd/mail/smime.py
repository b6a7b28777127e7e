"""S/MIME for packages (DICOM PS3.15 Annex B.8, RFC 8551): signed with the sender's key, then
encrypted to the recipient's certificate, as ``application/pkcs7-mime`` that mail clients open.

:func:`protect` signs the whole package (opaque signed-data, SHA-256) and envelops that entity for the
recipient (AES-256-CBC; RSA key transport, the one cryptography offers: RFC 8551 2.3 still lists
RSA PKCS #1 v1.5 beside RSAES-OAEP). The outer message keeps From, To, Date, Message-ID and
``Medd-Attachment`` readable, as the package format says; the receiver trusts none of them until
:func:`unprotect` has decrypted the envelope and verified the signature against the sender's
registered certificate.

cryptography signs, encrypts and decrypts; it does not verify CMS signatures, so verification is
OpenSSL's own ``openssl cms -verify``, given the registered certificate as the only possible
signer (``-nointern``). Nothing here parses ASN.1 itself.
"""
from __future__ import annotations

import base64
import re
import email
import email.policy
import email.utils
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.serialization import pkcs7

from medd.mail.fragments import content_type_of, header_block
from medd.package import HEADER

OPENSSL = "openssl"
SMIME_TYPE = "application/pkcs7-mime"
_FOLD = re.compile(r"\r?\n(?=[ \t])")


class NotProtected(Exception):
    """The message is not S/MIME: no ``application/pkcs7-mime`` envelope."""


class SmimeRefused(Exception):
    """An S/MIME message that cannot be accepted: the reason says why (bad envelope, bad or unknown
    signature, a signer other than the sender)."""


@dataclass(frozen=True)
class SmimeIdentity:
    """A node's own certificate and private key (PEM), for signing and decrypting."""

    certificate: x509.Certificate
    key: object

    @classmethod
    def from_files(cls, certificate: str, private_key: str) -> "SmimeIdentity":
        """Blocking: read both PEM files."""
        cert = x509.load_pem_x509_certificate(Path(certificate).read_bytes())
        key = serialization.load_pem_private_key(Path(private_key).read_bytes(), password=None)
        return cls(cert, key)


def _entity(content_type: str, der: bytes) -> bytes:
    body = base64.encodebytes(der).replace(b"\n", b"\r\n")
    return (f"Content-Type: {content_type}; name=smime.p7m\r\nContent-Transfer-Encoding: base64\r\n"
            "Content-Disposition: attachment; filename=smime.p7m\r\n\r\n").encode("ascii") + body


def _headers(data: bytes):
    header, end = header_block(data, SmimeRefused)
    return header, data[end:]


def protect(package: bytes, signer: SmimeIdentity, recipient: x509.Certificate) -> bytes:
    """Blocking: ``package`` signed by ``signer`` and encrypted to ``recipient``, as one message
    whose outer header repeats the package's envelope headers."""
    signed = (pkcs7.PKCS7SignatureBuilder().set_data(package)
              .add_signer(signer.certificate, signer.key, hashes.SHA256())
              .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary]))
    inner = _entity(f"{SMIME_TYPE}; smime-type=signed-data", signed)
    enveloped = (pkcs7.PKCS7EnvelopeBuilder().set_data(inner).add_recipient(recipient)
                 .set_content_encryption_algorithm(algorithms.AES256)
                 .encrypt(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary]))
    header, _ = _headers(package)
    # Unfolded: the values are written back on one line each.
    outer = b"".join(f"{name}: {_FOLD.sub('', header[name])}\r\n".encode("ascii")
                     for name in ("From", "To", "Date", "Message-ID", HEADER) if header[name])
    return outer + b"MIME-Version: 1.0\r\n" + _entity(f"{SMIME_TYPE}; smime-type=enveloped-data", enveloped)


def is_protected(data: bytes) -> bool:
    """Whether the message's top-level type is ``application/pkcs7-mime`` (header block only)."""
    return content_type_of(data) == SMIME_TYPE


def sender_of(data: bytes) -> str:
    """The (claimed) From address of a message, lower case."""
    header, _ = _headers(data)
    return email.utils.parseaddr(header.get("From", ""))[1].strip().lower()


def _der_of(data: bytes, smime_type: str) -> bytes:
    header, body = _headers(data)
    if header.get_content_type() != SMIME_TYPE:
        raise NotProtected(f"the message is {header.get_content_type()}, not S/MIME")
    if (header.get_param("smime-type") or "").lower() != smime_type:
        raise SmimeRefused(f"expected an S/MIME {smime_type}, found {header.get_param('smime-type')!r}")
    if (header.get("Content-Transfer-Encoding") or "").strip().lower() != "base64":
        raise SmimeRefused("the S/MIME part must be base64")
    try:
        return base64.b64decode(b"".join(body.split()), validate=True)
    except ValueError as e:
        raise SmimeRefused(f"the S/MIME part is not valid base64: {e}") from e


def verify_signed(signed_der: bytes, certificate_pem: bytes) -> bytes:
    """Blocking: the content of ``signed_der`` (CMS signed-data) if and only if it carries a valid
    signature by the key of ``certificate_pem`` (OpenSSL's ``cms -verify``, that certificate the only
    signer it considers, no chain: the registration is the trust)."""
    with tempfile.TemporaryDirectory(prefix="medd-smime-") as folder:
        cert = Path(folder) / "signer.pem"
        cert.write_bytes(certificate_pem)
        done = subprocess.run(
            [OPENSSL, "cms", "-verify", "-inform", "DER", "-binary", "-nointern", "-noverify",
             "-certfile", str(cert)],
            input=signed_der, capture_output=True, timeout=120)
    if done.returncode != 0:
        detail = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise SmimeRefused("the S/MIME signature does not verify against the sender's registered certificate"
                           + (f" ({detail[0][:200]})" if detail else ""))
    return done.stdout


def unprotect(data: bytes, own: SmimeIdentity, certificate_of) -> tuple[bytes, str]:
    """Blocking: (the package, the verified signer's address) from an S/MIME message.

    ``certificate_of(address)`` gives the PEM registered for the message's From, or None. Raises
    :class:`NotProtected` for a message that is not S/MIME and :class:`SmimeRefused` for one that
    does not decrypt, is not signed, is signed by another key than the sender's registered one, or
    whose signed package names another sender."""
    enveloped = _der_of(data, "enveloped-data")
    sender = sender_of(data)
    try:
        inner = pkcs7.pkcs7_decrypt_der(enveloped, own.certificate, own.key, [])
    except (ValueError, TypeError) as e:
        raise SmimeRefused(f"the S/MIME envelope cannot be decrypted with this node's key: {e}") from e
    try:
        signed = _der_of(inner, "signed-data")
    except NotProtected as e:
        raise SmimeRefused("the encrypted package is not signed") from e
    except SmimeRefused as e:
        # CBC has no integrity of its own: an altered envelope decrypts to garbage, caught here or by the signature.
        raise SmimeRefused(f"the decrypted envelope holds no valid signed package (altered in transit?): {e}") from e
    registered = certificate_of(sender) if sender else None
    if registered is None:
        raise SmimeRefused(f"no S/MIME certificate is registered for {sender or 'the sender'}")
    package = verify_signed(signed, registered)
    if sender_of(package) != sender:
        raise SmimeRefused("the signed package names another sender than the message")
    return package, sender


class SmimeOpener:
    """What the ingest does with a package that arrives as S/MIME: decrypt with this node's key and
    verify the signature against the sender's registered certificate (``certificate_of``, a
    coroutine function of the address) before anything else. On ``required`` transports an unsigned
    package is refused as well."""

    def __init__(self, identity: SmimeIdentity, certificate_of, required: tuple[str, ...] = ()):
        self.identity = identity
        self.certificate_of = certificate_of
        self.required = required

    async def open(self, data: bytes, transport: str, run_blocking) -> tuple[bytes, str | None]:
        """(package, verified signer or None); :class:`~medd.ingest.Refused` ("unauthenticated")."""
        from medd.ingest import Refused

        if not is_protected(data):
            if transport in self.required:
                raise Refused(f"a package over {transport} must be S/MIME signed and encrypted "
                              "(PS3.15 B.8); this one is not", "unauthenticated")
            return data, None
        sender = sender_of(data)
        pem = await self.certificate_of(sender) if sender else None
        try:
            return await run_blocking(unprotect, data, self.identity, lambda address: pem if address == sender else None)
        except SmimeRefused as e:
            refused = Refused(str(e), "unauthenticated")
            refused.origin = sender or None
            raise refused from e
