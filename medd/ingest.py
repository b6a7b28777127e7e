"""The one ingest path every receiver feeds, on every role.

Received bytes are parsed and checked on the parsing thread pool, written to
the blob store (fsync'd), indexed in the database, and only then does the
returned Deferred fire, so a transport acknowledges what is durable and
nothing else. Refusals raise :class:`Refused`; failures of medd itself
(disk full, database down) raise :class:`StoreFailed` so that the sender is
told to try again rather than that its data is bad.

This module belongs to no role: central, viewer and gateway each build one
:class:`Ingest` and hand transports a :class:`medd.plugins.api.TransportAPI`
over it. What differs by role comes in through the constructor (how a status
message is recorded, where an evicted blob is restored from) or through the
``medd_check_sender`` hook (who may send in whose name).
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import blockingCallFromThread, deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from medd.audit import MAJOR_FAILURE, SERIOUS_FAILURE, SUCCESS, AuditTrail
from medd.config import PartLimits
from medd.objects import Content, InvalidObject, classify, parse_part10
from medd.package import Package, read_package
from medd.plugins.hookspecs import SenderClaim
from medd.plugins.host import hook_value
from medd.storage.index import ObjectIndex, ObjectRecord, Receipt, StatusEvent, StoreOutcome

log = Logger()


def _caught(fn, *args):
    """``fn(*args)``, or the :class:`Refused` or :class:`StoreFailed` it raised."""
    try:
        return fn(*args)
    except (Refused, StoreFailed) as e:
        return e


async def _outcome(d: Deferred):
    return await d


class Refused(Exception):
    """The data is refused; resending it unchanged will not help.

    ``kind`` is ``"invalid"``, ``"too-large"``, ``"unauthenticated"`` or
    ``"conflict"`` (the UID or Message-ID is already held for another origin,
    or with other content; recorded in the index's conflicts); transports map
    it to their own status (DICOM failure status, SMTP 5xx, HTTP 4xx, TLS
    refusal).
    """

    def __init__(self, reason: str, kind: str = "invalid"):
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        # Already in the audit trail (the ingest records every refusal once).
        self.audited = False
        # For a refused sender: the origin the package claimed.
        self.origin: str | None = None


class StoreFailed(Exception):
    """medd could not make the object durable; the sender should retry later."""


@dataclass(frozen=True)
class Stored:
    """The outcome a transport reports back: what was stored and whether it was new."""

    uid: str
    object_type: str
    digest: str | None
    created: bool
    message_id: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_class_uid: str | None = None


class Ingest:
    """Parse, check, store, index. Every method returns a Deferred.

    ``record_status(event)`` records a status message (a
    :class:`~medd.storage.index.StatusEvent`) and returns a Deferred of
    whether it was new; central passes one that also moves the delivery to
    ``opened`` in the same transaction. ``restore(digest)`` brings an evicted
    blob back from the archive (a Deferred of its bytes). ``admit(size,
    transport)`` raises :class:`StoreFailed` when the node cannot take an
    object now (a gateway whose spool for central is full); it is asked
    before anything is parsed or written. ``index_with`` is handed to
    :meth:`~medd.storage.index.ObjectIndex.store_object`: what the role
    writes beside a new object in its index transaction (the gateway queues
    it for central there, so one commit makes both durable). ``audit`` is the
    node's :class:`~medd.audit.AuditTrail`: every store, refused or not, is
    recorded (a stored one in its index transaction), a refused sender as a
    refused authentication, an ``opened`` status as a view. ``delivery_facts``
    (a viewer, whose packages come only from central) keeps what central's
    Medd-Centre and Medd-Study-Images headers say in the object's row; other
    roles ignore those headers.
    ``package_with(conn,
    record, package)`` is like ``index_with`` for an object that came in a
    package, with the package (whose headers the role may keep: a viewer keeps
    central's ``Medd-Report-Source``).
    """

    def __init__(self, reactor, index: ObjectIndex, blobs, plugins, *, max_object_size: int,
                 part_limits: PartLimits = PartLimits(), parse_threads: int = 2,
                 record_status: Callable[[StatusEvent], Deferred] | None = None,
                 restore: Callable[[str], Deferred] | None = None,
                 admit: Callable[[int, str], None] | None = None,
                 index_with: Callable | None = None, audit: AuditTrail | None = None,
                 delivery_facts: bool = False, package_with: Callable | None = None, metrics=None, smime=None):
        self.reactor = reactor
        self.index = index
        self.blobs = blobs
        self.plugins = plugins
        self.max_object_size = max_object_size
        self.part_limits = part_limits
        self._record_status = record_status or index.store_status
        self._restore = restore
        self._admit = admit
        self._index_with = index_with
        self.package_with = package_with
        self.audit = audit
        self._delivery_facts = delivery_facts
        #: :class:`medd.metrics.NodeMetrics` (or None): each object's outcome, size and latency.
        self.metrics = metrics
        # A medd.mail.smime.SmimeOpener when the node has an S/MIME identity ([mail] smime_certificate).
        self.smime = smime
        self.pool = ThreadPool(minthreads=1, maxthreads=parse_threads, name="medd-parse")
        self._started = False
        # Digests written by an ingest that has not reached its index commit yet: the blob
        # sweep must not take them, however long the database keeps that ingest waiting.
        self._writing: Counter[str] = Counter()
        self._writing_lock = threading.Lock()

    def start(self) -> None:
        if not self._started:
            self.pool.start()
            self._started = True

    def stop(self) -> None:
        if self._started:
            self.pool.stop()
            self._started = False

    def run_blocking(self, fn, *args) -> Deferred:
        """Run a short blocking call (parsing, reading a request body, a blob) on the parsing pool."""
        self.start()
        return deferToThreadPool(self.reactor, self.pool, fn, *args)


    def read_blob(self, digest: str) -> Deferred:
        """The stored bytes of a blob, read on the parsing pool; an evicted blob comes back from the archive."""
        d = self.run_blocking(self.blobs.get, digest)
        if self._restore is not None:

            def from_archive(failure):
                failure.trap(FileNotFoundError)
                return self._restore(digest)

            d.addErrback(from_archive)
        return d

    # -- entry points -------------------------------------------------------------------------

    def receive_dicom(self, data: bytes, *, transport: str, origin: str, peer: str | None = None,
                      user: str | None = None) -> Deferred:
        """A bare DICOM Part 10 object (C-STORE, STOW-RS, watched folder); ``peer`` is the
        connection's client IP, if there is one; ``user`` the name of the credential the sender
        proved (a centre's, a viewer's), which its audit records carry instead of ``origin``."""
        return ensureDeferred(self._measured(
            self._audited(self._receive_dicom(data, transport, origin, peer, user),
                          transport=transport, user=user or origin, peer=peer),
            transport, len(data), time.monotonic()))

    def accept_association(self, calling_ae: str, called_ae: str, peer: str) -> Deferred:
        """Deferred None if a DICOM peer may associate, else the reason (``medd_accept_association``)."""
        return ensureDeferred(self._accept_association(calling_ae, called_ae, peer))

    async def _accept_association(self, calling_ae: str, called_ae: str, peer: str) -> str | None:
        verdict = await hook_value(self.plugins.manager.hook.medd_accept_association(
            calling_ae=calling_ae, called_ae=called_ae, peer=peer))
        return verdict or None

    def receive_package(self, data: bytes, *, transport: str, peer: str | None = None,
                        credentials: str | None = None, user: str | None = None) -> Deferred:
        """A package (SMTP, TLS frame, HTTP POST /packages).

        ``credentials`` is what the sender authenticated with, if anything
        (an HTTP bearer token); ``peer`` is the connection's identity (client
        IP, or a TLS client certificate's CN).
        """
        return self.receive_packages([data], transport=transport, peer=peer, credentials=credentials, user=user)[0]

    def receive_packages(self, frames: list[bytes], *, transport: str, peer: str | None = None,
                         credentials: str | None = None, user: str | None = None) -> list[Deferred]:
        """Packages from one connection, in the order they arrived (a TLS sender's pipelined
        frames): one Deferred each, as :meth:`receive_package` gives.

        They go through the ingest together: one hop to the parsing pool reads them all, their
        senders are checked together, one hop writes their blobs, and their index rows are
        queued to the database together, in order (one transaction and one commit for all,
        see :meth:`medd.storage.database.Database.run`). Each is still refused or failed on its
        own. An overlay, report or status waits until what came before it is indexed: the
        sender policy may ask whether its study already holds the centre's images.
        """
        started = time.monotonic()
        outcomes = [Deferred() for _ in frames]
        done = ensureDeferred(self._receive_all(list(frames), transport, peer, credentials, user, outcomes))

        def unexpected(failure):
            # A bug, not a refusal: every package not answered yet fails with it (the sender retries).
            for d in outcomes:
                if not d.called:
                    d.errback(failure)

        done.addErrback(unexpected)
        return [ensureDeferred(self._measured(self._audited(_outcome(d), transport=transport, peer=peer, user=user),
                                              transport, len(frame), started))
                for d, frame in zip(outcomes, frames)]

    async def _measured(self, receiving, transport: str, size: int, started: float) -> "Stored":
        """``await receiving``, counting its outcome, bytes and latency in the node's metrics."""
        if self.metrics is None:
            return await receiving
        try:
            stored = await receiving
        except Refused as e:
            outcome = e.kind if e.kind in ("too-large", "conflict", "unauthenticated") else "refused"
            self.metrics.received(transport, outcome, size, time.monotonic() - started)
            raise
        except StoreFailed:
            self.metrics.received(transport, "failed", size, time.monotonic() - started)
            raise
        self.metrics.received(transport, "stored" if stored.created else "duplicate", size, time.monotonic() - started)
        return stored

    async def _audited(self, receiving, **who) -> "Stored":
        """``await receiving``, recording a refusal or failure that the index transaction did not."""
        try:
            return await receiving
        except Refused as e:
            if self.audit is not None and not e.audited:
                event = "auth-refused" if e.kind == "unauthenticated" else "store"
                await self._audit_quietly(event, outcome=SERIOUS_FAILURE, detail=e.reason,
                                          **{**who, "user": e.origin or who.get("user")})
                e.audited = True
            raise
        except StoreFailed as e:
            if self.audit is not None:
                await self._audit_quietly("store", outcome=MAJOR_FAILURE, detail=str(e), **who)
            raise

    async def _audit_quietly(self, event: str, **fields) -> None:
        try:
            await self.audit.record(event, **fields)
        except Exception:
            # Its cause (the database) already fails the store itself, which the sender is told.
            log.failure("cannot record the {event} refusal in the audit trail", event=event)

    # -- implementation -------------------------------------------------------------------------

    def _check_size(self, data: bytes, transport: str) -> None:
        if len(data) > self.max_object_size:
            raise Refused(f"{len(data)} bytes exceeds the limit of {self.max_object_size} bytes", "too-large")
        if self._admit is not None:
            self._admit(len(data), transport)

    def _parse_and_put(self, data: bytes):
        """Blocking: parse + write the blob (one hop for both)."""
        try:
            content = parse_part10(data, max_inflated_size=self.max_object_size)
        except InvalidObject as e:
            raise Refused(e.reason) from e
        return content, self._put(content.data)

    def _put(self, data: bytes):
        try:
            blob = self.blobs.put(data)
        except OSError as e:
            raise StoreFailed(f"cannot write to the blob store: {e}") from e
        # put() left the blob young (written or touched now), so the sweep cannot take it
        # before this pin is in place; _index releases it once the outcome is known.
        with self._writing_lock:
            self._writing[blob.digest] += 1
        return blob

    def writing(self) -> frozenset[str]:
        """The digests of blobs written for ingests that have not committed (or failed) yet."""
        with self._writing_lock:
            return frozenset(self._writing)

    def _written(self, digest: str) -> None:
        with self._writing_lock:
            self._writing[digest] -= 1
            if self._writing[digest] <= 0:
                del self._writing[digest]

    async def _receive_dicom(self, data: bytes, transport: str, origin: str, peer: str | None,
                             user: str | None) -> Stored:
        self._check_size(data, transport)
        parsed = await self.run_blocking(self._parse_and_put, data)
        return await self._index_dicom(parsed, transport, origin, peer, user)

    def receive_dicom_waiting(self, data: bytes, *, transport: str, origin: str, peer: str | None = None,
                              user: str | None = None) -> Stored:
        """:meth:`receive_dicom` for a caller on a thread of its own that waits for the outcome (a
        pynetdicom association thread), never the reactor's: returns the :class:`Stored` or raises.

        The object is parsed and its blob written on the calling thread, which would only wait
        for the parsing pool otherwise; just the indexing goes through the reactor. That is one
        round trip between threads per object instead of three.
        """
        started = time.monotonic()
        try:
            self._check_size(data, transport)
            parsed = self._parse_and_put(data)
        except (Refused, StoreFailed) as e:
            parsed = e  # raised on the reactor, where it is audited
        return blockingCallFromThread(self.reactor, self._receive_parsed, parsed, transport, origin, peer, user,
                                      len(data), started)

    def _receive_parsed(self, parsed, transport: str, origin: str, peer: str | None, user: str | None, size: int,
                        started: float) -> Deferred:
        return ensureDeferred(self._measured(
            self._audited(self._index_dicom(parsed, transport, origin, peer, user),
                          transport=transport, user=user or origin, peer=peer),
            transport, size, started))

    async def _index_dicom(self, parsed, transport: str, origin: str, peer: str | None,
                           user: str | None = None) -> Stored:
        if isinstance(parsed, Exception):
            raise parsed
        content, blob = parsed
        record = ObjectRecord.from_keyinfo(
            content.keyinfo,
            object_type=classify(content.keyinfo),
            media_type=content.media_type,
            digest=blob.digest,
            size=blob.size,
            origin=origin,
            transport=transport,
            received_at=self.index.now(),
            peer=peer,
        )
        outcome = await self._index(record, None, blob, peer, user)
        return self._stored(outcome)

    def _read_package(self, data: bytes, store: bool):
        try:
            package = read_package(data, self.plugins.object_type, self.max_object_size, self.part_limits)
        except InvalidObject as e:
            raise Refused(e.reason) from e
        if package.attachment.type == "status" or not store:
            return package, None
        return package, self._put(package.content.data)

    def _read_packages(self, frames: list, store: bool) -> list:
        """Blocking: :meth:`_read_package` of each frame (an exception instead: already an exception, or
        its own :class:`Refused` or :class:`StoreFailed`)."""
        return [frame if isinstance(frame, Exception) else _caught(self._read_package, frame, store)
                for frame in frames]

    def _put_all(self, datas: list[bytes]) -> list:
        """Blocking: :meth:`_put` of each (its :class:`StoreFailed` instead, for one that failed)."""
        return [_caught(self._put, data) for data in datas]

    def _has_sender_policy(self) -> bool:
        return bool(self.plugins.manager.hook.medd_check_sender.get_hookimpls())

    async def _check_sender(self, package: Package, transport: str, peer: str | None, credentials: str | None,
                            signer: str | None = None) -> None:
        keyinfo = package.content.keyinfo
        claim = SenderClaim(
            object_type=package.attachment.type, origin=package.origin.strip().lower(), transport=transport,
            peer=peer, credentials=credentials,
            study_uid=(keyinfo.study_instance_uid if keyinfo is not None else None) or package.attachment.get("study-uid"),
            signer=signer,
        )
        verdict = await hook_value(self.plugins.manager.hook.medd_check_sender(claim=claim))
        if verdict:
            refused = Refused(verdict, "unauthenticated")
            refused.origin = claim.origin
            raise refused

    async def _receive_all(self, frames: list[bytes], transport: str, peer: str | None, credentials: str | None,
                           user: str | None, outcomes: list[Deferred]) -> None:
        """Fire ``outcomes[i]`` with the :class:`Stored` of ``frames[i]``, or fail it with its refusal."""

        def settle(i: int, value) -> None:
            if isinstance(value, Exception):
                outcomes[i].errback(Failure(value))
            else:
                outcomes[i].callback(value)

        checked, signers = [], [None] * len(frames)
        for i, frame in enumerate(frames):
            try:
                self._check_size(frame, transport)
                if self.smime is not None:
                    # Before anything else: a signature that does not verify leaves nothing parsed or stored.
                    frame, signers[i] = await self.smime.open(frame, transport, self.run_blocking)
                checked.append(frame)
            except (Refused, StoreFailed) as e:
                checked.append(e)
        policy = self._has_sender_policy()
        # With a sender policy, blobs are written only after their sender passed: a
        # refused package leaves nothing behind.
        read = await self.run_blocking(self._read_packages, checked, not policy)
        live = []
        for i, got in enumerate(read):
            if isinstance(got, Exception):
                settle(i, got)
            else:
                live.append((i, *got))
        # Runs that start at an overlay, report or status: each waits for the run before it.
        runs: list[list] = []
        for item in live:
            if not runs or item[1].attachment.type in ("overlay", "report", "status"):
                runs.append([])
            runs[-1].append(item)
        for run in runs:
            if policy:
                run = await self._senders_checked(run, transport, peer, credentials, signers, settle)
            await self._index_run(run, transport, peer, user, settle)

    async def _senders_checked(self, run: list, transport: str, peer: str | None, credentials: str | None,
                               signers: list, settle) -> list:
        """The packages of ``run`` whose sender passed, with their blobs written (one hop for all)."""
        # Asked all at once: the directory looks them up together.
        checks = [ensureDeferred(self._check_sender(package, transport, peer, credentials, signers[i]))
                  for i, package, _ in run]
        passed = []
        for (i, package, blob), check in zip(run, checks):
            try:
                await check
                passed.append((i, package, blob))
            except Exception as e:
                settle(i, e)
        to_put = [item for item in passed if item[1].attachment.type != "status"]
        blobs = iter(await self.run_blocking(self._put_all, [package.content.data for _, package, _ in to_put])
                     if to_put else ())
        written = []
        for i, package, blob in passed:
            if package.attachment.type != "status":
                blob = next(blobs)
                if isinstance(blob, Exception):
                    settle(i, blob)
                    continue
            written.append((i, package, blob))
        return written

    async def _index_run(self, run: list, transport: str, peer: str | None, user: str | None, settle) -> None:
        # Each started in order before any is awaited: their statements reach the database
        # together and in arrival order.
        started = [(i, ensureDeferred(self._store_package(package, blob, transport, peer, user)))
                   for i, package, blob in run]
        for i, d in started:
            try:
                settle(i, await d)
            except Exception as e:
                settle(i, e)

    async def _store_package(self, package: Package, blob, transport: str, peer: str | None,
                             user: str | None = None) -> Stored:
        receipt = Receipt(
            message_id=package.message_id,
            attachment=str(package.attachment),
            uid=package.attachment.uid,
            origin=package.origin,
            destination=package.destination,
            transport=transport,
            peer=peer,
        )
        if package.attachment.type == "status":
            return await self._status(package, receipt)
        record = self._package_record(package, blob, transport, peer)
        outcome = await self._index(record, receipt, blob, peer, user, self._with_package(package))
        return self._stored(outcome, package.message_id)

    def _package_record(self, package: Package, blob, transport: str, peer: str | None) -> ObjectRecord:
        content: Content = package.content
        common = dict(
            object_type=package.attachment.type,
            media_type=content.media_type,
            digest=blob.digest,
            size=blob.size,
            origin=package.origin,
            transport=transport,
            received_at=self.index.now(),
            peer=peer,
        )
        if self._delivery_facts:
            common.update(centre=package.centre, study_images=package.study_images)
        if content.keyinfo is not None:
            # The package's To is kept in its receipt; intended_recipients
            # holds only what the object itself says (0040,1010).
            return ObjectRecord.from_keyinfo(content.keyinfo, **common)
        # A plain-text report: its identity is the header's, already checked.
        return ObjectRecord(
            sop_instance_uid=package.attachment.uid,
            study_instance_uid=package.attachment.get("study-uid"),
            **common,
        )

    async def _status(self, package: Package, receipt: Receipt) -> Stored:
        params = package.content.params
        event = StatusEvent(receipt=receipt, event=params["event"], uid=params["uid"], user=params.get("user"),
                            time=params.get("time"), viewer=params.get("viewer"), reason=params.get("reason"))
        try:
            created = await self._record_status(event)
        except Exception as e:
            raise StoreFailed(f"cannot index the status message: {e}") from e
        if created and event.event == "opened" and self.audit is not None:
            await self.audit.record("view", user=event.user, credential=receipt.origin, peer=receipt.peer,
                                    transport=receipt.transport, sop_instance_uid=event.uid,
                                    detail=f"opened on {event.viewer or receipt.origin}")
        return Stored(uid=params["uid"], object_type="status", digest=None, created=created, message_id=package.message_id)

    def _audit_store(self, record: ObjectRecord, peer: str | None, user: str | None = None):
        """What writes the store's audit record in the index transaction (None without an audit trail).

        Its user is the name of the credential the sender proved, when it proved one (the origin,
        an address or AE title, is then kept as the record's credential), else the origin."""
        if self.audit is None:
            return None

        def then(conn, outcome: StoreOutcome) -> None:
            detail = outcome.conflict or (None if outcome.created else "already stored")
            entry = self.audit.entry(
                "store", outcome=SERIOUS_FAILURE if outcome.conflict else SUCCESS, user=user or record.origin,
                credential=record.origin if user else None, peer=peer,
                transport=record.transport, patient_id=record.patient_id,
                study_instance_uid=record.study_instance_uid, series_instance_uid=record.series_instance_uid,
                sop_instance_uid=record.sop_instance_uid, detail=detail)
            self.audit.appender(entry)(conn)

        return then

    def _with_package(self, package: Package):
        """``index_with`` and ``package_with`` for an object that came in ``package``, in one call."""
        if self.package_with is None:
            return self._index_with
        index_with, package_with = self._index_with, self.package_with

        def both(conn, record):
            if index_with is not None:
                index_with(conn, record)
            package_with(conn, record, package)

        return both

    async def _index(self, record: ObjectRecord, receipt: Receipt | None, blob, peer: str | None = None,
                     user: str | None = None, with_new: Callable | None = None) -> StoreOutcome:
        try:
            outcome = await self.index.store_object(record, receipt, with_new or self._index_with,
                                                    self._audit_store(record, peer, user))
        except Exception as e:
            log.failure("indexing {uid} failed", uid=record.sop_instance_uid)
            raise StoreFailed(f"cannot index the object: {e}") from e
        finally:
            self._written(blob.digest)
        # Bytes this call wrote that no row keeps (a refused conflict, a duplicate
        # package with other content) are left to the blob sweep: deleting them here
        # could take a blob that an identical put, indexing at this moment, relies on.
        if outcome.conflict:
            log.warn("{uid} from {origin} refused as a conflict: {reason}", uid=record.sop_instance_uid,
                     origin=record.origin, reason=outcome.conflict)
            refused = Refused(outcome.conflict, "conflict")
            refused.audited = self.audit is not None
            raise refused
        if self.audit is not None:
            self.audit.recorded()
        # One event per object, its UIDs and where it came from as fields (the JSON log keeps them all).
        log.info("{what} {object_type} {uid} from {origin} over {transport}",
                 what="stored" if outcome.created else "already had", object_type=record.object_type,
                 uid=record.sop_instance_uid, study_uid=record.study_instance_uid,
                 series_uid=record.series_instance_uid, origin=record.origin, transport=record.transport,
                 peer=peer, message_id=receipt.message_id if receipt is not None else None, digest=record.digest)
        if outcome.created:
            await self._notify(outcome.record)
        return outcome

    async def _notify(self, record: ObjectRecord) -> None:
        for result in self.plugins.manager.hook.medd_object_stored(stored=record):
            try:
                await hook_value(result)
            except Exception:
                log.failure("a medd_object_stored hook failed for {uid}", uid=record.sop_instance_uid)

    @staticmethod
    def _stored(outcome: StoreOutcome, message_id: str | None = None) -> Stored:
        r = outcome.record
        return Stored(
            uid=r.sop_instance_uid,
            object_type=r.object_type,
            digest=r.digest,
            created=outcome.created,
            message_id=message_id,
            study_instance_uid=r.study_instance_uid,
            series_instance_uid=r.series_instance_uid,
            sop_class_uid=r.sop_class_uid,
        )
