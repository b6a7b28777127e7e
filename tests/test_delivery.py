"""Central's routing batches and push delivery on a fake clock: retries with
exponential backoff, giving up, head-of-line order per viewer, one unreachable
viewer never holding up another, and survival across a restart. The real
router, outbox and connectors run over a real database (SQLite and
PostgreSQL); only the clock (``twisted.internet.task.Clock``) and the network
(a fake ``ISender`` on the plugins' senders) are fakes."""
from __future__ import annotations

import email
import io
import re
from urllib.parse import urlsplit

import pytest
import pytest_twisted
from pydicom import dcmread
from pydicom.data import get_testdata_file
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from medd.central.outbox import RetryPolicy
from medd.central.routing import RoutingService
from medd.central.storage import CentralStorage
from medd.config import load_config
from medd.ingest import Ingest
from medd.plugins.host import load_plugins
from medd.plugins.interfaces import ISender
from medd.scheduling import Backoff
from medd.storage.connector import utc
from medd.storage.database import Database
from medd.storage.index import ObjectIndex
from tests.conftest import write_config

START = 1_700_000_000.0  # the fake clock's reading when a test begins
A, B = "dr-a@viewers.example", "dr-b@viewers.example"
URLS = {A: "smtp://a.invalid:25", B: "smtp://b.invalid:25"}
# poll_interval is long so that only the test's kicks and the clock's wake-ups
# move anything.
SETTINGS = ("[delivery]\nretry_base = 5\nretry_multiplier = 2\nretry_max_delay = 60\nmax_attempts = 4\n"
            "poll_interval = 3600\nroute_delay = 0.05\n")


