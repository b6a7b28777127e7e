"""Large packages as several ``message/partial`` messages (RFC 2046 5.2.2), and their durable
reassembly.

:func:`split` cuts a message larger than ``[mail] max_message_size`` at line ends into fragments
whose bodies, concatenated in order, are the whole message (its header block first). Each fragment
has its own Message-ID and says ``Content-Type: message/partial; id=...; number=i; total=n``.

:class:`FragmentStore` keeps the fragments that arrive on disk, each written and fsync'd before
the mailbox message that carried it is deleted, in any order, a duplicate ignored. A complete set
is handed back whole, once, and removed only once the caller has stored it. A set still incomplete
after its timeout is moved aside to ``incomplete/`` and reported.
"""
from __future__ import annotations

import email
import email.policy
import email.utils
import hashlib
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

PARTIAL_TYPE = "message/partial"
#: Fragments in one set at most: far above any real study, far below what costs the disk much.
MAX_FRAGMENTS = 1000
_HEADER_ROOM = 2048  # a fragment's own header block, at most
_END_OF_HEADER = re.compile(rb"\r?\n\r?\n")


class BadFragment(Exception):
    """A ``message/partial`` that cannot belong to any set (its reason says why)."""


def header_block(data: bytes, error=BadFragment):
    """(the parsed header block of a message, where its body starts); ``error`` when it has none."""
    end = _END_OF_HEADER.search(data)
    if end is None:
        raise error("the message has no header block")
    return email.message_from_bytes(data[: end.end()], policy=email.policy.compat32), end.end()


def content_type_of(data: bytes) -> str | None:
    """A message's top-level media type, from its header block only (None without one)."""
    end = _END_OF_HEADER.search(data)
    return None if end is None else header_block(data)[0].get_content_type()


def is_partial(data: bytes) -> bool:
    return content_type_of(data) == PARTIAL_TYPE


