"""Reading-room users: password hashes (scrypt, per-user salt) and their checks.

The users and sessions themselves are stored by the
:class:`~medd.storage.accounts.Accounts` connector; ``medd users``
(:mod:`medd.cli.users`) manages them from the shell.
"""
from __future__ import annotations

from medd.passwords import check_hash, hash_password, verify_password
from medd.storage.accounts import UserError

__all__ = ["UserError", "add_user", "check_hash", "hash_password", "verify_password"]

MAX_NAME = 64


def add_user(accounts, name: str, password: str, *, replace: bool = False):
    """Check the name and password, hash the password and store the user through ``accounts``
    (an :class:`~medd.storage.accounts.Accounts`); a Deferred. Raises :class:`UserError` at once for a
    bad name or an empty password."""
    name = name.strip()
    if not name or len(name) > MAX_NAME or any(c.isspace() or not c.isprintable() for c in name):
        raise UserError(f"a user name is 1 to {MAX_NAME} printable characters without spaces, not {name!r}")
    if not password:
        raise UserError("the password is empty")
    return accounts.add_user(name, hash_password(password), replace=replace)