@implementer(ISender)
class FakeSender:
    """Pushes nowhere: records what it was given, per host; a host may be down
    (refused at once), flaky (its first attempts refused) or hanging (the
    send waits until the test fires it)."""

    schemes = ("smtp",)

    def __init__(self):
        self.received: dict[str, list[tuple[str, str]]] = {}  # host -> [(uid, Message-ID)]
        self.down: set[str] = set()
        self.failures_left: dict[str, int] = {}  # uid -> attempts still to refuse
        self.hanging: dict[str, list[Deferred]] = {}
        self._hung: dict[str, list[Deferred]] = {}

    def hang(self, host: str) -> None:
        self.hanging[host] = []

    def hung(self, host: str) -> Deferred:
        """Fires when a send to ``host`` is hanging (the delivery row is then "sent")."""
        if self.hanging.get(host):
            return succeed(None)
        d = Deferred()
        self._hung.setdefault(host, []).append(d)
        return d

    def send(self, reactor, url, package, settings):
        host = urlsplit(url).hostname
        headers = email.message_from_bytes(package.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n")
        uid = re.search(r"uid=([0-9.]+)", headers["Medd-Attachment"]).group(1)
        if host in self.down:
            return fail(ConnectionRefusedError(f"{host} is down"))
        if self.failures_left.get(uid):
            self.failures_left[uid] -= 1
            return fail(ConnectionRefusedError(f"{host} refused {uid}"))
        if host in self.hanging:
            d = Deferred()
            self.hanging[host].append(d)
            d.addCallback(lambda _: self.received.setdefault(host, []).append((uid, headers["Message-ID"])))
            for waiter in self._hung.pop(host, []):
                waiter.callback(None)
            return d
        self.received.setdefault(host, []).append((uid, headers["Message-ID"]))
        return succeed(None)

    def uids(self, host: str) -> list[str]:
        return [uid for uid, _ in self.received.get(host, [])]


def _image(suffix: str, recipient: str) -> bytes:
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{suffix}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.NamesOfIntendedRecipientsOfResults = recipient
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class Central:
    """Central's routing service with its connectors over one database, driven by a fake clock."""

    def __init__(self, config, database: Database, clock: Clock, sender: FakeSender):
        self.clock = clock
        self.plugins = load_plugins()
        self.plugins.senders["smtp"] = sender
        self.storage = CentralStorage.over(database, clock)
        blobs = self.plugins.storage[("blobstore", "file")](config)
        self.ingest = Ingest(reactor, ObjectIndex(database, clock), blobs, self.plugins,
                             max_object_size=config.max_object_size, record_status=self.storage.deliveries.record_status)
        self.routing = RoutingService(reactor, config, self.plugins, self.storage, self.ingest)
        self.outbox = self.routing.outbox
        self.crashed = False

    async def start(self) -> None:
        self.routing.startService()  # its first poll tick runs now
        await self.routing.kick()

    async def stop(self) -> None:
        await self.routing.stopService()
        self.ingest.stop()

    def crash(self) -> None:
        """The process dies: no timer of its clock fires again, a send under way never ends."""
        self.crashed = True
        self.ingest.stop()

    async def store(self, suffix: str, recipient: str) -> str:
        stored = await self.ingest.receive_dicom(_image(suffix, recipient), transport="dicom", origin="MODALITY1")
        return stored.uid

    async def deliver(self) -> None:
        """Route, start the push workers, and wait until each has done what is due now."""
        await self.routing.kick()
        await self.outbox.settled()

    async def delivery(self, uid: str):
        (row,) = await self.storage.deliveries.of_object(uid)
        return row


@pytest.fixture
def world(tmp_path, db_url):
    """Factory of :class:`Central` (a second call is a restart) over one database and blob store,
    with a directory of one centre and the push viewers A and B; and the fake sender."""
    config = load_config(write_config(tmp_path, extra=SETTINGS, db_url=db_url))
    database = Database(reactor, db_url)
    database.create_schema()
    database.start()
    sender = FakeSender()
    started: list[Central] = []

    async def start(clock: Clock | None = None) -> Central:
        if clock is None:
            clock = Clock()
            clock.advance(START)
        central = Central(config, database, clock, sender)
        if not started:
            directory = central.storage.directory
            await directory.add_centre("centre-a", aes=["MODALITY1"])
            for address, url in URLS.items():
                await directory.add_viewer(address, url, ["centre-a"])
        await central.start()
        started.append(central)
        return central

    yield start, sender
    for central in started:
        if not central.crashed:
            pytest_twisted.blockon(ensureDeferred(central.stop()))
    database.stop()


def test_retry_policy_is_the_shared_backoff():
    """The outbox's retry delays are medd.scheduling.Backoff's (the [delivery] keys are parsed in medd/central/settings.py)."""
    policy = RetryPolicy(base=2, multiplier=3, max_delay=50, max_attempts=7)
    assert policy.backoff == Backoff(base=2, max_delay=50, multiplier=3)
    assert [policy.delay(n) for n in (1, 2, 3, 4)] == [2, 6, 18, 50]
    assert policy.max_attempts == 7


@pytest_twisted.ensureDeferred
async def test_fake_sender_is_an_isender(world):
    """The fake sender provides the interface a real sender plugin does, and a reachable viewer
    gets its object at once, marked delivered, stamped by the injected clock."""
    start, sender = world
    verifyObject(ISender, sender)
    central = await start()
    uid = await central.store("1", A)
    await central.deliver()
    assert sender.uids("a.invalid") == [uid]
    row = await central.delivery(uid)
    assert (row.state, row.attempts, row.next_attempt_at) == ("delivered", 1, None)
    history = await central.storage.tracking.object_history(uid)
    assert {e.at for e in history.deliveries[0].history} == {utc(START)}


@pytest_twisted.ensureDeferred
async def test_retries_back_off_exponentially_then_give_up(world):
    """A viewer that stays down is retried after 5, 10 and 20 seconds of the clock (base 5,
    multiplier 2), never earlier; after max_attempts (4) the delivery is failed for good and no
    further attempt is scheduled."""
    start, sender = world
    sender.down.add("a.invalid")
    central = await start()
    clock = central.clock
    uid = await central.store("1", A)
    await central.deliver()
    elapsed = 0.0
    for attempts, delay in ((1, 5), (2, 10), (3, 20)):
        row = await central.delivery(uid)
        assert (row.state, row.attempts) == ("failed", attempts)
        assert row.next_attempt_at == utc(START + elapsed + delay)
        assert "ConnectionRefusedError: a.invalid is down" in row.last_error
        clock.advance(delay - 0.001)
        await central.outbox.settled()
        assert (await central.delivery(uid)).attempts == attempts  # not yet
        clock.advance(0.001)
        await central.outbox.settled()
        elapsed += delay
    row = await central.delivery(uid)
    assert (row.state, row.attempts, row.next_attempt_at) == ("failed", 4, None)
    history = await central.storage.tracking.object_history(uid)
    assert history.deliveries[0].history[-1].detail.startswith("gave up after 4 attempts")
    assert [c for c in clock.getDelayedCalls() if c.getTime() < START + 3600] == []
    await central.deliver()  # a kick does not revive a delivery that gave up
    assert (await central.delivery(uid)).attempts == 4 and sender.received == {}


@pytest_twisted.ensureDeferred
async def test_head_of_line_order_per_viewer(world):
    """A viewer's deliveries go out strictly in the order they were queued: while its oldest
    row waits for a retry, the rows behind it wait too, and then all go in order."""
    start, sender = world
    central = await start()
    uids = [await central.store(str(i), A) for i in range(3)]
    sender.failures_left[uids[0]] = 1
    await central.deliver()
    assert sender.received == {}
    assert [(await central.delivery(u)).state for u in uids] == ["failed", "queued", "queued"]
    central.clock.advance(5)
    await central.outbox.settled()
    assert sender.uids("a.invalid") == uids
    assert [(await central.delivery(u)).state for u in uids] == ["delivered"] * 3


@pytest_twisted.ensureDeferred
async def test_an_unreachable_viewer_never_delays_another(world):
    """While viewer A's send hangs (a peer that accepts and never answers) and after it fails,
    viewer B gets everything queued for it, including what arrives meanwhile; A resumes after."""
    start, sender = world
    sender.hang("a.invalid")
    central = await start()
    to_a = [await central.store(f"1{i}", A) for i in range(2)]
    to_b = [await central.store("20", B)]
    await central.routing.kick()  # fires although A's send is still pending
    await sender.hung("a.invalid")
    await central.outbox.settled(B)
    assert sender.uids("b.invalid") == to_b and sender.uids("a.invalid") == []
    to_b.append(await central.store("21", B))
    await central.routing.kick()
    await central.outbox.settled(B)
    assert sender.uids("b.invalid") == to_b
    assert [(await central.delivery(u)).state for u in to_a] == ["sent", "queued"]

    (pending,) = sender.hanging["a.invalid"]
    pending.errback(TimeoutError("no answer from a.invalid"))
    await central.outbox.settled()
    assert (await central.delivery(to_a[0])).state == "failed"
    del sender.hanging["a.invalid"]
    central.clock.advance(5)
    await central.outbox.settled()
    assert sender.uids("a.invalid") == to_a
    assert [(await central.delivery(u)).state for u in to_a + to_b] == ["delivered"] * 4


@pytest_twisted.ensureDeferred
async def test_deliveries_survive_a_restart(world):
    """Central stopped with one delivery in flight (sent, unanswered) and others queued or waiting
    for a retry: a new central over the same database sends all of them, in queue order, the
    in-flight one again with the same Message-ID (which the receiver's idempotency absorbs)."""
    start, sender = world
    sender.hang("a.invalid")
    sender.down.add("b.invalid")
    central = await start()
    to_a = [await central.store(f"1{i}", A) for i in range(3)]
    to_b = await central.store("20", B)
    await central.routing.kick()
    await sender.hung("a.invalid")
    await central.outbox.settled(B)
    first = await central.delivery(to_a[0])
    assert first.state == "sent" and (await central.delivery(to_b)).state == "failed"
    central.crash()  # nothing of it survives but the rows

    sender.hanging.clear()  # (its send never ends)
    sender.down.clear()
    later = Clock()
    later.advance(START + 600)
    central = await start(later)
    await central.outbox.settled()
    assert sender.uids("a.invalid") == to_a and sender.uids("b.invalid") == [to_b]
    assert sender.received["a.invalid"][0][1] == first.message_id
    rows = [await central.delivery(u) for u in to_a]
    assert [r.state for r in rows] == ["delivered"] * 3 and rows[0].attempts == 2


@pytest_twisted.ensureDeferred
async def test_objects_arriving_together_are_routed_in_one_batch(world):
    """Stored objects are routed route_delay (0.05 s of the clock) after the first of them, in one
    pass: nothing is routed before, and every decision and outbox row of the batch carries the
    same stamp."""
    start, sender = world
    central = await start()
    clock = central.clock
    uids = []
    for i in range(3):
        if i:
            clock.advance(0.02)
        uids.append(await central.store(str(i), B))
    assert await central.storage.routing.undecided() == uids  # 0.04 s after the first: nothing routed yet
    clock.advance(0.01)  # the pass scheduled by the first object begins
    await central.routing.router.kick()  # hears the end of a pass that began after it, so after that one
    histories = [await central.storage.tracking.object_history(u) for u in uids]
    assert {h.routing.decided_at for h in histories} == {utc(START + 0.05)}
    assert {h.deliveries[0].history[0].at for h in histories} == {utc(START + 0.05)}
    await central.outbox.settled()


@pytest_twisted.ensureDeferred
async def test_stopping_abandons_a_hanging_send(world):
    """Stopping the service does not wait on a peer that never answers: the send under way is
    cancelled and recorded as a failed attempt (retried after a restart), and stopping fires once
    that state is written, before the node would close the database."""
    start, sender = world
    sender.hang("a.invalid")
    central = await start()
    uid = await central.store("1", A)
    await central.routing.kick()
    await sender.hung("a.invalid")
    assert (await central.delivery(uid)).state == "sent"
    await central.stop()
    central.crashed = True  # already stopped
    row = await central.delivery(uid)
    assert (row.state, row.attempts) == ("failed", 1) and "CancelledError" in row.last_error
    assert row.next_attempt_at == utc(START + 5)
