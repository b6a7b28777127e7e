"""The tape archive backend: append-only POSIX pax tar volumes per imaging centre and modality.

A volume is ``<root>/<centre>/<modality>/vol-NNNNNN.tar``. Members are only
ever appended (``O_APPEND``, no seek on write) and a closed volume is never
written again, so the same writer suits a folder of volume files and, later,
a sequential device. Each volume stays readable with plain ``tar``.

The catalogue in the database, not this module, knows how far a volume is
committed; bytes past that point are the remains of an append that a crash
interrupted and are dropped before the next append.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

from twisted.logger import Logger
from zope.interface import implementer

from medd.plugins.hookspecs import hookimpl
from medd.plugins.interfaces import IArchive
from medd.storage.blobstore import fsync_dir

log = Logger()

BLOCK = 512
# Two zero blocks end a tar archive; written once, when a volume is closed.
END_OF_ARCHIVE = bytes(2 * BLOCK)
READ_CHUNK = 4 * 1024 * 1024

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_VOLUME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*/[A-Za-z0-9_-][A-Za-z0-9._-]*/vol-[0-9]{6,}\.tar$")
_EXTENSIONS = {"application/dicom": "dcm", "text/plain": "txt", "application/pdf": "pdf"}


def slug(name: str | None, *, empty: str = "unknown") -> str:
    """A path component standing for ``name`` (an origin or a modality from the wire).

    Names that are already safe are kept as they are, so volumes read
    naturally; any other name is cleaned and suffixed with a hash of the
    real name, so two names never share a folder. The real name stays in
    the catalogue.
    """
    if not name:
        return f"{empty}-{hashlib.sha256(b'').hexdigest()[:8]}"
    cleaned = _SAFE.sub("-", name).strip(".-")[:48]
    if cleaned == name:
        return cleaned
    return f"{cleaned or empty}-{hashlib.sha256(name.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"


def volume_path(centre: str, modality: str | None, sequence: int) -> str:
    """The volume name, relative to the archive root."""
    return f"{slug(centre, empty='centre')}/{slug(modality, empty='no-modality')}/vol-{sequence:06d}.tar"


def member_name(uid: str, digest: str, media_type: str) -> str:
    """The member's name in its volume: the UID (checked to be one), else the digest."""
    ext = _EXTENSIONS.get(media_type, "bin")
    stem = uid if len(uid) <= 64 and _UID.match(uid) else digest
    return f"{stem}.{ext}"


@dataclass(frozen=True)
class Member:
    """One object to append: its bytes and what the volume records about it."""

    name: str
    data: bytes
    sha256: str
    mtime: float
    # A pax ``comment`` record: tar ignores it silently; it lets a volume
    # describe its members without the catalogue.
    comment: str

    @classmethod
    def for_object(
        cls, uid: str, digest: str, media_type: str, origin: str, modality: str | None, data: bytes, mtime: float,
        sha: str | None = None,
    ) -> "Member":
        """``sha`` is the SHA-256 the data is known to have (a content address); computed when absent."""
        sha = sha or hashlib.sha256(data).hexdigest()
        comment = f"medd uid={uid} sha256={sha} origin={quote(origin, safe='@.-_')} modality={quote(modality or '')}"
        return cls(member_name(uid, digest, media_type), data, sha, mtime, comment)

    def header(self) -> bytes:
        info = tarfile.TarInfo(self.name)
        info.size = len(self.data)
        info.mtime = int(self.mtime)
        info.mode = 0o444
        info.uname = info.gname = "medd"
        info.pax_headers = {"comment": self.comment}
        return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")

    def padding(self) -> bytes:
        return bytes(-len(self.data) % BLOCK)


@dataclass(frozen=True)
class Placement:
    """Where an appended member landed."""

    name: str
    header_offset: int
    data_offset: int
    size: int
    sha256: str
    end: int  # the volume's end after this member


@dataclass(frozen=True)
class Scanned:
    """A member as found by reading a volume from its start."""

    name: str
    header_offset: int
    data_offset: int
    size: int
    sha256: str
    comment: str | None

    @property
    def end(self) -> int:
        return self.data_offset + self.size + (-self.size % BLOCK)


class VolumeShort(OSError):
    """A volume holds fewer bytes than the catalogue says were committed to it."""


