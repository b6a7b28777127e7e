"""The watched folder: files dropped into ``[gateway] watch`` (a CD's DICOMDIR
tree copied in, or loose files), recursively, are taken in through the node's
ingest and moved out only once they are durable: to ``DIR/.done/``, or, when
refused, to ``DIR/.refused/`` with ``<name>.reason.txt`` beside them.

A file is taken only when its size and modification time are the same on two
polls in a row, so a file still being copied is left alone; names starting
with ``.`` or ending in ``.part``/``.tmp`` are never taken (write under such a
name, then rename). Polls run on the injected clock. When the node cannot
store (its spool is full, the disk), the pass stops and the file waits for
the next poll.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from twisted.logger import Logger

from medd.ingest import Refused, StoreFailed
from medd.scheduling import CoalescingPass, PassService

DONE, REFUSED = ".done", ".refused"
_IN_PROGRESS_SUFFIXES = (".part", ".tmp")
# A CD's index of its files: not an object to store.
_NOT_OBJECTS = ("DICOMDIR",)


@dataclass(frozen=True)
class WatchResult:
    """What one pass over the folder did."""

    stored: int = 0
    refused: int = 0
    waiting: int = 0  # files seen but not yet stable, or left because the node could not store them
    error: str | None = None


def _candidates(root: Path) -> dict[Path, tuple[int, int]]:
    """Blocking: every file to consider under ``root``, with its (size, mtime_ns)."""
    found = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name.endswith(_IN_PROGRESS_SUFFIXES) or name.upper() in _NOT_OBJECTS:
                continue
            path = Path(folder) / name
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            found[path] = (st.st_size, st.st_mtime_ns)
    return found


def _move(root: Path, path: Path, to: str, reason: str | None = None) -> None:
    """Blocking: move ``path`` under ``root/to`` keeping its relative path, with its reason beside it."""
    target = root / to / path.relative_to(root)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, target)
    if reason is not None:
        target.with_name(target.name + ".reason.txt").write_text(reason + "\n", encoding="utf-8")


class WatchedFolder(PassService):
    """Polls ``root`` every ``interval`` seconds on the clock; ``kick()`` polls now."""

    log = Logger()

    def __init__(self, root: Path, ingest, interval: float, clock, *, origin: str = "folder"):
        self.root = root
        self.ingest = ingest  # the node's Ingest: receive_dicom, run_blocking
        self.interval = interval
        self.clock = clock
        self.origin = origin
        self._seen: dict[Path, tuple[int, int]] = {}
        self._pass = CoalescingPass(self._poll, "taking in the watched folder", clock)
        self._stopped = False

    async def _poll(self) -> WatchResult:
        if self._stopped:
            return WatchResult()
        try:
            result = await self._take_in()
        finally:
            if self.running and not self._stopped:
                self._pass.schedule(self.interval)
        return result

    async def _take_in(self) -> WatchResult:
        stored = refused = waiting = 0
        now = await self.ingest.run_blocking(_candidates, self.root)
        seen, self._seen = self._seen, now
        for path, stat in now.items():
            if self._stopped:
                break
            if seen.get(path) != stat:
                waiting += 1  # new or still changing: taken once it stays the same over a poll
                continue
            try:
                data = await self.ingest.run_blocking(path.read_bytes)
                await self.ingest.receive_dicom(data, transport="folder", origin=self.origin)
            except FileNotFoundError:
                continue  # taken away meanwhile
            except Refused as e:
                refused += 1
                self.log.warn("{path} refused: {reason}", path=str(path), reason=e.reason)
                await self.ingest.run_blocking(_move, self.root, path, REFUSED, e.reason)
                continue
            except StoreFailed as e:
                # The file stays; everything after it waits for the next poll too.
                waiting += len(now) - stored - refused - waiting
                self.log.warn("{path} waits: {reason}", path=str(path), reason=str(e))
                return WatchResult(stored, refused, waiting, error=str(e))
            await self.ingest.run_blocking(_move, self.root, path, DONE)
            stored += 1
        if stored or refused:
            self.log.info("watched folder: {stored} taken in, {refused} refused", stored=stored, refused=refused)
        return WatchResult(stored, refused, waiting)
