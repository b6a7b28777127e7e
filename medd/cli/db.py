"""`medd db upgrade|current|revision`: the node's database schema (medd/storage/migrate.py)."""
from __future__ import annotations

import os
import sys

from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from medd.storage.database import make_engine
from medd.storage.migrate import SchemaRefused, alembic_config, describe, new_revision, read_state, refusal, upgrade


def add_db_commands(sub) -> None:
    group = sub.add_parser("db", help="the node's database schema: upgrade it, show its revision").add_subparsers(
        dest="db_command", required=True)
    default = os.environ.get("MEDD_CONFIG")
    config_help = "the node's config (default: $MEDD_CONFIG)"

    p = group.add_parser("upgrade", help="upgrade the database to this medd's schema (a node also does it at start)")
    p.add_argument("--config", default=default, required=default is None, help=config_help)
    p.set_defaults(func=cmd_upgrade)

    p = group.add_parser("current", help="the database's schema revision, and this medd's")
    p.add_argument("--config", default=default, required=default is None, help=config_help)
    p.set_defaults(func=cmd_current)

    p = group.add_parser("revision", help="(developers) write a new migration script into medd/storage/migrations")
    p.add_argument("-m", "--message", required=True, help="what the migration does, in a few words")
    p.add_argument("--autogenerate", action="store_true",
                   help="draft it from what the models have that the migrations do not make yet")
    p.set_defaults(func=cmd_revision)


def _engine(args) -> Engine:
    from medd.config import load_config

    return make_engine(load_config(args.config).database_url)


def cmd_upgrade(args) -> int:
    engine = _engine(args)
    try:
        upgraded = upgrade(engine)
    except SchemaRefused as e:
        print(f"medd: {e}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    where = engine.url.render_as_string(hide_password=True)
    if upgraded.changed:
        print(f"{where}: upgraded from {describe(upgraded.before)} to {upgraded.revision}")
    else:
        print(f"{where}: already at {upgraded.revision} (head)")
    return 0


def cmd_current(args) -> int:
    engine = _engine(args)
    try:
        with engine.connect() as conn:
            state = read_state(conn)
    finally:
        engine.dispose()
    where = engine.url.render_as_string(hide_password=True)
    script = ScriptDirectory.from_config(alembic_config())
    newest = script.get_current_head()
    reason = refusal(state, script, where)
    if reason:
        print(f"{where}: {describe(state)}\nmedd: {reason}", file=sys.stderr)
        return 2
    if state.revisions == (newest,):
        print(f"{where}: {newest} (head)")
    else:
        print(f"{where}: {describe(state)}; this medd's head is {newest} (medd db upgrade, or starting the node, "
              f"upgrades it)")
    return 0


def cmd_revision(args) -> int:
    new_revision(args.message, args.autogenerate)  # Alembic says which file it wrote
    return 0
