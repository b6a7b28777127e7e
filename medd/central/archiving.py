"""The archiving service: copies every indexed object to lifetime storage, verifies it, and
applies retention to the working store.

Work comes from the database (objects without a catalogue entry), never
from memory, so a restart resumes where a crash stopped. Volume I/O runs on
the ``medd-archive`` thread pool, catalogue updates on the database pool
through the :class:`~medd.storage.catalogue.Catalogue` connector. Passes,
stamps and retention all run on the one injected clock. A full or offline
target pauses archiving with one clear error; the next interval tries again.
"""
from __future__ import annotations

import errno
import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from itertools import groupby

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from medd.config import ConfigError, ConfigProblem, _parse_size
from medd.scheduling import CoalescingPass
from medd.storage import catalogue
from medd.progress import progress, progress_bar
from medd.storage.archive import END_OF_ARCHIVE, Member
from medd.storage.catalogue import Catalogue, PendingObject, Volume

DEFAULT_VOLUME_SIZE = 4 * 1024**3
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


@dataclass(frozen=True)
class ArchiveSettings:
    """``[archive]`` and ``[retention]``, validated."""

    backend: str
    volume_size: int = DEFAULT_VOLUME_SIZE
    interval: float = 60.0
    # One append (one fsync, one catalogue transaction) carries at most this much.
    batch_bytes: int = 64 * 1024 * 1024
    batch_objects: int = 500
    # Archiving rules: empty means every centre / modality.
    centres: tuple[str, ...] = ()
    modalities: tuple[str, ...] = ()
    min_age: timedelta = timedelta(0)
    evict_after: timedelta | None = None


def _age(text: str) -> timedelta:
    m = _AGE.match(text)
    if not m:
        raise ValueError(text)
    return timedelta(seconds=float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)])


def archive_settings(config) -> ArchiveSettings | None:
    """The archive settings of ``config``, or None when no archive is configured."""
    section = config.section("archive")
    retention = config.section("retention")
    backend = section.get("backend", "").strip()
    problems = []

    def problem(sect, key, message):
        problems.append(ConfigProblem(config.path, sect, key, message))

    if not backend:
        if retention.get("evict_after_days", "").strip():
            problem("retention", "evict_after_days", "needs an archive: set [archive] backend")
            raise ConfigError(problems)
        return None
    values: dict = {"backend": backend}
    for key, parse, what in (
        ("volume_size", _parse_size, "a size (e.g. 4G)"),
        ("batch_bytes", _parse_size, "a size (e.g. 64M)"),
        ("interval", lambda t: _age(t).total_seconds(), "a duration (e.g. 60, 5m)"),
        ("batch_objects", int, "a number"),
        ("min_age", _age, "a duration (e.g. 0, 2h, 1d)"),
    ):
        text = section.get(key, "").strip()
        if text:
            try:
                values[key] = parse(text)
            except ValueError:
                problem("archive", key, f"not {what}: {text!r}")
    if values.get("volume_size", DEFAULT_VOLUME_SIZE) < 64 * 1024:
        problem("archive", "volume_size", "must be at least 64K")
    if values.get("interval", 60.0) <= 0:
        problem("archive", "interval", "must be more than 0")
    if values.get("batch_objects", 1) < 1:
        problem("archive", "batch_objects", "must be at least 1")
    for key in ("centres", "modalities"):
        text = section.get(key, "")
        values[key] = tuple(n.strip() for n in text.replace(",", " ").split() if n.strip())
    days = retention.get("evict_after_days", "").strip()
    if days:
        try:
            n = float(days)
            if n < 0:
                raise ValueError(days)
            values["evict_after"] = timedelta(days=n)
        except ValueError:
            problem("retention", "evict_after_days", f"not a number of days: {days!r}")
    if problems:
        raise ConfigError(problems)
    return ArchiveSettings(**values)


@dataclass
class RunReport:
    """What one archiving pass did."""

    archived: int = 0
    bytes: int = 0
    volumes_closed: int = 0
    evicted: int = 0
    skipped: list[str] = field(default_factory=list)
    paused: str | None = None


