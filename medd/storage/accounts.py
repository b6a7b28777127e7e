"""Reading-room users and their sessions: the :class:`Accounts` connector.

Passwords arrive here already hashed (:mod:`medd.viewer.users` hashes and
checks them). A session token is 256 random bits handed to the browser once;
the database keeps only its SHA-256, so a copy of the database logs nobody in.
Session expiry is read from the injected clock.
"""
from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.engine import Connection
from twisted.internet.defer import succeed

from medd.storage.connector import Connector, aware
from medd.storage.viewer_tables import viewer_sessions, viewer_users

SESSION_LIFETIME = timedelta(hours=12)


class UserError(ValueError):
    """A user that cannot be added as asked (and was not)."""


@dataclass(frozen=True)
class User:
    name: str
    created_at: datetime


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def add_user(conn: Connection, name: str, password_hash: str, at: datetime, *, replace: bool = False) -> None:
    exists = conn.execute(select(viewer_users.c.id).where(viewer_users.c.name == name)).first()
    if exists and not replace:
        raise UserError(f"user {name} already exists (use --replace to set a new password)")
    if exists:
        conn.execute(viewer_users.update().where(viewer_users.c.name == name).values(password_hash=password_hash))
        # A new password ends every session of the old one.
        conn.execute(delete(viewer_sessions).where(viewer_sessions.c.user == name))
    else:
        conn.execute(viewer_users.insert().values(name=name, password_hash=password_hash, created_at=at))


def users(conn: Connection) -> list[User]:
    u = viewer_users.c
    return [User(r.name, aware(r.created_at)) for r in conn.execute(select(u.name, u.created_at).order_by(u.name))]


def password_hash(conn: Connection, name: str) -> str | None:
    return conn.execute(select(viewer_users.c.password_hash).where(viewer_users.c.name == name)).scalar()


def create_session(conn: Connection, user: str, token: str, at: datetime, lifetime: timedelta) -> None:
    # Expired sessions are cleared as new ones are made; nothing else needs them.
    conn.execute(delete(viewer_sessions).where(viewer_sessions.c.expires_at <= at))
    conn.execute(viewer_sessions.insert().values(token_hash=token_hash(token), user=user, created_at=at,
                                                 expires_at=at + lifetime))


@dataclass(frozen=True)
class SessionState:
    """A live session: its user, and whether its page is locked (idle) until the password is typed again."""

    user: str
    locked: bool


def session_state(conn: Connection, token: str, at: datetime) -> SessionState | None:
    s = viewer_sessions.c
    row = conn.execute(select(s.user, s.expires_at, s.locked_at).where(s.token_hash == token_hash(token))).first()
    if row is None or aware(row.expires_at) <= at:
        return None
    return SessionState(row.user, row.locked_at is not None)


def user_for_session(conn: Connection, token: str, at: datetime) -> str | None:
    """The user of a live session that is not locked."""
    state = session_state(conn, token, at)
    return state.user if state is not None and not state.locked else None


def lock_session(conn: Connection, token: str, at: datetime | None) -> None:
    s = viewer_sessions.c
    conn.execute(viewer_sessions.update().where(s.token_hash == token_hash(token)).values(locked_at=at))


def end_session(conn: Connection, token: str) -> None:
    conn.execute(delete(viewer_sessions).where(viewer_sessions.c.token_hash == token_hash(token)))


class Accounts(Connector):
    """Users and sessions of a viewer's reading room. Every method returns a Deferred."""

    def __init__(self, database, clock, *, session_lifetime: timedelta = SESSION_LIFETIME):
        super().__init__(database, clock)
        self.session_lifetime = session_lifetime

    def add_user(self, name: str, password_hash: str, *, replace: bool = False):
        """Deferred None; fails with :class:`UserError` if the user exists and ``replace`` is false.

        Replacing a password ends the user's sessions.
        """
        at = self.now()
        return self.db.run(lambda conn: add_user(conn, name, password_hash, at, replace=replace))

    def users(self):
        """Deferred list of :class:`User`, by name."""
        return self.db.run(users)

    def password_hash(self, name: str):
        """Deferred stored hash of the user's password, or None for an unknown user."""
        return self.db.run(lambda conn: password_hash(conn, name))

    def create_session(self, user: str):
        """Deferred new session token (shown once; only its hash is stored)."""
        token = secrets.token_urlsafe(32)
        at = self.now()
        return self.db.run(lambda conn: create_session(conn, user, token, at, self.session_lifetime)).addCallback(
            lambda _: token)

    def user_for_session(self, token: str | None):
        """Deferred user of a live session, or None (no token, unknown, ended or expired)."""
        if not token:
            return succeed(None)
        at = self.now()
        return self.db.run(lambda conn: user_for_session(conn, token, at))

    def session_state(self, token: str | None):
        """Deferred :class:`SessionState` of a live session, or None (no token, unknown, ended or expired)."""
        if not token:
            return succeed(None)
        at = self.now()
        return self.db.run(lambda conn: session_state(conn, token, at))

    def lock_session(self, token: str, locked: bool = True):
        """Deferred None: the session is locked (or unlocked); a locked one serves nothing but its unlocking."""
        at = self.now() if locked else None
        return self.db.run(lambda conn: lock_session(conn, token, at))

    def end_session(self, token: str | None):
        """Deferred None; the session, if any, is ended."""
        if not token:
            return succeed(None)
        return self.db.run(lambda conn: end_session(conn, token))
