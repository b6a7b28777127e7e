"""What a node counts and measures, in Prometheus' text format (prometheus_client).

Counters and histograms are kept in memory as things happen (the ingest, the
router, the database pool, the blob store's fsyncs). Gauges that live in the
database (quarantine, deliveries, the archive backlog) are read when scraped,
on a thread of their own and at most once per :data:`GAUGE_CACHE_SECONDS`, so a
scrape never blocks the reactor nor queues behind the ingest's commits. Each
node has its own registry: several nodes in one process (the demo, the tests)
do not mix their figures. The page is served by the ``metrics`` transport
(``[listen] metrics = tcp:9100:interface=127.0.0.1``), on a listener of its
own so that it can be bound to a private interface.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.pages import notFound
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

log = Logger()

#: Database gauges are read at most this often, whatever the scrape interval.
GAUGE_CACHE_SECONDS = 5.0
# Latency buckets (seconds) from a local fsync to a slow C-STORE.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class NodeMetrics:
    """The node's registry and the instruments its parts report to."""

    def __init__(self, reactor, *, engine=None, role: str = "central", archiving: bool = False, thread_pool=None):
        self.reactor = reactor
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.objects_received = Counter(
            "medd_objects_received", "Objects (and packages) received, by transport and outcome "
            "(stored, duplicate, refused, too-large, conflict, unauthenticated, failed).",
            ["transport", "outcome"], registry=r)
        self.bytes_received = Counter("medd_received_bytes", "Bytes of the objects and packages received.",
                                      ["transport"], registry=r)
        self.ingest_seconds = Histogram("medd_ingest_seconds", "From an object's bytes in hand to its outcome "
                                        "(parsed, stored, fsync'd, indexed, committed).", ["transport"],
                                        buckets=_LATENCY_BUCKETS, registry=r)
        self.routing_decisions = Counter("medd_routing_decisions", "Routing decisions, by outcome "
                                         "(routed, quarantined, attached).", ["outcome"], registry=r)
        self.database_seconds = Histogram("medd_database_transaction_seconds", "One database transaction on the "
                                          "node's pool (a group commit counts once).", buckets=_LATENCY_BUCKETS,
                                          registry=r)
        self.fsync_seconds = Histogram("medd_blob_fsync_seconds", "Making one new blob durable (file and folder "
                                       "fsyncs).", buckets=_LATENCY_BUCKETS, registry=r)
        self.gauges = DatabaseGauges(engine, role=role, archiving=archiving) if engine is not None else None
        if self.gauges is not None:
            r.register(self.gauges)
        self._thread_pool = thread_pool
        self._waiting: list[Deferred] = []

    # -- reporting ---------------------------------------------------------------------------------

    def received(self, transport: str, outcome: str, size: int, seconds: float) -> None:
        self.objects_received.labels(transport, outcome).inc()
        self.bytes_received.labels(transport).inc(size)
        self.ingest_seconds.labels(transport).observe(seconds)

    def routed(self, outcome: str) -> None:
        self.routing_decisions.labels(outcome).inc()

    # -- scraping ----------------------------------------------------------------------------------

    def refresh(self) -> Deferred:
        """Fires once the database gauges are at most :data:`GAUGE_CACHE_SECONDS` old (read on a thread;
        scrapes that arrive meanwhile wait for the same read)."""
        gauges = self.gauges
        if gauges is None or time.monotonic() - gauges.read_at < GAUGE_CACHE_SECONDS:
            return succeed(None)
        waiter = Deferred()
        self._waiting.append(waiter)
        if len(self._waiting) == 1:
            pool = self._thread_pool or self.reactor.getThreadPool()
            deferToThreadPool(self.reactor, pool, gauges.read).addBoth(self._refreshed)
        return waiter

    def _refreshed(self, result) -> None:
        if isinstance(result, Failure):
            log.failure("reading the database gauges failed", result)
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.callback(None)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class DatabaseGauges:
    """A prometheus_client collector of what the database says now, as of its last :meth:`read`."""

    def __init__(self, engine, *, role: str, archiving: bool):
        self.engine = engine
        self.role = role
        self.archiving = archiving
        self.read_at = float("-inf")
        self._families: list = []

    def describe(self):
        return []  # families vary with what the database holds; described at collection

    def collect(self):
        return list(self._families)

    def read(self) -> None:
        """Blocking: run the queries and keep the families (a failure keeps the previous ones and is logged)."""
        started = time.monotonic()
        try:
            with self.engine.connect() as conn:
                families = self._central(conn) if self.role == "central" else []
                if self.archiving:
                    families.append(self._archive_backlog(conn))
        except Exception:
            log.failure("reading the database gauges failed")
            families = None
        if families is not None:
            scrape = GaugeMetricFamily("medd_database_gauges_seconds", "Time the last read of the database gauges "
                                       "took.", value=time.monotonic() - started)
            self._families = families + [scrape]
        self.read_at = time.monotonic()

    @staticmethod
    def _central(conn) -> list:
        from sqlalchemy import and_, case, func, or_, select

        from medd.storage.routing_tables import deliveries, quarantine

        held = conn.execute(select(func.count()).select_from(quarantine).where(quarantine.c.state == "held")).scalar()
        families = [GaugeMetricFamily("medd_quarantine_held", "Objects held in quarantine for an administrator.",
                                      value=held or 0)]
        d = deliveries.c
        by_state = GaugeMetricFamily("medd_deliveries", "Deliveries by state and destination (viewer or centre).",
                                     labels=["state", "viewer"])
        retries = GaugeMetricFamily("medd_delivery_retries", "Attempts beyond the first, summed over the deliveries "
                                    "to each destination.", labels=["viewer"])
        retry_sums: dict[str, int] = {}
        for state, viewer, count, extra in conn.execute(
                select(d.state, d.destination, func.count(), func.sum(case((d.attempts > 1, d.attempts - 1), else_=0)))
                .group_by(d.state, d.destination)):
            by_state.add_metric([state, viewer], count)
            retry_sums[viewer] = retry_sums.get(viewer, 0) + int(extra or 0)
        for viewer, total in sorted(retry_sums.items()):
            retries.add_metric([viewer], total)
        waiting = or_(d.state == "queued", and_(d.state == "failed", d.next_attempt_at.isnot(None)))
        oldest = GaugeMetricFamily("medd_oldest_waiting_delivery_age_seconds", "Age of the oldest delivery still "
                                   "waiting (queued, or failed and to be retried), per destination.", labels=["viewer"])
        now = datetime.now(timezone.utc)
        for viewer, created in conn.execute(select(d.destination, func.min(d.created_at)).where(waiting)
                                            .group_by(d.destination)):
            if isinstance(created, str):
                created = datetime.fromisoformat(created)
            if created.tzinfo is None:
                created = created.replace(tzinfo=timezone.utc)
            oldest.add_metric([viewer], max(0.0, (now - created).total_seconds()))
        return families + [by_state, retries, oldest]

    @staticmethod
    def _archive_backlog(conn):
        from sqlalchemy import exists, func, select

        from medd.storage.routing_tables import routing_decisions
        from medd.storage.schema import archived_objects, objects

        o = objects.c
        count, size = conn.execute(
            select(func.count(), func.coalesce(func.sum(o.size), 0))
            .select_from(objects.join(routing_decisions, routing_decisions.c.uid == o.sop_instance_uid))
            .where(~exists().where(archived_objects.c.sop_instance_uid == o.sop_instance_uid))).one()
        family = GaugeMetricFamily("medd_archive_backlog", "Objects routed and not yet archived, and their bytes.",
                                   labels=["unit"])
        family.add_metric(["objects"], count)
        family.add_metric(["bytes"], size)
        return family


class MetricsPage(Resource):
    """``GET /metrics`` (the only page of the metrics listener)."""

    def __init__(self, metrics: NodeMetrics):
        super().__init__()
        self.putChild(b"metrics", _Exposition(metrics))

    def getChild(self, path, request):
        return notFound()

    def render_GET(self, request):
        return notFound().render(request)


class _Exposition(Resource):
    isLeaf = True

    def __init__(self, metrics: NodeMetrics):
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request):
        gone = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def write(_):
            if gone:
                return
            request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
            request.write(self.metrics.exposition())
            request.finish()

        def failed(failure):
            log.failure("the metrics page failed", failure)
            if not gone:
                request.setResponseCode(500)
                request.finish()

        self.metrics.refresh().addCallbacks(write, failed)
        return NOT_DONE_YET
