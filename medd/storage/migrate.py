"""Bringing a node's index to this medd's schema with Alembic, and the ``medd db`` commands.

The migration scripts live in medd/storage/migrations/versions. A database made
before medd used Alembic recorded its schema version in ``medd_schema``; it is
adopted (stamped at the revision of that version) and then upgraded like any other.
"""
from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine
from twisted.logger import Logger

from medd.storage.database import make_engine

MIGRATIONS = Path(__file__).with_name("migrations")

# The revision that stands for each schema version a medd before Alembic recorded.
# Version 1 (tables, no medd_schema) predates the baseline and differs from build to build.
LEGACY_REVISIONS = {
    2: "0002_baseline",
    3: "0003_deliveries_outbox_index",
    4: "0004_viewers_client_cert",
}

# Key of the PostgreSQL advisory lock that one node migrating holds; the same for every
# medd, so central nodes that share a database and start together migrate one at a time.
MIGRATION_LOCK = 0x6D6564642D646220  # b"medd-db "

log = Logger()


class SchemaRefused(RuntimeError):
    """The database cannot be brought to this medd's schema; the message says why and what to do."""


@dataclass(frozen=True)
class SchemaState:
    """What a database records about its schema."""

    # Alembic's revision(s); empty before Alembic and in a new database.
    revisions: tuple[str, ...] = ()
    # medd_schema.version of a database from before Alembic.
    legacy_version: int | None = None
    # medd's tables without any record of their version (schema version 1).
    unversioned: bool = False


@dataclass(frozen=True)
class Upgraded:
    """What :func:`upgrade` did."""

    before: SchemaState
    revision: str

    @property
    def changed(self) -> bool:
        return self.before.revisions != (self.revision,)


def alembic_config(connection: Connection | None = None, script_location: Path = MIGRATIONS) -> Config:
    """Alembic's configuration, built here rather than read from an alembic.ini."""
    config = Config()
    config.set_main_option("script_location", str(script_location))
    # versions/0005_drop_medd_schema.py: the file is named for its revision id alone.
    config.set_main_option("file_template", "%%(rev)s")
    config.attributes["connection"] = connection
    return config


def read_state(connection: Connection) -> SchemaState:
    """What the database records about its schema (reads only)."""
    names = set(inspect(connection).get_table_names())
    if "alembic_version" in names:
        return SchemaState(revisions=tuple(MigrationContext.configure(connection).get_current_heads()))
    if "medd_schema" in names:
        return SchemaState(legacy_version=connection.execute(text("SELECT version FROM medd_schema")).scalar())
    return SchemaState(unversioned="objects" in names)


def refusal(state: SchemaState, script: ScriptDirectory, where: str) -> str | None:
    """Why this medd cannot upgrade a database in ``state``, or None when it can."""
    known = {r.revision for r in script.walk_revisions()}
    unknown = [r for r in state.revisions if r not in known]
    if unknown:
        return (f"the database at {where} is at schema revision {', '.join(unknown)}, which this medd does not "
                f"know: a newer medd upgraded it. Run that medd (or a newer one), or restore the backup taken "
                f"before that upgrade")
    if state.unversioned:
        return (f"the database at {where} has medd's tables but no record of their schema version: a medd from "
                f"before schema versions were recorded made it, and this medd cannot upgrade it. Start the node "
                f"on an empty database")
    if state.legacy_version is not None and state.legacy_version not in LEGACY_REVISIONS:
        return (f"the database at {where} has medd schema version {state.legacy_version}; this medd upgrades "
                f"versions {min(LEGACY_REVISIONS)} to {max(LEGACY_REVISIONS)} only. Start the node on an empty "
                f"database")
    return None


def upgrade(engine: Engine, script_location: Path = MIGRATIONS) -> Upgraded:
    """Bring the database to the newest revision, in one transaction (blocking).

    A new database is created by the migrations; one from before Alembic is
    adopted first. Raises :class:`SchemaRefused` for a database this medd
    cannot upgrade, changing nothing.
    """
    where = engine.url.render_as_string(hide_password=True)
    with engine.connect() as conn:
        _lock(conn)
        config = alembic_config(conn, script_location)
        script = ScriptDirectory.from_config(config)
        before = read_state(conn)
        reason = refusal(before, script, where)
        if reason:
            raise SchemaRefused(reason)
        if before.legacy_version is not None:
            MigrationContext.configure(conn).stamp(script, LEGACY_REVISIONS[before.legacy_version])
        command.upgrade(config, "head")
        conn.commit()
    upgraded = Upgraded(before, script.get_current_head())
    if upgraded.changed:
        log.info("database {db}: schema upgraded from {before} to {after}",
                 db=where, before=describe(before), after=upgraded.revision)
    return upgraded


def _lock(conn: Connection) -> None:
    """Begin the migration's transaction, alone among the nodes that share the database."""
    if conn.dialect.name == "postgresql":
        # Held until the transaction ends: a second node waits here, then finds the schema at head.
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
    elif conn.dialect.name == "sqlite":
        # Take the write lock now rather than at the first write, and make the DDL part of
        # the transaction (pysqlite would otherwise run it outside any).
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def describe(state: SchemaState) -> str:
    """``state`` in a few words, for people."""
    if state.revisions:
        return ", ".join(state.revisions)
    if state.legacy_version is not None:
        return f"medd schema version {state.legacy_version} (before Alembic)"
    if state.unversioned:
        return "medd schema version 1 (before versions were recorded)"
    return "an empty database"


def new_revision(message: str, autogenerate: bool, script_location: Path = MIGRATIONS) -> Path:
    """Write the next migration script (for developers); with ``autogenerate`` it holds
    what the models have that the migrations do not yet make (review it, it is a draft)."""
    with tempfile.TemporaryDirectory() as folder:
        engine = make_engine(f"sqlite:///{folder}/head.sqlite")
        try:
            upgrade(engine, script_location)
            with engine.connect() as conn:
                config = alembic_config(conn, script_location)
                revision_id = next_revision_id(ScriptDirectory.from_config(config), message)
                written = command.revision(config, message=message, autogenerate=autogenerate, rev_id=revision_id)
        finally:
            engine.dispose()
    return Path(written.path)


def next_revision_id(script: ScriptDirectory, message: str) -> str:
    """``0006_add_study_notes``: the next number, then the message in a few words."""
    numbers = [int(m.group(1)) for r in script.walk_revisions() if (m := re.match(r"(\d+)_", r.revision))]
    slug = re.sub(r"[^a-z0-9]+", "_", message.lower()).strip("_")[:40].rstrip("_")
    return f"{max(numbers, default=0) + 1:04d}_{slug}"