@implementer(IArchive)
class TapeArchive:
    """Volumes as files under ``root``, a folder that must already exist.

    The root is not created: a missing root is an unmounted or offline
    target, and archiving must pause rather than fill the disk beneath it.
    """

    def __init__(self, root: str | os.PathLike, *, drop_cache: bool = True):
        self.root = Path(root)
        self.description = f"tar volumes under {self.root}"
        # Drop written pages from the page cache so that the read-back after
        # an append comes from the medium, not from memory.
        self.drop_cache = drop_cache and hasattr(os, "posix_fadvise")

    @classmethod
    def from_config(cls, config) -> "TapeArchive":
        from medd.config import ConfigError, ConfigProblem

        raw = config.section("archive").get("path", "").strip()
        root = Path(raw) if Path(raw).is_absolute() else Path(config.path).resolve().parent / raw
        problem = _root_problem(raw, root)
        if problem:
            raise ConfigError([ConfigProblem(config.path, "archive", "path", problem)])
        return cls(root)

    # -- paths ---------------------------------------------------------------------------------

    def path(self, volume: str) -> Path:
        # Volume names come from the catalogue or the command line: never
        # let one point outside the root.
        if not _VOLUME.match(volume) or "/." in volume:
            raise ValueError(f"not a volume name: {volume!r}")
        return self.root / volume

    def check_online(self) -> None:
        """Raise OSError unless the target is there (mounted, online); the health checks ask it too."""
        if not self.root.is_dir():
            raise OSError(errno.ENOENT, f"archive target {self.root} is not there (offline or not mounted?)")

    # -- writing -------------------------------------------------------------------------------

    def _open_for_append(self, volume: str, end: int) -> int:
        self.check_online()
        path = self.path(volume)
        created_dirs = []
        for d in (path.parent.parent, path.parent):
            if not d.is_dir():
                d.mkdir(exist_ok=True)
                created_dirs.append(d)
        existed = path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            self._truncate_to(fd, volume, end)
            if not existed:
                created_dirs.append(path)
            for d in created_dirs:
                fsync_dir(d.parent)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _truncate_to(self, fd: int, volume: str, end: int) -> int:
        size = os.fstat(fd).st_size
        if size < end:
            raise VolumeShort(errno.EIO, f"volume {volume} holds {size} bytes but {end} were committed to it")
        if size > end:
            # The remains of an append that a crash (or a full target) cut
            # short: never catalogued, so nothing refers to them.
            os.ftruncate(fd, end)
            os.fsync(fd)
            log.warn("volume {volume}: dropped {n} bytes of an interrupted append", volume=volume, n=size - end)
        return size - end

    def _write(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]

    def append(self, volume: str, end: int, members: list[Member]) -> list[Placement]:
        fd = self._open_for_append(volume, end)
        try:
            placements = []
            pos = end
            for m in members:
                header = m.header()
                self._write(fd, header)
                self._write(fd, m.data)
                self._write(fd, m.padding())
                data_offset = pos + len(header)
                pos = data_offset + len(m.data) + len(m.padding())
                placements.append(Placement(m.name, data_offset - len(header), data_offset, len(m.data), m.sha256, pos))
            os.fsync(fd)
            if self.drop_cache:
                os.posix_fadvise(fd, end, pos - end, os.POSIX_FADV_DONTNEED)
            return placements
        finally:
            os.close(fd)

    def close(self, volume: str, end: int) -> tuple[int, str]:
        fd = self._open_for_append(volume, end)
        try:
            self._write(fd, END_OF_ARCHIVE)
            os.fsync(fd)
        finally:
            os.close(fd)
        size = end + len(END_OF_ARCHIVE)
        digest = hashlib.sha256()
        for chunk in self._chunks(volume, 0, size):
            digest.update(chunk)
        return size, digest.hexdigest()

    def recover(self, volume: str, end: int) -> int:
        self.check_online()
        path = self.path(volume)
        if not path.exists():
            if end:
                raise VolumeShort(errno.EIO, f"volume {volume} is missing but {end} bytes were committed to it")
            return 0
        fd = os.open(path, os.O_WRONLY)
        try:
            return self._truncate_to(fd, volume, end)
        finally:
            os.close(fd)

    # -- reading -------------------------------------------------------------------------------

    def _chunks(self, volume: str, offset: int, size: int) -> Iterator[bytes]:
        self.check_online()
        with open(self.path(volume), "rb") as f:
            f.seek(offset)
            left = size
            while left:
                chunk = f.read(min(READ_CHUNK, left))
                if not chunk:
                    raise VolumeShort(errno.EIO, f"volume {volume} ends before offset {offset + size}")
                left -= len(chunk)
                yield chunk

    def read(self, volume: str, offset: int, size: int) -> bytes:
        self.check_online()
        buf = bytearray(size)
        view = memoryview(buf)
        with open(self.path(volume), "rb", buffering=0) as f:
            f.seek(offset)
            done = 0
            while done < size:
                n = f.readinto(view[done:])
                if not n:
                    raise VolumeShort(errno.EIO, f"volume {volume} ends before offset {offset + size}")
                done += n
        return bytes(buf) if size < READ_CHUNK else buf

    def checksum(self, volume: str, size: int) -> str:
        """SHA-256 of the first ``size`` bytes of ``volume``."""
        digest = hashlib.sha256()
        for chunk in self._chunks(volume, 0, size):
            digest.update(chunk)
        return digest.hexdigest()

    def scan(self, volume: str) -> Iterator[Scanned]:
        self.check_online()
        with open(self.path(volume), "rb") as f:
            # Stream mode reads forward only, as a tape drive would.
            with tarfile.open(fileobj=f, mode="r|", encoding="utf-8") as tf:
                for info in tf:
                    digest = hashlib.sha256()
                    if info.isfile():
                        src = tf.extractfile(info)
                        while chunk := src.read(READ_CHUNK):
                            digest.update(chunk)
                    yield Scanned(
                        info.name, info.offset, info.offset_data, info.size, digest.hexdigest(),
                        info.pax_headers.get("comment"),
                    )


def _root_problem(raw: str, root: Path) -> str | None:
    """Why ``[archive] path`` cannot be the tape backend's root, or None."""
    if not raw:
        return "is required by the tape backend"
    if root.exists() and not root.is_dir():
        kind = "a device" if stat.S_ISCHR(root.stat().st_mode) or stat.S_ISBLK(root.stat().st_mode) else "not a folder"
        return f"{root} is {kind}; this version writes volumes into a folder"
    return None


def check_archive_section(section) -> None:
    if section.get("backend") != "tape":
        return
    problem = _root_problem(section.get("path", ""), section.path("path") or Path())
    if problem:
        section.problem("path", problem)


@hookimpl
def medd_register_storage(register) -> None:
    register("archive", "tape", TapeArchive.from_config)


@hookimpl
def medd_register_config(register) -> None:
    # [archive] path: the folder (an archive mount) the tape backend writes volumes into.
    register("archive", ["path"], check_archive_section)
