"""A content-addressed file store for object bytes.

Paths come from the SHA-256 of the content, never from UIDs or names that
came over the wire. A blob is written to a temporary file, fsync'd, renamed
into place and its directory fsync'd, so after ``put`` returns it survives a
power cut, and a crash before that leaves no half-written blob in place.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from zope.interface import implementer

from medd.plugins.hookspecs import hookimpl
from medd.plugins.interfaces import ISweepableBlobStore


@dataclass(frozen=True)
class BlobRef:
    digest: str
    size: int
    created: bool  # False when identical content was already stored


def fsync_dir(path: str | Path) -> None:
    """Make a folder's entries (files renamed or created in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@implementer(ISweepableBlobStore)
class FileBlobStore:
    """Blobs under ``<root>/blobs/ab/cd/<sha256>``; temporary files under ``<root>/tmp``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.tmp = self.root / "tmp"
        for d in (self.root, self.blobs, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        self._blobs, self._tmp = str(self.blobs), str(self.tmp)
        # Blob directories whose own entry this process has fsync'd.
        self._durable_dirs: set[str] = set()
        # Between the sweep's "old enough" and its unlink, no put may find or place
        # that blob (a re-put makes it young; a new one replaces it).
        self._sweeping = threading.Lock()
        #: Called with the seconds a new blob's fsyncs took (the node's metrics), or None.
        self.observe_fsync = None
        self._clean_tmp()

    def _clean_tmp(self) -> None:
        # Leftovers of a crash mid-write were never acknowledged.
        for leftover in self.tmp.iterdir():
            leftover.unlink(missing_ok=True)

    def path(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"not a SHA-256 digest: {digest!r}")
        return self.blobs / digest[:2] / digest[2:4] / digest

    def put(self, data: bytes) -> BlobRef:
        digest = hashlib.sha256(data).hexdigest()
        # Plain strings and os calls: this runs once per received object and
        # pathlib's object churn showed up in profiles.
        top = os.path.join(self._blobs, digest[:2])
        parent = os.path.join(top, digest[2:4])
        final = os.path.join(parent, digest)
        new_dirs = parent not in self._durable_dirs
        if new_dirs:
            os.makedirs(parent, exist_ok=True)
        with self._sweeping:
            try:
                existing = os.stat(final).st_size == len(data)
            except FileNotFoundError:
                existing = False
            if existing:
                # A re-put makes the blob young again: the sweep, which removes only
                # old blobs, then cannot take it before the caller indexes it.
                os.utime(final)
        if not existing:
            fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix="put-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    synced = time.monotonic()
                    os.fsync(f.fileno())
                    synced = time.monotonic() - synced
                with self._sweeping:
                    os.replace(tmp_name, final)
            except BaseException:
                try:
                    os.unlink(tmp_name)
                except FileNotFoundError:
                    pass
                raise
        # The directory entries, innermost first, after the file itself: on a
        # journalling file system the file's fsync commits the mkdirs too, so
        # the directory fsyncs that follow find little or nothing to write.
        # An existing blob may have been renamed into place by another put
        # that has not fsync'd its directory yet: this caller must not
        # acknowledge before that either.
        started = time.monotonic()
        fsync_dir(parent)
        if new_dirs:
            self._make_durable(top, parent)
        if self.observe_fsync is not None and not existing:
            self.observe_fsync(synced + time.monotonic() - started)
        return BlobRef(digest, len(data), created=not existing)

    def _make_durable(self, top: str, parent: str) -> None:
        """fsync the entries of ``ab/cd/`` not yet known durable.

        A directory that already existed is treated as not durable until this
        process has fsync'd its parent once, since another thread (or a run
        that crashed) may have made it without.
        """
        fsync_dir(top)
        if top not in self._durable_dirs:
            fsync_dir(self._blobs)
            self._durable_dirs.add(top)
        self._durable_dirs.add(parent)

    def get(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()

    def exists(self, digest: str) -> bool:
        return self.path(digest).exists()

    def delete(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    def stale(self, before: float, prefix: str) -> list[str]:
        top = os.path.join(self._blobs, prefix)
        found = []
        try:
            middles = os.listdir(top)
        except FileNotFoundError:
            return found
        for middle in middles:
            try:
                entries = os.scandir(os.path.join(top, middle))
            except (FileNotFoundError, NotADirectoryError):
                continue
            with entries:
                for entry in entries:
                    try:
                        if entry.is_file() and entry.stat().st_mtime < before:
                            found.append(entry.name)
                    except FileNotFoundError:
                        continue
        return found

    def delete_stale(self, digest: str, before: float) -> bool:
        path = self.path(digest)
        with self._sweeping:
            try:
                if path.stat().st_mtime >= before:
                    return False
                path.unlink()
            except FileNotFoundError:
                return False
        return True


@hookimpl
def medd_register_storage(register) -> None:
    register("blobstore", "file", lambda config: FileBlobStore(config.storage_path))