@dataclass(frozen=True)
class BadMember:
    uid: str
    member: str
    reason: str


@dataclass(frozen=True)
class VerifyResult:
    volume: str
    state: str
    members: int
    bad: list[BadMember]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.bad and not self.problems


class CorruptWorkingCopy(Exception):
    """Working copies whose bytes no longer hash to their digest (``uids``)."""

    def __init__(self, uids: list[str]):
        super().__init__(", ".join(uids))
        self.uids = uids


def _uid_of(member: Member) -> str:
    return member.comment.split()[1].removeprefix("uid=")


class RestoreFailed(Exception):
    """An object could not be brought back from the archive."""


class ArchivingService(Service):
    """Archive in the background on an interval; verify, restore and evict on request."""

    name = "archiving"
    log = Logger()

    def __init__(self, reactor, database, blobs, archive, settings: ArchiveSettings, *, clock=None):
        self.reactor = reactor
        self.clock = clock or reactor
        self.catalogue = Catalogue(database, self.clock)
        self.blobs = blobs
        self.archive = archive
        self.settings = settings
        # One thread: appends to a volume must be sequential anyway.
        self.pool = ThreadPool(minthreads=1, maxthreads=1, name="medd-archive")
        self.paused: str | None = None
        self._recovered = False
        self._pass = CoalescingPass(self._scheduled_pass, "archiving", self.clock)
        # Set on stop: a pass under way ends after its current batch.
        self._stopping = False
        # Objects whose working copy is missing or corrupt: reported once, not retried until restart.
        self._unarchivable: set[str] = set()

    # -- service ----------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self.log.info("archiving to {target} every {interval} s", target=self.archive.description, interval=self.settings.interval)
        self.run_once()

    def stopService(self):
        """Stop the interval; the Deferred fires once a pass under way has finished its batch."""
        super().stopService()
        self._stopping = True
        self._pass.unschedule()

        def stop_pool(_):
            if self.pool.started:
                self.pool.stop()

        return self._pass.idle().addCallback(stop_pool)

    def run_once(self) -> Deferred:
        """Deferred :class:`RunReport` of a pass (recover, archive what is pending, evict what
        retention allows) that begins after this call.

        Never fails: a broken target pauses archiving until a later pass. A
        call while a pass runs waits for it and then gets a fresh pass.
        """
        return self._pass.kick()

    def idle(self) -> Deferred:
        """A Deferred that fires once no pass is under way (one the clock started, say)."""
        return self._pass.idle()

    async def _scheduled_pass(self) -> RunReport:
        """One pass, then the next one ``interval`` seconds on the clock after it ends."""
        try:
            report = await self._run_once()
        except Exception as e:
            self.log.failure("archiving pass failed; it will be retried")
            report = RunReport(paused=str(e))
        if self.running:
            self._pass.schedule(self.settings.interval)
        return report

    async def _run_once(self) -> RunReport:
        report = RunReport()
        try:
            if not self._recovered:
                await self.recover()
                self._recovered = True
            await self.archive_pending(report)
            if self.settings.evict_after is not None:
                report.evicted = await self.evict()
        except OSError as e:
            # An append may have been cut short: recover again before the next one.
            self._recovered = False
            report.paused = f"{self.archive.description}: {e}"
            if self.paused is None:
                self.log.error(
                    "archive target unavailable ({error}); archiving paused, nothing is lost; retrying every {interval} s",
                    error=report.paused, interval=self.settings.interval,
                )
            self.paused = report.paused
            return report
        if self.paused is not None:
            self.log.info("archive target available again; archiving resumed")
            self.paused = None
        if report.archived or report.evicted:
            self.log.info(
                "archived {n} objects ({bytes} bytes), closed {closed} volumes, evicted {evicted}",
                n=report.archived, bytes=report.bytes, closed=report.volumes_closed, evicted=report.evicted,
            )
        return report

    # -- plumbing ---------------------------------------------------------------------------------

    def _io(self, fn, *args) -> Deferred:
        if not self.pool.started:
            self.pool.start()
        return deferToThreadPool(self.reactor, self.pool, fn, *args)

    # -- crash recovery ---------------------------------------------------------------------------

    async def recover(self) -> int:
        """Drop the half-written tails an interrupted append left on open volumes."""
        dropped = 0
        for volume in await self.catalogue.open_volumes():
            n = await self._io(self.archive.recover, volume.path, volume.size)
            if n:
                self.log.warn(
                    "volume {volume}: removed {n} bytes of an interrupted append; its objects will be archived again",
                    volume=volume.path, n=n,
                )
            dropped += n
        return dropped

    # -- archiving --------------------------------------------------------------------------------

    async def archive_pending(self, report: RunReport | None = None) -> RunReport:
        report = report or RunReport()
        s = self.settings
        cursor = 0
        while not self._stopping:
            page = await self.catalogue.pending_objects(
                cursor, s.batch_objects, centres=s.centres, modalities=s.modalities, min_age=s.min_age,
            )
            if not page:
                return report
            cursor = page[-1].id
            key = lambda p: (p.centre, p.modality or "")  # noqa: E731
            for _, group in groupby(sorted(page, key=key), key=key):
                group = list(group)
                for batch in self._batches(group):
                    await self._archive_batch(batch, report)
        return report

    def _batches(self, group: list[PendingObject]):
        batch, size = [], 0
        for p in group:
            if batch and size + p.size > self.settings.batch_bytes:
                yield batch
                batch, size = [], 0
            batch.append(p)
            size += p.size
        if batch:
            yield batch

    def _load(self, pending: list[PendingObject]) -> tuple[list[tuple[PendingObject, Member]], list[str]]:
        """Blocking: read the working copies.

        Each is taken to hash to its digest (it is a content address); the
        read-back after the append checks that, so the bytes are hashed once.
        """
        loaded, skipped = [], []
        for p in pending:
            if p.sop_instance_uid in self._unarchivable:
                continue
            try:
                data = self.blobs.get(p.digest)
            except FileNotFoundError:
                self.log.error("{uid}: working copy {digest} is missing; cannot archive it", uid=p.sop_instance_uid, digest=p.digest)
                self._unarchivable.add(p.sop_instance_uid)
                skipped.append(p.sop_instance_uid)
                continue
            member = Member.for_object(
                p.sop_instance_uid, p.digest, p.media_type, p.origin, p.modality, data, _timestamp(p.received_at), sha=p.digest,
            )
            loaded.append((p, member))
        return loaded, skipped

    async def _archive_batch(self, pending: list[PendingObject], report: RunReport) -> None:
        loaded, skipped = await self._io(self._load, pending)
        report.skipped.extend(skipped)
        if not loaded:
            return
        centre, modality = loaded[0][0].centre, loaded[0][0].modality
        while loaded:
            volume = await self.catalogue.open_volume(centre, modality)
            fitting = self._fitting(volume, [m for _, m in loaded])
            if not fitting:
                await self._close(volume)
                report.volumes_closed += 1
                continue
            batch = loaded[:fitting]
            try:
                placements = await self._io(self._append_and_read_back, volume, [m for _, m in batch])
            except CorruptWorkingCopy as e:
                # Not catalogued: the next append drops what was written.
                for uid in e.uids:
                    self.log.error("{uid}: the working copy does not match its digest; not archived", uid=uid)
                self._unarchivable.update(e.uids)
                await self._io(self.archive.recover, volume.path, volume.size)
                report.skipped.extend(e.uids)
                loaded = [(p, m) for p, m in loaded if p.sop_instance_uid not in e.uids]
                continue
            loaded = loaded[fitting:]
            appended = [(p.sop_instance_uid, p.digest, pl) for (p, _), pl in zip(batch, placements)]
            await self.catalogue.record_append(volume, appended, verified=True)
            report.archived += len(batch)
            report.bytes += sum(pl.size for pl in placements)

    def _fitting(self, volume: Volume, members: list[Member]) -> int:
        """How many of ``members`` go into ``volume`` before it reaches the volume size."""
        limit = self.settings.volume_size - len(END_OF_ARCHIVE)
        end, n = volume.size, 0
        for m in members:
            # The pax header is three blocks for the names medd writes; a
            # larger one only makes a volume end a little past its size.
            end += 3 * 512 + len(m.data) + len(m.padding())
            if end > limit and (n or volume.members):
                break
            n += 1
        return n

    def _append_and_read_back(self, volume: Volume, members: list[Member]):
        """Blocking: append, then read the members back in one pass and hash each before they are catalogued."""
        placements = self.archive.append(volume.path, volume.size, members)
        start = placements[0].header_offset
        written = memoryview(self.archive.read(volume.path, start, placements[-1].end - start))
        wrong = [
            m for m, p in zip(members, placements)
            if hashlib.sha256(written[p.data_offset - start:p.data_offset - start + p.size]).hexdigest() != m.sha256
        ]
        if wrong:
            corrupt = [m for m in wrong if hashlib.sha256(m.data).hexdigest() != m.sha256]
            if corrupt:
                raise CorruptWorkingCopy([_uid_of(m) for m in corrupt])
            # Not catalogued: the next pass drops the tail and tries again.
            raise OSError(errno.EIO, f"volume {volume.path}: {wrong[0].name} read back differently from what was written")
        return placements

    async def _close(self, volume: Volume) -> None:
        size, checksum = await self._io(self.archive.close, volume.path, volume.size)
        await self.catalogue.record_close(volume, size, checksum)
        self.log.info("volume {volume} closed: {size} bytes, {n} objects", volume=volume.path, size=size, n=volume.members)

    # -- retention --------------------------------------------------------------------------------

    async def evict(self) -> int:
        """Remove from the working store the verified-archived objects received longer ago (on
        the clock) than the retention period."""
        evicted = 0
        while not self._stopping:
            batch = await self.catalogue.evictable(self.settings.evict_after, 500)
            if not batch:
                return evicted
            digests = sorted({a.digest for a in batch})
            # Marked first: a crash before the delete leaves a blob that is
            # merely still there, never one the catalogue thinks is present.
            await self.catalogue.mark_evicted(digests)
            await self._io(lambda: [self.blobs.delete(d) for d in digests])
            evicted += len(batch)
        return evicted

    # -- restore ----------------------------------------------------------------------------------

    def _read_checked(self, archived) -> bytes:
        data = self.archive.read(archived.volume, archived.data_offset, archived.size)
        if hashlib.sha256(data).hexdigest() != archived.sha256:
            raise RestoreFailed(f"{archived.sop_instance_uid}: the copy in {archived.volume} ({archived.member_name}) is damaged")
        return data

    def _restore_blocking(self, archived) -> bytes:
        data = self._read_checked(archived)
        self.blobs.put(data)
        return data

    async def restore(self, uids: list[str], *, show_progress: bool | None = False) -> list[str]:
        """Bring ``uids`` back into the working store; the UIDs restored (absent from the archive are skipped).
        ``show_progress=None``: a progress bar when stderr is a terminal (the command line)."""
        found = await self.catalogue.archived_by_uid(uids)
        restored = []
        for archived in progress(found, "archive restore", show=show_progress):
            await self._io(self._restore_blocking, archived)
            await self.catalogue.mark_restored(archived.digest)
            restored.append(archived.sop_instance_uid)
            self.log.info("{uid} restored from {volume}", uid=archived.sop_instance_uid, volume=archived.volume)
        return restored

    async def restore_study(self, study_uid: str, *, show_progress: bool | None = False) -> list[str]:
        uids = await self.catalogue.study_uids(study_uid)
        return await self.restore(uids, show_progress=show_progress)

    def restore_digest(self, digest: str) -> Deferred:
        """Deferred bytes of an evicted blob, put back into the working store on the way."""
        return ensureDeferred(self._restore_digest(digest))

    async def _restore_digest(self, digest: str) -> bytes:
        archived = await self.catalogue.archived_by_digest(digest)
        if archived is None:
            raise FileNotFoundError(f"blob {digest} is neither in the working store nor in the archive")
        data = await self._io(self._restore_blocking, archived)
        await self.catalogue.mark_restored(digest)
        self.log.info("{uid} restored from {volume} on demand", uid=archived.sop_instance_uid, volume=archived.volume)
        return data

    # -- verify -----------------------------------------------------------------------------------

    async def verify(self, path: str | None = None, *, show_progress: bool | None = False) -> list[VerifyResult]:
        """Re-read volumes (all, or the one at ``path``) and check every member against the catalogue
        (``show_progress=None``: a bar of the bytes read when stderr is a terminal)."""
        volumes = await self.catalogue.find_volumes(path=path)
        if path is not None and not volumes:
            raise KeyError(f"no volume {path} in the catalogue")
        if path is None:
            # Volumes moved off site are verified only when named (once brought back).
            volumes = [v for v in volumes if v.state != catalogue.OFFSITE]
        results = []
        bar = progress_bar(sum(v.size for v in volumes), "archive verify", show=show_progress)
        for volume in volumes:
            entries = await self.catalogue.volume_members(volume.id)
            bad, problems = await self._io(self._verify_volume, volume, entries)
            bar.update(volume.size)
            state = await self.catalogue.record_verify(volume, [b.uid for b in bad], bool(bad or problems))
            results.append(VerifyResult(volume.path, state, len(entries), bad, problems))
            if bad or problems:
                for b in bad:
                    self.log.error("volume {volume}: {uid} ({member}): {reason}", volume=volume.path, uid=b.uid, member=b.member, reason=b.reason)
                for p in problems:
                    self.log.error("volume {volume}: {problem}", volume=volume.path, problem=p)
        bar.close()
        return results

    def _verify_volume(self, volume: Volume, entries) -> tuple[list[BadMember], list[str]]:
        """Blocking: one sequential pass with tar's own reader, then each member by its catalogued position."""
        problems: list[str] = []
        catalogued_end = volume.size - (len(END_OF_ARCHIVE) if volume.state != catalogue.OPEN else 0)
        scanned = {}
        try:
            for s in self.archive.scan(volume.path):
                if s.header_offset >= catalogued_end:
                    break
                scanned[s.header_offset] = s
        except Exception as e:  # tarfile raises several kinds for a damaged header
            last = max((s.end for s in scanned.values()), default=0)
            if last < catalogued_end:
                problems.append(f"tar cannot read the volume past offset {last}: {e}")
        known = {e.header_offset for e in entries}
        for offset, s in sorted(scanned.items()):
            if offset not in known:
                problems.append(f"member {s.name} at offset {offset} is not in the catalogue")
        bad = []
        for e in entries:
            s = scanned.get(e.header_offset)
            if s is not None and (s.name, s.data_offset, s.size, s.sha256) == (e.member_name, e.data_offset, e.size, e.sha256):
                continue
            try:
                data = self.archive.read(volume.path, e.data_offset, e.size)
            except OSError as err:
                bad.append(BadMember(e.sop_instance_uid, e.member_name, f"cannot be read: {err}"))
                continue
            if hashlib.sha256(data).hexdigest() != e.sha256:
                bad.append(BadMember(e.sop_instance_uid, e.member_name, "SHA-256 does not match the catalogue"))
            else:
                problems.append(f"the tar header of {e.member_name} ({e.sop_instance_uid}) is damaged; its bytes are intact")
        if volume.checksum is not None:
            try:
                if self.archive.checksum(volume.path, volume.size) != volume.checksum:
                    problems.append("the volume's SHA-256 does not match the catalogue")
            except OSError as err:
                problems.append(f"cannot be read to its end: {err}")
        return bad, problems


def _timestamp(when: datetime) -> float:
    # SQLite hands back naive datetimes; medd stores UTC.
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


def make_archiving(reactor, config, plugins, database, blobs, *, clock=None) -> ArchivingService | None:
    """The archiving service a config asks for, or None; ``clock`` (the reactor by default) drives it."""
    from medd.plugins.host import check_storage

    settings = archive_settings(config)
    if settings is None:
        return None
    archive = plugins.storage[("archive", settings.backend)](config)
    check_storage(plugins, "archive", archive, settings.backend)
    return ArchivingService(reactor, database, blobs, archive, settings, clock=clock)


def utc(text: str) -> datetime:
    """``2024-05-01`` or an ISO timestamp, as an aware UTC datetime (for --since)."""
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
