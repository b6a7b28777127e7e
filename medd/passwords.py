"""Password hashes (scrypt, per-user salt) and their checks: the reading room's users and the
console's administrators both keep theirs so."""
from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os

__all__ = ["check_hash", "hash_password", "verify_password"]

# scrypt cost: ~16 MiB and some tens of ms per check; stored with each hash
# so it can be raised later without invalidating existing passwords.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    b64 = lambda b: base64.b64encode(b).decode("ascii")  # noqa: E731
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt)}${b64(digest)}"


def verify_password(stored: str, password: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                                dklen=len(expected), maxmem=256 * 1024 * 1024)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


# A hash to check against when the user does not exist, so that a wrong name
# takes as long as a wrong password.
@functools.cache
def _dummy_hash() -> str:
    return hash_password("medd-no-such-user", salt=b"\0" * 16)


def check_hash(stored: str | None, password: str) -> bool:
    """True if ``stored`` is a user's hash and ``password`` matches it (slow either way)."""
    ok = verify_password(stored if stored is not None else _dummy_hash(), password)
    return ok and stored is not None
