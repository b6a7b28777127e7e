"""Reading-room users: password hashes (scrypt, per-user salt) and sessions.

Functions take a SQLAlchemy connection (run them through ``Database.run``);
``medd users`` (:mod:`medd.cli.users`) manages them from the shell.
A session token is 256 random bits handed to the browser once; the database
keeps only its SHA-256, so a copy of the database logs nobody in.
"""
from __future__ import annotations

import base64
import functools
import getpass
import hashlib
import hmac
import os
import secrets
import sys
from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, select
from sqlalchemy.engine import Connection

from medd.storage.viewer_tables import viewer_sessions, viewer_users

# scrypt cost: ~16 MiB and some tens of ms per check; stored with each hash
# so it can be raised later without invalidating existing passwords.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SESSION_LIFETIME = timedelta(hours=12)
MAX_NAME = 64


class UserError(ValueError):
    """A user that cannot be added as asked (and was not)."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _aware(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; they were written in UTC.
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


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


def add_user(conn: Connection, name: str, password: str, *, replace: bool = False) -> None:
    name = name.strip()
    if not name or len(name) > MAX_NAME or any(c.isspace() or not c.isprintable() for c in name):
        raise UserError(f"a user name is 1 to {MAX_NAME} printable characters without spaces, not {name!r}")
    if not password:
        raise UserError("the password is empty")
    exists = conn.execute(select(viewer_users.c.id).where(viewer_users.c.name == name)).first()
    if exists and not replace:
        raise UserError(f"user {name} already exists (use --replace to set a new password)")
    hashed = hash_password(password)
    if exists:
        conn.execute(viewer_users.update().where(viewer_users.c.name == name).values(password_hash=hashed))
        # A new password ends every session of the old one.
        conn.execute(delete(viewer_sessions).where(viewer_sessions.c.user == name))
    else:
        conn.execute(viewer_users.insert().values(name=name, password_hash=hashed, created_at=_now()))


def list_users(conn: Connection) -> list[str]:
    return list(conn.execute(select(viewer_users.c.name).order_by(viewer_users.c.name)).scalars())


# A hash to check against when the user does not exist, so that a wrong name
# takes as long as a wrong password.
@functools.cache
def _dummy_hash() -> str:
    return hash_password("medd-no-such-user", salt=b"\0" * 16)


def password_hash(conn: Connection, name: str) -> str | None:
    row = conn.execute(select(viewer_users.c.password_hash).where(viewer_users.c.name == name)).first()
    return row.password_hash if row else None


def check_hash(stored: str | None, password: str) -> bool:
    """True if ``stored`` is a user's hash and ``password`` matches it (slow either way)."""
    ok = verify_password(stored if stored is not None else _dummy_hash(), password)
    return ok and stored is not None


def check_password(conn: Connection, name: str, password: str) -> bool:
    """True if ``name`` is a user and ``password`` is theirs."""
    return check_hash(password_hash(conn, name), password)


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_session(conn: Connection, user: str, *, lifetime: timedelta = SESSION_LIFETIME, now: datetime | None = None) -> str:
    """A new session token for ``user`` (shown once; only its hash is stored)."""
    now = now or _now()
    token = secrets.token_urlsafe(32)
    # Expired sessions are cleared as new ones are made; nothing else needs them.
    conn.execute(delete(viewer_sessions).where(viewer_sessions.c.expires_at < now))
    conn.execute(viewer_sessions.insert().values(token_hash=_token_hash(token), user=user, created_at=now,
                                                 expires_at=now + lifetime))
    return token


def user_for_session(conn: Connection, token: str | None, *, now: datetime | None = None) -> str | None:
    """The user of a live session, or None (unknown, ended or expired)."""
    if not token:
        return None
    row = conn.execute(select(viewer_sessions.c.user, viewer_sessions.c.expires_at)
                       .where(viewer_sessions.c.token_hash == _token_hash(token))).first()
    if row is None or _aware(row.expires_at) <= (now or _now()):
        return None
    return row.user


def end_session(conn: Connection, token: str | None) -> None:
    if token:
        conn.execute(delete(viewer_sessions).where(viewer_sessions.c.token_hash == _token_hash(token)))
