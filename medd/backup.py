"""A node's backup, taken while it runs, and its restore into an empty node.

``medd backup --config FILE DEST`` writes ``DEST/<UTC time>/``:

- ``database.sqlite`` (SQLite's online backup API: one read transaction, so a
  consistent snapshot while the node keeps writing in WAL mode) or
  ``database.pgdump`` (``pg_dump --format=custom`` of the node's schema);
- ``blobs/ab/cd/<sha256>``: every blob in the store. A blob is written once and
  never changed, and every blob the snapshot refers to was fsync'd before its
  row was committed, so the blobs listed after the snapshot include all it
  needs. Blobs already in the previous backup are hard-linked from it (no
  copy, no space); only the new ones are copied, each hashed as it is read;
- ``manifest.json``: the SHA-256 of the database file and the digest and size
  of every blob; ``config.ini``: the node's config as it was.

The folder is built as ``DEST/.partial-<time>`` and renamed when complete, and
``DEST/latest`` then points to it: an interrupted backup never looks finished.
``medd restore --config FILE SRC`` refuses a node that holds anything, then
copies the database and every blob, checking each digest.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy.engine import make_url

from medd.progress import progress
from medd.storage.blobstore import fsync_dir

MANIFEST = "manifest.json"
FORMAT = 1
CHUNK = 1024 * 1024


class BackupError(Exception):
    """The backup or restore cannot be done; the message says why."""


@dataclass(frozen=True)
class BackupDone:
    path: Path
    blobs: int
    copied: int
    linked: int
    bytes_copied: int


@dataclass(frozen=True)
class RestoreDone:
    blobs: int
    bytes: int


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _copy_hashed(source: Path, target: Path) -> str:
    """Copy ``source`` to ``target`` (fsync'd) and return the SHA-256 of what was copied."""
    h = hashlib.sha256()
    with open(source, "rb") as src, open(target, "wb") as dst:
        while chunk := src.read(CHUNK):
            h.update(chunk)
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    return h.hexdigest()


def _blob_path(root: Path, digest: str) -> Path:
    return root / digest[:2] / digest[2:4] / digest


def _is_digest(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


def _store_blobs(store: Path) -> list[tuple[str, Path]]:
    """(digest, path) of every blob under ``store/blobs`` (the file blob store's layout)."""
    found = []
    for top in sorted(p for p in (store / "blobs").iterdir() if p.is_dir()) if (store / "blobs").is_dir() else ():
        for middle in sorted(p for p in top.iterdir() if p.is_dir()):
            for entry in os.scandir(middle):
                if _is_digest(entry.name) and entry.is_file():
                    found.append((entry.name, Path(entry.path)))
    return found


# --- databases ------------------------------------------------------------------------------------------


def _postgres_target(url) -> tuple[list[str], dict, str | None]:
    """libpq arguments, environment and schema (from ``options=-csearch_path=…``) of a SQLAlchemy URL."""
    args = ["--host", url.host or "localhost", "--port", str(url.port or 5432), "--dbname", url.database or "postgres"]
    if url.username:
        args += ["--username", url.username]
    env = dict(os.environ)
    if url.password:
        env["PGPASSWORD"] = str(url.password)
    schema = None
    options = url.query.get("options")
    for option in ([options] if isinstance(options, str) else list(options or ())):
        for part in option.split():
            if part.startswith("-csearch_path="):
                schema = part.split("=", 1)[1].split(",")[0].strip()
    return args, env, schema


def _run_pg(command: list[str], env: dict) -> str:
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise BackupError(f"{command[0]} failed: {done.stderr.strip()}")
    return done.stdout


def _backup_database(database_url: str, folder: Path) -> dict:
    url = make_url(database_url)
    if url.drivername.startswith("sqlite"):
        if not url.database or url.database == ":memory:" or not Path(url.database).exists():
            raise BackupError(f"no SQLite database at {url.database!r}")
        target = folder / "database.sqlite"
        # mode=ro: the backup never writes to the node's file. One step (pages=-1): the whole copy is one
        # read transaction, a consistent snapshot however much the node writes meanwhile (WAL).
        source = sqlite3.connect(f"file:{url.database}?mode=ro", uri=True, timeout=30)
        copy = sqlite3.connect(target)
        try:
            source.backup(copy, pages=-1)
            copy.execute("PRAGMA journal_mode=DELETE")
            if copy.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise BackupError("the copy of the database failed SQLite's quick_check")
        finally:
            copy.close()
            source.close()
        with open(target, "rb+") as f:
            os.fsync(f.fileno())
        return {"kind": "sqlite", "file": target.name, "sha256": _sha256_file(target)}
    if url.get_backend_name() == "postgresql":
        args, env, schema = _postgres_target(url)
        target = folder / "database.pgdump"
        command = ["pg_dump", "--format=custom", "--no-owner", "--file", str(target), *args]
        if schema:
            command += ["--schema", schema]
        _run_pg(command, env)
        return {"kind": "postgresql", "file": target.name, "sha256": _sha256_file(target), "schema": schema}
    raise BackupError(f"medd backs up SQLite and PostgreSQL databases, not {url.get_backend_name()}")


def _database_is_empty(database_url: str) -> bool:
    from sqlalchemy import create_engine, inspect

    url = make_url(database_url)
    if url.drivername.startswith("sqlite"):
        path = Path(url.database or "")
        return not path.exists() or path.stat().st_size == 0
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return not inspect(conn).get_table_names()
    finally:
        engine.dispose()


def _restore_database(database_url: str, source: Path, entry: dict) -> None:
    url = make_url(database_url)
    kind = entry["kind"]
    if url.drivername.startswith("sqlite"):
        if kind != "sqlite":
            raise BackupError(f"this backup holds a {kind} database; the node's is SQLite")
        target = Path(url.database)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".restoring")
        shutil.copyfile(source, partial)
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, target)
        fsync_dir(target.parent)
        return
    if url.get_backend_name() == "postgresql":
        if kind != "postgresql":
            raise BackupError(f"this backup holds a {kind} database; the node's is PostgreSQL")
        args, env, schema = _postgres_target(url)
        if schema != entry.get("schema"):
            raise BackupError(f"the backup is of schema {entry.get('schema')!r}; the node's search_path names "
                              f"{schema!r} (pg_restore recreates the schema it was taken from)")
        restore_args = ["--no-owner", "--exit-on-error", "--single-transaction", *args]
        if schema:
            # Into the schema as the site made it (owner, grants): created only if absent, and the dump's
            # own CREATE SCHEMA left out of the restore list.
            from sqlalchemy import create_engine
            from sqlalchemy import text as sql

            engine = create_engine(database_url)
            try:
                with engine.begin() as conn:
                    conn.execute(sql(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
            finally:
                engine.dispose()
            listing = _run_pg(["pg_restore", "--list", str(source)], env)
            kept = [line for line in listing.splitlines() if not re.search(rf"\bSCHEMA - {re.escape(schema)}\b", line)]
            with tempfile.NamedTemporaryFile("w", suffix=".list") as toc:
                toc.write("\n".join(kept) + "\n")
                toc.flush()
                _run_pg(["pg_restore", *restore_args, "--use-list", toc.name, str(source)], env)
            return
        _run_pg(["pg_restore", *restore_args, str(source)], env)
        return
    raise BackupError(f"medd restores SQLite and PostgreSQL databases, not {url.get_backend_name()}")


# --- backup -----------------------------------------------------------------------------------------


def _previous(dest: Path) -> tuple[Path, dict] | None:
    latest = dest / "latest"
    if not latest.exists():
        return None
    folder = latest.resolve()
    try:
        return folder, json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def backup(config, dest: str | os.PathLike, *, show_progress: bool | None = None) -> BackupDone:
    """Back the node of ``config`` up into ``dest`` (see the module docstring); safe while it runs."""
    if (config.section("storage").get("backend", "file").strip() or "file") != "file":
        raise BackupError("medd backup copies the file blob store ([storage] backend = file) only")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for stale in dest.glob(".partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    partial = dest / f".partial-{stamp}"
    partial.mkdir()
    started = time.time()
    database = _backup_database(config.database_url, partial)
    previous = _previous(dest)
    known = previous[1].get("blobs", {}) if previous else {}
    blobs_root = partial / "blobs"
    listing = _store_blobs(config.storage_path)
    manifest_blobs: dict[str, int] = {}
    copied = linked = copied_bytes = 0
    for digest, path in progress(listing, "backup: blobs", show=show_progress):
        target = _blob_path(blobs_root, digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        if digest in known:
            try:
                os.link(_blob_path(previous[0] / "blobs", digest), target)
                manifest_blobs[digest] = known[digest]
                linked += 1
                continue
            except OSError:
                pass  # not there any more, or another file system: copy it
        try:
            got = _copy_hashed(path, target)
        except FileNotFoundError:
            continue  # removed since the listing (swept, or evicted once archived): no row needs it here
        if got != digest:
            raise BackupError(f"blob {digest} in the store is damaged (its content hashes to {got})")
        manifest_blobs[digest] = target.stat().st_size
        copied += 1
        copied_bytes += manifest_blobs[digest]
    for folder in {p.parent for p in blobs_root.glob("*/*/*")} | {p for p in blobs_root.glob("*/*")}:
        fsync_dir(folder)
    shutil.copyfile(config.path, partial / "config.ini")
    manifest = {
        "medd_backup": FORMAT, "node": config.name, "role": config.role, "started": started,
        "finished": time.time(), "database": database, "blobs": manifest_blobs,
    }
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    with open(partial / MANIFEST, "rb") as f:
        os.fsync(f.fileno())
    fsync_dir(partial)
    final = dest / stamp
    os.rename(partial, final)
    link = dest / ".latest-new"
    link.unlink(missing_ok=True)
    link.symlink_to(final.name)
    os.replace(link, dest / "latest")
    fsync_dir(dest)
    return BackupDone(final, len(manifest_blobs), copied, linked, copied_bytes)


# --- restore ----------------------------------------------------------------------------------------


def _backup_folder(src: Path) -> Path:
    if (src / MANIFEST).is_file():
        return src
    if (src / "latest" / MANIFEST).is_file():
        return (src / "latest").resolve()
    raise BackupError(f"{src} holds no medd backup ({MANIFEST} not found, nor latest/{MANIFEST})")


def restore(config, src: str | os.PathLike, *, show_progress: bool | None = None) -> RestoreDone:
    """Restore the backup in ``src`` (a backup folder, or the DEST of ``medd backup``: its latest) into the
    empty node of ``config``; :class:`BackupError` when the node holds anything or a digest is wrong."""
    folder = _backup_folder(Path(src))
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("medd_backup") != FORMAT:
        raise BackupError(f"{folder}: not a medd backup this medd can read")
    if manifest["role"] != config.role:
        raise BackupError(f"{folder} is a backup of a {manifest['role']} node; {config.path} is a {config.role} node")
    store = config.storage_path
    if _store_blobs(store):
        raise BackupError(f"the node is not empty: {store / 'blobs'} holds blobs (restore only into an empty node)")
    if not _database_is_empty(config.database_url):
        raise BackupError("the node is not empty: its database exists and is not empty "
                          "(restore only into an empty node)")
    entry = manifest["database"]
    db_file = folder / entry["file"]
    if _sha256_file(db_file) != entry["sha256"]:
        raise BackupError(f"{db_file} is damaged (its SHA-256 is not the manifest's)")
    restored_bytes = 0
    target_root = store / "blobs"
    for digest, size in progress(sorted(manifest["blobs"].items()), "restore: blobs", show=show_progress):
        target = _blob_path(target_root, digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        got = _copy_hashed(_blob_path(folder / "blobs", digest), target)
        if got != digest:
            target.unlink()
            raise BackupError(f"blob {digest} in the backup is damaged (its content hashes to {got})")
        restored_bytes += size
    for sub in {p.parent for p in target_root.glob("*/*/*")} | set(target_root.glob("*")) | {target_root, store}:
        fsync_dir(sub)
    # The database last: a node with its database is a node that is restored.
    _restore_database(config.database_url, db_file, entry)
    return RestoreDone(len(manifest["blobs"]), restored_bytes)

