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
from dataclasses import dataclass
from pathlib import Path

from zope.interface import implementer

from medd.plugins.hookspecs import hookimpl
from medd.plugins.interfaces import IBlobStore


@dataclass(frozen=True)
class BlobRef:
    digest: str
    size: int
    created: bool  # False when identical content was already stored


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@implementer(IBlobStore)
class FileBlobStore:
    """Blobs under ``<root>/blobs/ab/cd/<sha256>``; temporary files under ``<root>/tmp``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.tmp = self.root / "tmp"
        for d in (self.root, self.blobs, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
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
        final = self.path(digest)
        if final.exists() and final.stat().st_size == len(data):
            return BlobRef(digest, len(data), created=False)
        parent = final.parent
        if not parent.is_dir():
            parent.mkdir(parents=True, exist_ok=True)
            _fsync_dir(parent.parent)
            _fsync_dir(parent.parent.parent)
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp, prefix="put-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_name, final)
        except BaseException:
            try:
                os.unlink(tmp_name)
            except FileNotFoundError:
                pass
            raise
        _fsync_dir(parent)
        return BlobRef(digest, len(data), created=True)

    def get(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()

    def exists(self, digest: str) -> bool:
        return self.path(digest).exists()

    def delete(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)


@hookimpl
def medd_register_storage(register) -> None:
    register("blobstore", "file", lambda config: FileBlobStore(config.storage_path))
