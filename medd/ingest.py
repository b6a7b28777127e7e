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

from dataclasses import dataclass
from typing import Callable

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import blockingCallFromThread, deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from medd.audit import MAJOR_FAILURE, SERIOUS_FAILURE, SUCCESS, AuditTrail
from medd.objects import Content, InvalidObject, classify, parse_part10
from medd.package import Package, read_package
from medd.plugins.hookspecs import SenderClaim
from medd.plugins.host import hook_value
from medd.storage.index import ObjectIndex, ObjectRecord, Receipt, StatusEvent, StoreOutcome

log = Logger()


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
    refused authentication, an ``opened`` status as a view.
    """

    def __init__(self, reactor, index: ObjectIndex, blobs, plugins, *, max_object_size: int, parse_threads: int = 2,
                 record_status: Callable[[StatusEvent], Deferred] | None = None,
                 restore: Callable[[str], Deferred] | None = None,
                 admit: Callable[[int, str], None] | None = None,
                 index_with: Callable | None = None, audit: AuditTrail | None = None, smime=None):
        self.reactor = reactor
        self.index = index
        self.blobs = blobs
        self.plugins = plugins
        self.max_object_size = max_object_size
        self._record_status = record_status or index.store_status
        self._restore = restore
        self._admit = admit
        self._index_with = index_with
        self.audit = audit
        # A medd.mail.smime.SmimeOpener when the node has an S/MIME identity ([mail] smime_certificate).
        self.smime = smime
        self.pool = ThreadPool(minthreads=1, maxthreads=parse_threads, name="medd-parse")
        self._started = False

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

    def receive_dicom(self, data: bytes, *, transport: str, origin: str, peer: str | None = None) -> Deferred:
        """A bare DICOM Part 10 object (C-STORE, STOW-RS, watched folder); ``peer`` is the
        connection's client IP, if there is one."""
        return ensureDeferred(self._audited(self._receive_dicom(data, transport, origin, peer),
                                            transport=transport, user=origin, peer=peer))

    def accept_association(self, calling_ae: str, called_ae: str, peer: str) -> Deferred:
        """Deferred None if a DICOM peer may associate, else the reason (``medd_accept_association``)."""
        return ensureDeferred(self._accept_association(calling_ae, called_ae, peer))

    async def _accept_association(self, calling_ae: str, called_ae: str, peer: str) -> str | None:
        verdict = await hook_value(self.plugins.manager.hook.medd_accept_association(
            calling_ae=calling_ae, called_ae=called_ae, peer=peer))
        return verdict or None

    def receive_package(self, data: bytes, *, transport: str, peer: str | None = None,
                        credentials: str | None = None) -> Deferred:
        """A package (SMTP, TLS frame, HTTP POST /packages).

        ``credentials`` is what the sender authenticated with, if anything
        (an HTTP bearer token); ``peer`` is the connection's identity (client
        IP, or a TLS client certificate's CN).
        """
        return ensureDeferred(self._audited(self._receive_package(data, transport, peer, credentials),
                                            transport=transport, peer=peer))

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
            return self.blobs.put(data)
        except OSError as e:
            raise StoreFailed(f"cannot write to the blob store: {e}") from e

    async def _receive_dicom(self, data: bytes, transport: str, origin: str, peer: str | None) -> Stored:
        self._check_size(data, transport)
        parsed = await self.run_blocking(self._parse_and_put, data)
        return await self._index_dicom(parsed, transport, origin, peer)

    def receive_dicom_waiting(self, data: bytes, *, transport: str, origin: str, peer: str | None = None) -> Stored:
        """:meth:`receive_dicom` for a caller on a thread of its own that waits for the outcome (a
        pynetdicom association thread), never the reactor's: returns the :class:`Stored` or raises.

        The object is parsed and its blob written on the calling thread, which would only wait
        for the parsing pool otherwise; just the indexing goes through the reactor. That is one
        round trip between threads per object instead of three.
        """
        try:
            self._check_size(data, transport)
            parsed = self._parse_and_put(data)
        except (Refused, StoreFailed) as e:
            parsed = e  # raised on the reactor, where it is audited
        return blockingCallFromThread(self.reactor, self._receive_parsed, parsed, transport, origin, peer)

    def _receive_parsed(self, parsed, transport: str, origin: str, peer: str | None) -> Deferred:
        return ensureDeferred(self._audited(self._index_dicom(parsed, transport, origin, peer),
                                            transport=transport, user=origin, peer=peer))

    async def _index_dicom(self, parsed, transport: str, origin: str, peer: str | None) -> Stored:
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
        outcome = await self._index(record, None, blob, peer)
        return self._stored(outcome)

    def _read_package(self, data: bytes, store: bool):
        try:
            package = read_package(data, self.plugins.object_type, self.max_object_size)
        except InvalidObject as e:
            raise Refused(e.reason) from e
        if package.attachment.type == "status" or not store:
            return package, None
        return package, self._put(package.content.data)

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

    async def _receive_package(self, data: bytes, transport: str, peer: str | None, credentials: str | None) -> Stored:
        self._check_size(data, transport)
        signer = None
        if self.smime is not None:
            # Before anything else: a signature that does not verify leaves nothing parsed or stored.
            data, signer = await self.smime.open(data, transport, self.run_blocking)
        policy = self._has_sender_policy()
        # With a sender policy, the blob is written only after it passed: a
        # refused package leaves nothing behind.
        package, blob = await self.run_blocking(self._read_package, data, not policy)
        if policy:
            await self._check_sender(package, transport, peer, credentials, signer)
            if package.attachment.type != "status":
                blob = await self.run_blocking(self._put, package.content.data)
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
        outcome = await self._index(record, receipt, blob, peer)
        stored = self._stored(outcome, package.message_id)
        log.info(
            "package {message_id} from {origin} ({attachment}) {what}",
            message_id=package.message_id, origin=package.origin, attachment=str(package.attachment),
            what="stored" if stored.created else "already stored",
        )
        return stored

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

    def _audit_store(self, record: ObjectRecord, peer: str | None):
        """What writes the store's audit record in the index transaction (None without an audit trail)."""
        if self.audit is None:
            return None

        def then(conn, outcome: StoreOutcome) -> None:
            detail = outcome.conflict or (None if outcome.created else "already stored")
            entry = self.audit.entry(
                "store", outcome=SERIOUS_FAILURE if outcome.conflict else SUCCESS, user=record.origin, peer=peer,
                transport=record.transport, patient_id=record.patient_id,
                study_instance_uid=record.study_instance_uid, series_instance_uid=record.series_instance_uid,
                sop_instance_uid=record.sop_instance_uid, detail=detail)
            self.audit.appender(entry)(conn)

        return then

    async def _index(self, record: ObjectRecord, receipt: Receipt | None, blob, peer: str | None = None) -> StoreOutcome:
        try:
            outcome = await self.index.store_object(record, receipt, self._index_with, self._audit_store(record, peer))
        except Exception as e:
            log.failure("indexing {uid} failed", uid=record.sop_instance_uid)
            raise StoreFailed(f"cannot index the object: {e}") from e
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
