"""The blob sweep: at start and then every hour (``[storage] sweep_interval``),
remove the blobs no row references that are older than an hour
(``[storage] sweep_grace``) and that no ingest of this process is still
indexing, so that nothing a crash or a refused object left behind stays in the
blob store. Role-free; a node runs one over its index."""
from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from medd.plugins.interfaces import ISweepableBlobStore

SWEEP_INTERVAL = 3600.0
# A blob younger than this may belong to an object still on its way to the
# index (written, not yet committed), so it is never swept.
MIN_AGE = 3600.0
PREFIXES = [f"{i:02x}" for i in range(256)]


class BlobSweep(Service):
    """Removes unreferenced old blobs on the injected clock, at start and every ``interval``.

    ``run_blocking(fn, *args)`` runs blob-store calls off the reactor (the
    ingest's parsing pool, which does the node's other blob I/O); the index
    (:meth:`~medd.storage.index.ObjectIndex.unreferenced`) says which digests
    no table references. A store that cannot list its blobs is not swept.
    """

    log = Logger()

    def __init__(self, clock, index, blobs, run_blocking, *, interval: float = SWEEP_INTERVAL,
                 min_age: float = MIN_AGE, writing=frozenset):
        self.clock = clock
        self.index = index
        self.blobs = blobs
        self.run_blocking = run_blocking
        self.interval = interval
        self.min_age = min_age
        # () -> the digests an ingest has written and not yet committed (however old).
        self.writing = writing
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        if not ISweepableBlobStore.providedBy(self.blobs):
            self.log.info("the blob store cannot list its blobs: no sweep")
            return
        self._loop = LoopingCall(self._pass)
        self._loop.clock = self.clock
        # At start too: what the last run's crash left goes without waiting for the interval.
        self._loop.start(self.interval, now=True)

    def stopService(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return super().stopService()

    def _pass(self):
        d = self.sweep()
        d.addErrback(lambda f: self.log.failure("the blob sweep failed", f))
        return d

    def sweep(self):
        """Deferred number of blobs removed by one pass."""
        return ensureDeferred(self._sweep())

    async def _sweep(self) -> int:
        before = self.clock.seconds() - self.min_age
        removed = 0
        for prefix in PREFIXES:
            candidates = await self.run_blocking(self.blobs.stale, before, prefix)
            if not candidates:
                continue
            for digest in sorted(await self.index.unreferenced(candidates)):
                if digest in self.writing():
                    continue  # its ingest is still on the way to its index commit
                # Checked again at removal: a re-put since the listing made it young.
                if await self.run_blocking(self.blobs.delete_stale, digest, before):
                    removed += 1
                    self.log.info("swept the unreferenced blob {digest}", digest=digest)
        return removed
