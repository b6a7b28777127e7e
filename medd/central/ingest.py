"""The one ingest path every receiver feeds.

Received bytes are parsed and checked on the parsing thread pool, written to
the blob store (fsync'd), indexed in the database, and only then does the
returned Deferred fire, so a transport acknowledges what is durable and
nothing else. Refusals raise :class:`Refused`; failures of medd itself
(disk full, database down) raise :class:`StoreFailed` so that the sender is
told to try again rather than that its data is bad.
"""
from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from medd.objects import Content, InvalidObject, classify, parse_part10
from medd.package import Package, PackageError, read_package
from medd.storage import index
from medd.storage.index import ObjectRecord, Receipt, StoreOutcome

log = Logger()


class Refused(Exception):
    """The data is refused; resending it unchanged will not help.

    ``kind`` is ``"invalid"`` or ``"too-large"``; transports map it to their
    own status (DICOM failure status, SMTP 5xx, HTTP 4xx, TLS refusal).
    """

    def __init__(self, reason: str, kind: str = "invalid"):
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


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
    """Parse, check, store, index. Every method returns a Deferred."""

    def __init__(self, reactor, database, blobs, plugins, *, parse_threads: int = 2, max_object_size: int):
        self.reactor = reactor
        self.db = database
        self.blobs = blobs
        self.plugins = plugins
        self.max_object_size = max_object_size
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

    def _off_reactor(self, fn, *args) -> Deferred:
        self.start()
        return deferToThreadPool(self.reactor, self.pool, fn, *args)

    # -- entry points -------------------------------------------------------------------------

    def receive_dicom(self, data: bytes, *, transport: str, origin: str) -> Deferred:
        """A bare DICOM Part 10 object (C-STORE, STOW-RS, watched folder)."""
        return ensureDeferred(self._receive_dicom(data, transport, origin))

    def receive_package(self, data: bytes, *, transport: str, peer: str | None = None,
                        credentials: str | None = None) -> Deferred:
        """A package (SMTP, TLS frame, HTTP POST /packages).

        ``credentials`` is what the sender authenticated with, if anything
        (an HTTP bearer token); ``peer`` is the connection's identity (client
        IP, or a TLS client certificate's CN).
        """
        return ensureDeferred(self._receive_package(data, transport, peer, credentials))

    # -- implementation -------------------------------------------------------------------------

    def _check_size(self, data: bytes) -> None:
        if len(data) > self.max_object_size:
            raise Refused(f"{len(data)} bytes exceeds the limit of {self.max_object_size} bytes", "too-large")

    def _parse_and_put(self, data: bytes):
        """Blocking: parse + write the blob (one hop for both)."""
        try:
            content = parse_part10(data)
        except InvalidObject as e:
            raise Refused(e.reason) from e
        return content, self._put(content.data)

    def _put(self, data: bytes):
        try:
            return self.blobs.put(data)
        except OSError as e:
            raise StoreFailed(f"cannot write to the blob store: {e}") from e

    async def _receive_dicom(self, data: bytes, transport: str, origin: str) -> Stored:
        self._check_size(data)
        content, blob = await self._off_reactor(self._parse_and_put, data)
        record = ObjectRecord.from_keyinfo(
            content.keyinfo,
            object_type=classify(content.keyinfo),
            media_type=content.media_type,
            digest=blob.digest,
            size=blob.size,
            origin=origin,
            transport=transport,
            received_at=index.now(),
        )
        outcome = await self._index(record, None, blob)
        return self._stored(outcome)

    def _read_package(self, data: bytes, store: bool):
        try:
            package = read_package(data, self.plugins.object_type, self.max_object_size)
        except PackageError as e:
            raise Refused(e.reason) from e
        except InvalidObject as e:
            raise Refused(e.reason) from e
        if package.attachment.type == "status" or not store:
            return package, None
        return package, self._put(package.content.data)

    # Set by the node's role: ``await sender_check(package, transport, peer,
    # credentials)`` raises Refused for a sender that may not send this package.
    sender_check = None

    async def _receive_package(self, data: bytes, transport: str, peer: str | None, credentials: str | None) -> Stored:
        self._check_size(data)
        check = self.sender_check
        # With a check, the blob is written only after it passed: a refused
        # package leaves nothing behind.
        package, blob = await self._off_reactor(self._read_package, data, check is None)
        if check is not None:
            await check(package, transport, peer, credentials)
            if package.attachment.type != "status":
                blob = await self._off_reactor(self._put, package.content.data)
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
        record = self._package_record(package, blob, transport)
        outcome = await self._index(record, receipt, blob)
        stored = self._stored(outcome, package.message_id)
        log.info(
            "package {message_id} from {origin} ({attachment}) {what}",
            message_id=package.message_id, origin=package.origin, attachment=str(package.attachment),
            what="stored" if stored.created else "already stored",
        )
        return stored

    def _package_record(self, package: Package, blob, transport: str) -> ObjectRecord:
        content: Content = package.content
        common = dict(
            object_type=package.attachment.type,
            media_type=content.media_type,
            digest=blob.digest,
            size=blob.size,
            origin=package.origin,
            transport=transport,
            received_at=index.now(),
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
        try:
            created = await self.db.run(lambda conn: _store_status(conn, receipt, params))
        except Exception as e:
            raise StoreFailed(f"cannot index the status message: {e}") from e
        return Stored(uid=params["uid"], object_type="status", digest=None, created=created, message_id=package.message_id)

    async def _index(self, record: ObjectRecord, receipt: Receipt | None, blob) -> StoreOutcome:
        try:
            outcome = await self.db.run(lambda conn: index.store_object(conn, record, receipt))
        except Exception as e:
            log.failure("indexing {uid} failed", uid=record.sop_instance_uid)
            raise StoreFailed(f"cannot index the object: {e}") from e
        if outcome.conflict:
            log.warn(
                "{uid} is already stored with other content; the first version is kept",
                uid=record.sop_instance_uid,
            )
            if blob.created:
                await self._off_reactor(self.blobs.delete, blob.digest)
        elif outcome.created:
            await self._notify(outcome.record)
        return outcome

    async def _notify(self, record: ObjectRecord) -> None:
        for result in self.plugins.manager.hook.medd_object_stored(stored=record):
            try:
                await ensureDeferred(result) if not isinstance(result, Deferred) else await result
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


def _store_status(conn, receipt: Receipt, params: dict) -> bool:
    """Record a status message and, for "opened", move the delivery to opened (one transaction)."""
    from medd.central.tracking import mark_opened

    created = index.store_status(conn, receipt, params["event"], params["uid"], params.get("user"), params.get("time"))
    if created and params["event"] in ("opened", "viewed"):
        mark_opened(conn, params["uid"], receipt.origin, params.get("user"), params.get("time"))
    return created


class ReceiverAPI:
    """The narrow facade a transport plugin receives: how data enters the node,
    and the read-only queries the HTTP transport needs for DICOMweb."""

    def __init__(self, reactor, ingest: Ingest, database, blobs, config):
        self.reactor = reactor
        self._ingest = ingest
        self._db = database
        self._blobs = blobs
        self.node_name = config.name
        self.ae_title = config.dicom_ae_title
        self.max_object_size = config.max_object_size
        self.tls_certificate = config.tls_certificate
        self.tls_private_key = config.tls_private_key
        self.tls_client_ca = config.tls_client_ca  # PEM of CAs whose client certificates the tls listener requires
        self._config = config
        # HTTP resources the node adds to its HTTP listener ({b"name": Resource}).
        self.web_resources: dict = {}

    def settings(self, section: str) -> dict[str, str]:
        """The raw keys of the config section a transport owns."""
        return self._config.section(section)

    def receive_dicom(self, data: bytes, *, transport: str, origin: str) -> Deferred:
        return self._ingest.receive_dicom(data, transport=transport, origin=origin)

    def receive_package(self, data: bytes, *, transport: str, peer: str | None = None,
                        credentials: str | None = None) -> Deferred:
        return self._ingest.receive_package(data, transport=transport, peer=peer, credentials=credentials)

    def query(self, fn, *args, **kw) -> Deferred:
        """Run an :mod:`medd.storage.index` query function on the database pool."""
        return self._db.run(lambda conn: fn(conn, *args, **kw))

    # Set by the node when an archive is configured: ``restore_blob(digest)``
    # returns a Deferred of the bytes, put back into the working store.
    restore_blob = None

    def read_blob(self, digest: str) -> Deferred:
        """The stored bytes of a blob, read on the parsing pool; an evicted blob comes back from the archive."""
        d = self._ingest._off_reactor(self._blobs.get, digest)
        if self.restore_blob is not None:

            def from_archive(failure):
                failure.trap(FileNotFoundError)
                return self.restore_blob(digest)

            d.addErrback(from_archive)
        return d

    def run_blocking(self, fn, *args) -> Deferred:
        """Run a short blocking call (reading a request body, parsing) off the reactor."""
        return self._ingest._off_reactor(fn, *args)
