"""Schema migrations: a new database gets exactly the models' schema, a database of an older medd
upgrades in place and keeps its rows, one of a newer medd is refused; on SQLite and PostgreSQL."""
from __future__ import annotations

import shutil
import threading

import pytest
import pytest_twisted
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, select, text
from sqlalchemy.engine import make_url

from medd.cli import main
from medd.storage import migrate
from medd.storage.database import Database, make_engine
from medd.storage.schema import all_tables
from tests.conftest import write_config
from tests.legacy_schema import AT, make_legacy_database

HEAD = "0016_smime"
#: The number the next revision script gets.
NEXT = f"{int(HEAD[:4]) + 1:04d}"


def _upgrade(url: str) -> migrate.SchemaState:
    """What a node does at start, through the same call."""
    db = Database(None, url)
    try:
        db.create_schema()
        with db.engine.connect() as conn:
            return migrate.read_state(conn)
    finally:
        db.stop()


def _inspect(url: str, fn):
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return fn(conn)
    finally:
        engine.dispose()


def _drift(conn) -> list:
    """What the models declare that the database lacks, or the reverse (Alembic's autogenerate diff)."""
    return compare_metadata(MigrationContext.configure(conn), all_tables())


def _rows(url: str, legacy) -> dict[str, list[tuple]]:
    """Every row of the legacy tables, their columns only, in primary-key order."""
    def read(conn):
        return {t.name: [tuple(r) for r in conn.execute(select(t).order_by(*t.primary_key.columns))]
                for t in legacy.sorted_tables if t.name != "medd_schema"}

    return _inspect(url, read)


def test_new_database_has_the_models_schema(db_url):
    """Migrating an empty database to head makes every table, column, index and constraint the models
    declare and nothing else (so models and migrations cannot drift apart), with no medd_schema left."""
    state = _upgrade(db_url)
    assert state == migrate.SchemaState(revisions=(HEAD,))
    assert _inspect(db_url, _drift) == []
    names = set(_inspect(db_url, lambda c: inspect(c).get_table_names()))
    assert names == set(all_tables().tables) | {"alembic_version"}


@pytest_twisted.ensureDeferred
async def test_previous_release_database_upgrades_at_node_start(make_central, db_url):
    """A database made by the previous release (schema version 4 in medd_schema, no Alembic) is adopted
    and upgraded when a central node starts on it: its rows are all still there, and its schema is the
    models'."""
    legacy = make_legacy_database(db_url, 4)
    before = _rows(db_url, legacy)
    node = await make_central(db_url=db_url)
    assert await node.database.run(migrate.read_state) == migrate.SchemaState(revisions=(HEAD,))
    assert await node.database.run(_drift) == []
    assert _rows(db_url, legacy) == before


@pytest.mark.parametrize("version", [2, 3])
def test_older_versions_upgrade(db_url, version):
    """Databases of schema versions 2 (no outbox index) and 3 (no viewers.client_cert_sha256) get what
    they lacked and keep their rows; new rows take fresh ids."""
    legacy = make_legacy_database(db_url, version)
    before = _rows(db_url, legacy)
    assert _upgrade(db_url) == migrate.SchemaState(revisions=(HEAD,))
    assert _inspect(db_url, _drift) == []
    assert _rows(db_url, legacy) == before

    tables = all_tables().tables
    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(tables["viewers"].update().values(client_cert_sha256="f" * 64))
            conn.execute(tables["centres"].insert().values(name="centre-b", created_at=AT))
            indexes = {i["name"] for i in inspect(conn).get_indexes("deliveries")}
            assert conn.execute(select(tables["centres"].c.id).where(tables["centres"].c.name == "centre-b")).scalar() == 2
    finally:
        engine.dispose()
    assert "ix_deliveries_destination_state" in indexes


def test_database_of_a_newer_medd_is_refused(db_url):
    """A database at a revision this medd has no script of (a newer medd upgraded it) is refused at
    start with a message naming the revision and what to do, and is left as it was."""
    _upgrade(db_url)
    _inspect(db_url, lambda c: (c.execute(text("UPDATE alembic_version SET version_num = '0042_from_the_future'")),
                                c.commit()))
    with pytest.raises(migrate.SchemaRefused) as refused:
        _upgrade(db_url)
    message = str(refused.value)
    assert "0042_from_the_future" in message and "newer medd" in message and "backup" in message
    assert _inspect(db_url, migrate.read_state) == migrate.SchemaState(revisions=("0042_from_the_future",))


@pytest.mark.parametrize("recorded, words", [
    (None, "no record of their schema version"),  # version 1: tables but no medd_schema
    (7, "medd schema version 7; this medd upgrades versions 2 to 4"),
])
def test_legacy_database_it_cannot_upgrade_is_refused(db_url, recorded, words):
    """A database from before medd recorded schema versions, or with a version this medd has no
    revision for, is refused with a message that says so, and nothing is changed."""
    legacy = make_legacy_database(db_url, 4)
    if recorded is None:
        _inspect(db_url, lambda c: (legacy.tables["medd_schema"].drop(c), c.commit()))
    else:
        _inspect(db_url, lambda c: (c.execute(text(f"UPDATE medd_schema SET version = {recorded}")), c.commit()))
    with pytest.raises(migrate.SchemaRefused, match=words):
        _upgrade(db_url)
    assert "alembic_version" not in _inspect(db_url, lambda c: inspect(c).get_table_names())


