"""`medd users add|list`: the reading-room users of a viewer node."""
from __future__ import annotations

import getpass
import os
import sys

from medd.config import load_config
from medd.storage.accounts import Accounts
from medd.storage.database import WallClock, open_database, resolved
from medd.viewer.users import UserError, add_user

DEFAULT_CONFIG = os.environ.get("MEDD_CONFIG", "etc/viewer.ini")


def _read_password(args) -> str:
    if args.password_file:
        with open(args.password_file, encoding="utf-8") as f:
            # The first line: a trailing newline from an editor is not part of the password.
            return f.readline().rstrip("\r\n")
    first = getpass.getpass(f"password for {args.name}: ")
    if getpass.getpass("again: ") != first:
        raise UserError("the passwords differ")
    return first


def _with_accounts(args, fn):
    db = open_database(load_config(args.config))
    try:
        return resolved(fn(Accounts(db, WallClock())))
    finally:
        db.stop()


def users_add(args) -> int:
    try:
        password = _read_password(args)
        _with_accounts(args, lambda accounts: add_user(accounts, args.name, password, replace=args.replace))
        from medd.cli.audit import record_credential_change

        record_credential_change(args.config, "reading-room password " + ("replaced" if args.replace else "set"),
                                 args.name, "U" if args.replace else "C")
    except (UserError, OSError) as e:
        print(f"medd: {e}", file=sys.stderr)
        return 2
    print(f"user {args.name} {'updated' if args.replace else 'added'}", file=sys.stderr)
    return 0


def users_list(args) -> int:
    for user in _with_accounts(args, lambda accounts: accounts.users()):
        print(user.name)
    return 0


def add_user_commands(sub) -> None:
    """``medd users add|list`` on a viewer node's database."""
    group = sub.add_parser("users", help="reading-room users of a viewer node").add_subparsers(
        dest="users_command", required=True)
    p = group.add_parser("add", help="add a reading-room user (asks for the password unless --password-file)")
    p.add_argument("name")
    p.add_argument("--password-file", metavar="FILE", help="read the password from the first line of FILE")
    p.add_argument("--replace", action="store_true", help="set a new password for an existing user")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="the viewer's config (default: $MEDD_CONFIG or etc/viewer.ini)")
    p.set_defaults(func=users_add)
    p = group.add_parser("list", help="list reading-room users")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.set_defaults(func=users_list)
