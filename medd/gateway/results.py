"""Results home to the centre's PACS: overlays (GSPS) and reports (SR) that
central sends back to the gateway are stored into ``[gateway] results_to``
by C-STORE, durably queued (:meth:`~medd.storage.forwarding.Forwarding.queue_result`),
in the order they came back, retried with backoff on the injected clock while
the PACS cannot be reached. A C-STORE failure status is recorded and not
retried; a plain-text report, which C-STORE cannot carry, is recorded as
skipped with the reason.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from medd.scheduling import CoalescingPass, PassService
from medd.storage.forwarding import (
    LOST, NOT_FORWARDED_TRANSPORTS, REFUSED, RESULT_TYPES, Forwarding, ResultItem, result_skip_reason,
)
from medd.storage.index import ObjectRecord

#: Object types that go to the PACS when central sends them back.


@dataclass(frozen=True)
class StoreOutcome:
    """How one C-STORE went: ``stored``, ``refused`` (a failure status: not retried) or ``retry``."""

    outcome: str
    detail: str


def c_store(destination, data: bytes, timeout: float) -> StoreOutcome:
    """Blocking: one association to the PACS, one C-STORE of the Part 10 ``data`` in its own
    storage SOP class and transfer syntax."""
    from pydicom import dcmread
    from pynetdicom import AE
    from pynetdicom.status import code_to_category

    ds = dcmread(io.BytesIO(data))
    ae = AE(ae_title=destination.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    tls_args = None
    if destination.tls:
        from medd.transports.tlscontexts import stdlib_client_context

        # DICOM TLS (PS3.15 B.1): the PACS verified against [gateway] ca, the gateway's client_cert presented.
        tls_args = (stdlib_client_context(destination.tls_ca, destination.tls_client_cert), destination.host)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
        return StoreOutcome("retry", f"association with {destination} {why}")
    try:
        try:
            status = assoc.send_c_store(ds)
        except ValueError as e:  # the PACS accepted no presentation context for this SOP class / syntax
            return StoreOutcome("refused", f"not accepted by the PACS: {e}")
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in status:
        return StoreOutcome("retry", "no C-STORE response (association aborted or timed out)")
    code = int(status.Status)
    category = code_to_category(code)
    if category in ("Success", "Warning"):
        return StoreOutcome("stored", f"C-STORE status 0x{code:04X}")
    comment = f" ({status.ErrorComment})" if "ErrorComment" in status else ""
    return StoreOutcome("refused", f"C-STORE status 0x{code:04X} {category}{comment}")


class ResultsToPacs(PassService):
    """Stores overlays and reports central sent back into the centre's PACS, one association each."""

    log = Logger()

    def __init__(self, reactor, forwarding: Forwarding, ingest, destination, backoff, clock, *, timeout: float = 60.0):
        self.reactor = reactor
        self.forwarding = forwarding
        self.ingest = ingest  # read_blob
        self.destination = destination  # PacsDestination
        self.backoff = backoff
        self.clock = clock
        self.timeout = timeout
        # One thread: one association at a time, in order; a slow PACS never holds the parsing pool.
        self.pool = ThreadPool(minthreads=1, maxthreads=1, name="medd-pacs")
        self.store = c_store  # blocking (destination, data, timeout) -> StoreOutcome
        self._pass = CoalescingPass(self._drain, "results to the PACS", clock)
        self._stopped = False

    def stopService(self):
        d = super().stopService()

        def stop_pool(result):
            if self.pool.started:
                self.pool.stop()
            return result

        return d.addBoth(stop_pool)

    def object_stored(self, record: ObjectRecord) -> None:
        """An overlay or report that came back from central was queued with its index row
        (:func:`~medd.storage.forwarding.queue_new_object`): send it now."""
        if record.transport not in NOT_FORWARDED_TRANSPORTS or record.object_type not in RESULT_TYPES:
            return
        reason = result_skip_reason(record)
        if reason:
            self.log.info("{uid} not sent to the PACS: {reason}", uid=record.sop_instance_uid, reason=reason)
        else:
            self.kick()

    async def _drain(self) -> int:
        stored = 0
        while not self._stopped:
            head = await self.forwarding.results_head()
            if head is None:
                break
            if self._pass.not_yet(head.next_attempt_at):
                break
            stored += await self._store(head)
        return stored

    def _blocking(self, fn, *args) -> Deferred:
        if not self.pool.started:
            self.pool.start()
        return deferToThreadPool(self.reactor, self.pool, fn, *args)

    async def _store(self, item: ResultItem) -> int:
        try:
            data = await self.ingest.read_blob(item.digest)
        except FileNotFoundError as e:
            self.log.error("the bytes of {uid} are gone from the blob store; not sent to the PACS", uid=item.uid)
            await self.forwarding.result_given_up(item, LOST, f"object bytes missing: {e}")
            return 0
        try:
            result = await self._blocking(self.store, self.destination, data, self.timeout)
        except Exception as e:
            result = StoreOutcome("retry", f"{type(e).__name__}: {e}")
        if result.outcome == "stored":
            await self.forwarding.result_stored(item)
            self.log.info("{kind} {uid} stored in the PACS {pacs}", kind=item.object_type, uid=item.uid,
                          pacs=str(self.destination))
            return 1
        if result.outcome == "refused":
            self.log.error("the PACS {pacs} refused {uid}: {detail}", pacs=str(self.destination), uid=item.uid,
                           detail=result.detail)
            await self.forwarding.result_given_up(item, REFUSED, result.detail)
            return 0
        delay = self.backoff.delay(item.attempts + 1)
        self.log.warn("cannot store {uid} in the PACS ({detail}); attempt {n}, next in {delay:.1f}s",
                      uid=item.uid, detail=result.detail, n=item.attempts + 1, delay=delay)
        await self.forwarding.result_retry_later(item, delay, result.detail)
        return 0