def test_nodes_starting_together_migrate_once(db_url):
    """Two nodes that start at the same moment on one empty database (central nodes sharing
    PostgreSQL) do not both run the migrations: one does, the other then finds the schema at head."""
    url = make_url(db_url)
    if url.get_backend_name() == "postgresql":
        # Should the lock ever go, the second node's DDL waits on the first's: fail then, don't hang.
        url = url.update_query_dict({"options": url.query["options"] + " -c lock_timeout=10s"})
    barrier = threading.Barrier(2)
    results, errors = [], []

    def start():
        db = Database(None, url.render_as_string(hide_password=False))
        try:
            barrier.wait(timeout=10)
            results.append(migrate.upgrade(db.engine))
        except Exception as e:  # reported below, with the other thread's outcome
            errors.append(e)
        finally:
            db.stop()

    threads = [threading.Thread(target=start, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert sorted(r.changed for r in results) == [False, True]
    assert _inspect(db_url, lambda c: c.execute(text("SELECT version_num FROM alembic_version")).all()) == [(HEAD,)]


def test_medd_db_commands(db_url, tmp_path, capsys):
    """`medd db current` tells a database of the previous release from one at head, `medd db upgrade`
    upgrades it (once), and both exit 2 with the reason for a database this medd refuses."""
    ini = str(write_config(tmp_path, db_url=db_url))
    make_legacy_database(db_url, 4)

    assert main(["db", "current", "--config", ini]) == 0
    assert "medd schema version 4 (before Alembic)" in capsys.readouterr().out
    assert main(["db", "upgrade", "--config", ini]) == 0
    assert f"upgraded from medd schema version 4 (before Alembic) to {HEAD}" in capsys.readouterr().out
    assert main(["db", "upgrade", "--config", ini]) == 0
    assert f"already at {HEAD}" in capsys.readouterr().out
    assert main(["db", "current", "--config", ini]) == 0
    assert f"{HEAD} (head)" in capsys.readouterr().out

    _inspect(db_url, lambda c: (c.execute(text("UPDATE alembic_version SET version_num = '0042_x'")), c.commit()))
    assert main(["db", "upgrade", "--config", ini]) == 2
    assert "0042_x, which this medd does not know" in capsys.readouterr().err
    assert main(["db", "current", "--config", ini]) == 2


def test_new_revision_script(tmp_path):
    """`medd db revision -m … --autogenerate` writes the next numbered script after head, drafted from
    what the models have that the migrations do not make yet."""
    from sqlalchemy import Column, Integer, String, Table

    scripts = tmp_path / "migrations"
    shutil.copytree(migrate.MIGRATIONS, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    metadata = all_tables()
    notes = Table("study_notes", metadata, Column("id", Integer, primary_key=True), Column("text", String(200)))
    try:
        path = migrate.new_revision("Add study notes!", autogenerate=True, script_location=scripts)
    finally:
        metadata.remove(notes)
    assert path == scripts / "versions" / f"{NEXT}_add_study_notes.py"
    written = path.read_text()
    assert f"revision = '{NEXT}_add_study_notes'" in written and f"down_revision = '{HEAD}'" in written
    assert "op.create_table('study_notes'" in written


def test_failed_upgrade_changes_nothing(db_url, tmp_path):
    """The adoption and every migration run in one transaction, on SQLite too: a migration that fails
    halfway leaves the database as the previous release left it, to be upgraded again once fixed."""
    scripts = tmp_path / "migrations"
    shutil.copytree(migrate.MIGRATIONS, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    (scripts / "versions" / f"{NEXT}_fails.py").write_text(
        "import sqlalchemy as sa\nfrom alembic import op\n\n"
        f"revision = '{NEXT}_fails'\ndown_revision = '{HEAD}'\n\n\n"
        "def upgrade():\n"
        "    op.create_table('half_done', sa.Column('id', sa.Integer(), primary_key=True))\n"
        "    raise RuntimeError('disk full')\n"
    )
    legacy = make_legacy_database(db_url, 4)
    before = _rows(db_url, legacy)
    engine = make_engine(db_url)
    try:
        with pytest.raises(RuntimeError, match="disk full"):
            migrate.upgrade(engine, scripts)
    finally:
        engine.dispose()
    assert _inspect(db_url, migrate.read_state) == migrate.SchemaState(legacy_version=4)
    assert set(_inspect(db_url, lambda c: inspect(c).get_table_names())) == set(legacy.tables)
    assert _rows(db_url, legacy) == before