def split(message: bytes, max_size: int) -> list[bytes]:
    """``message`` as it is when it fits in ``max_size`` bytes, else its ``message/partial`` fragments
    (blocking: copies the message once)."""
    if len(message) <= max_size:
        return [message]
    header, _ = header_block(message)
    room = max(max_size - _HEADER_ROOM, 1024)
    chunks: list[bytes] = []
    start = 0
    while start < len(message):
        end = min(start + room, len(message))
        if end < len(message):
            cut = message.rfind(b"\n", start, end)
            end = cut + 1 if cut >= start else end
        chunks.append(message[start:end])
        start = end
    if len(chunks) > MAX_FRAGMENTS:
        raise ValueError(f"{len(message)} bytes would take {len(chunks)} fragments of {max_size}; at most "
                         f"{MAX_FRAGMENTS}: raise [mail] max_message_size")
    set_id = (header.get("Message-ID") or email.utils.make_msgid()).strip().strip("<>")
    domain = set_id.rpartition("@")[2] or "medd.invalid"
    fragments = []
    for number, chunk in enumerate(chunks, 1):
        lines = [f"{name}: {' '.join(str(header[name]).split())}" for name in ("From", "To", "Date") if header[name]]
        lines += [f"Message-ID: {email.utils.make_msgid(domain=domain)}", "MIME-Version: 1.0",
                  f'Content-Type: {PARTIAL_TYPE}; id="{set_id}"; number={number}; total={len(chunks)}']
        fragments.append(("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + chunk)
    return fragments


@dataclass(frozen=True)
class Fragment:
    set_id: str
    number: int
    total: int
    body: bytes


def parse_fragment(data: bytes) -> Fragment:
    header, end = header_block(data)
    if header.get_content_type() != PARTIAL_TYPE:
        raise BadFragment(f"not a {PARTIAL_TYPE}")
    set_id = header.get_param("id") or ""
    try:
        number, total = int(header.get_param("number") or 0), int(header.get_param("total") or 0)
    except ValueError as e:
        raise BadFragment("number and total must be whole numbers") from e
    if not set_id or not 1 <= number <= total <= MAX_FRAGMENTS:
        raise BadFragment(f"a fragment needs an id and 1 <= number <= total <= {MAX_FRAGMENTS}; "
                          f"this one has id={set_id!r} number={number} total={total}")
    return Fragment(str(set_id), number, total, data[end:])


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class IncompleteSet:
    set_id: str
    have: tuple[int, ...]
    total: int
    age: float


class FragmentStore:
    """Fragments on disk under ``folder``, one subfolder per set (named by the hash of its id, never
    by the id itself). Every method blocks: call it off the reactor."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder = Path(folder)
        self.max_bytes = max_bytes  # a set whose fragments exceed this is refused

    def _set_folder(self, set_id: str) -> Path:
        return self.folder / hashlib.sha256(set_id.encode("utf-8")).hexdigest()

    def add(self, data: bytes) -> str:
        """Keep the fragment ``data`` (a duplicate changes nothing); the id of its set."""
        fragment = parse_fragment(data)
        folder = self._set_folder(fragment.set_id)
        if (folder / "done").exists():
            return fragment.set_id  # a late duplicate of a set already stored
        folder.mkdir(parents=True, exist_ok=True)
        meta = folder / "set"
        if meta.exists():
            set_id, total = meta.read_text().rsplit("\n", 1)
            if set_id != fragment.set_id or int(total) != fragment.total:
                raise BadFragment(f"fragment {fragment.number} says total={fragment.total}; its set has {total}")
        else:
            _write_durably(meta, f"{fragment.set_id}\n{fragment.total}".encode("utf-8"))
        part = folder / f"{fragment.number:04d}.part"
        if not part.exists():
            held = sum(p.stat().st_size for p in folder.glob("*.part"))
            if held + len(fragment.body) > self.max_bytes:
                raise BadFragment(f"the fragments of {fragment.set_id} exceed {self.max_bytes} bytes")
            _write_durably(part, fragment.body)
        return fragment.set_id

    def _sets(self):
        if not self.folder.is_dir():
            return
        for folder in sorted(self.folder.iterdir()):
            meta = folder / "set"
            if folder.name == "incomplete" or not meta.exists() or (folder / "done").exists():
                continue
            set_id, total = meta.read_text().rsplit("\n", 1)
            have = tuple(sorted(int(p.name[:4]) for p in folder.glob("*.part")))
            yield folder, set_id, int(total), have

    def complete(self) -> list[tuple[str, bytes]]:
        """Every complete set: (its id, the whole message)."""
        found = []
        for folder, set_id, total, have in self._sets():
            if have == tuple(range(1, total + 1)):
                found.append((set_id, b"".join((folder / f"{n:04d}.part").read_bytes() for n in have)))
        return found

    def discard(self, set_id: str) -> None:
        """The set was stored (or refused with its whole message kept elsewhere): its fragments go. A
        ``done`` mark stays until the timeout, so that a late duplicate does not start the set again."""
        folder = self._set_folder(set_id)
        _write_durably(folder / "done", b"")
        for part in folder.glob("*.part"):
            part.unlink()

    def expire(self, timeout: float, now: float | None = None) -> list[IncompleteSet]:
        """Sets with no new fragment for ``timeout`` seconds, moved to ``incomplete/`` (kept, not
        deleted) and returned to be reported."""
        now = time.time() if now is None else now
        for done in self.folder.glob("*/done") if self.folder.is_dir() else ():
            if now - done.stat().st_mtime >= timeout:
                shutil.rmtree(done.parent, ignore_errors=True)
        expired = []
        for folder, set_id, total, have in self._sets():
            newest = max(p.stat().st_mtime for p in folder.iterdir())
            if now - newest >= timeout and have != tuple(range(1, total + 1)):
                target = self.folder / "incomplete" / folder.name
                target.parent.mkdir(exist_ok=True)
                shutil.rmtree(target, ignore_errors=True)
                os.replace(folder, target)
                expired.append(IncompleteSet(set_id, have, total, now - newest))
        return expired
