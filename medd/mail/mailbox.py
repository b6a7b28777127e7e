"""Packages taken from an IMAP mailbox over TLS (``[mailbox] url = imaps://user@host/INBOX``), with
Twisted's own IMAP4 client.

Every ``poll_interval`` seconds the poller logs in, lists the folder's messages by UID and hands each
one to the node's one ingest path (transport ``imap``). A message leaves the folder only once the
ingest answered:

- stored (durable and indexed, or already stored): flagged ``\\Deleted`` and expunged;
- refused (not a valid package, or a sender the node does not take): appended to ``refused_folder``
  (``medd-refused``) with a ``Medd-Refused`` header giving the reason, then deleted here, so it is
  neither lost nor retried forever;
- not stored because of medd itself (:class:`~medd.ingest.StoreFailed`): left where it is for the
  next poll.

A node killed between fetching a message and indexing it finds the message still there at restart,
and the receivers' idempotency (Message-ID and UID) stores it once however often it is taken.
"""
from __future__ import annotations

import io
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory
from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust
from twisted.logger import Logger
from twisted.mail import imap4

from medd.ingest import Refused, StoreFailed
from medd.mail.fragments import BadFragment, FragmentStore, IncompleteSet, is_partial
from medd.mail.settings import MailboxSettings
from medd.scheduling import Backoff, CoalescingPass, PassService

log = Logger()

#: The header a refused message carries in the refused folder.
REFUSED_HEADER = "Medd-Refused"
#: Unexpected failures on one message before it is moved aside rather than tried again.
MAX_FAILURES = 5
#: Messages taken per connection; the next poll comes at once when there were more.
BATCH = 64


class _Client(imap4.IMAP4Client):
    """Fires the factory's ``greeted`` Deferred with itself once the server greeted it."""

    def serverGreeting(self, caps):
        greeted, self.factory.greeted = self.factory.greeted, None
        if greeted is not None:
            greeted.callback(self)

    def connectionLost(self, reason):
        greeted, self.factory.greeted = self.factory.greeted, None
        if greeted is not None:
            greeted.errback(reason)
        self._wake(False)
        super().connectionLost(reason)

    # -- IDLE (RFC 2177), which Twisted's client does not speak: the command is sent as any other, and
    # while it is under way an untagged EXISTS (new mail) ends the wait.

    _idle_wake: Deferred | None = None

    def _wake(self, new_mail: bool) -> None:
        wake, self._idle_wake = self._idle_wake, None
        if wake is not None:
            wake.callback(new_mail)

    def _defaultHandler(self, tag, rest):
        if tag == b"*" and self._idle_wake is not None and rest.split()[1:2] == [b"EXISTS"]:
            self._wake(True)
        super()._defaultHandler(tag, rest)

    async def idle(self, seconds: float, clock) -> bool:
        """IDLE for at most ``seconds``; True when the server announced new mail meanwhile."""
        self._idle_wake = woken = Deferred()
        timer = clock.callLater(seconds, self._wake, False)
        self.setTimeout(None)  # silence is what IDLE is for
        done = self.sendCommand(imap4.Command(b"IDLE", continuation=lambda rest: None))
        try:
            new_mail = await woken
        finally:
            if timer.active():
                timer.cancel()
        if self.transport is not None and self.transport.connected:
            self.sendLine(b"DONE")
            await done
        else:
            done.addErrback(lambda failure: None)  # the connection's end already answered
        return new_mail


class _ClientFactory(ClientFactory):
    protocol = _Client
    noisy = False

    def __init__(self):
        self.greeted: Deferred | None = Deferred()

    def clientConnectionFailed(self, connector, reason):
        greeted, self.greeted = self.greeted, None
        if greeted is not None:
            greeted.errback(reason)


def _reason_header(reason: str) -> bytes:
    """A ``Medd-Refused`` header line: the reason flattened to printable ASCII, folded by length only."""
    flat = "".join(c if " " <= c <= "~" else "?" for c in " ".join(str(reason).split()))[:900]
    return f"{REFUSED_HEADER}: {flat}\r\n".encode("ascii")


def message_bytes(text) -> bytes:
    """A fetched message as bytes (Twisted hands literals back as str decoded as Latin-1)."""
    return text if isinstance(text, bytes) else text.encode("latin-1")


class MailboxPoller(PassService):
    """Polls one mailbox; :meth:`kick` runs a poll now (fires with the number of messages a poll that
    began after the call took from the folder). ``api`` is the node's Ingest."""

    def __init__(self, reactor, settings: MailboxSettings, api, clock, fragments: FragmentStore | None = None):
        self.reactor = reactor
        self.fragments = fragments  # where message/partial fragments wait for their set
        self.incomplete: list[IncompleteSet] = []  # sets reported incomplete after fragment_timeout
        self.settings = settings
        self.api = api
        self.clock = clock
        self.backoff = Backoff(base=min(5.0, settings.poll_interval), max_delay=max(settings.poll_interval, 300.0))
        self._pass = CoalescingPass(self._poll, f"mailbox {settings.url}", clock)
        self._failures: dict[tuple[int, int], int] = {}  # (UIDVALIDITY, UID) -> unexpected failures
        self._errors = 0
        self.polls = 0
        self._watching: _Client | None = None  # the IDLE connection, while one is open
        self.idle_wakeups = 0  # polls that IDLE started

    async def _poll(self) -> int:
        if self._stopped:
            return 0
        try:
            handled, more = await self._session()
        except Exception as e:
            self._errors += 1
            delay = self.backoff.delay(self._errors)
            log.warn("mailbox {url}: {error}; next poll in {delay:.0f}s", url=self.settings.url,
                     error=f"{type(e).__name__}: {e}", delay=delay)
            self._pass.schedule(delay)
            return 0
        self._errors = 0
        self.polls += 1
        if not self._stopped:
            self._pass.schedule(0 if more else self.settings.poll_interval)
            if not more and self._watching is None:
                self._watch()
        return handled

    @property
    def idling(self) -> bool:
        """Whether a connection idles on the folder now (the server offered IDLE)."""
        return self._watching is not None

    def stopService(self):
        if self._watching is not None and self._watching.transport is not None:
            self._watching.transport.loseConnection()
        return super().stopService()

    def _watch(self) -> None:
        """Where the server offers IDLE, keep a second connection idling until the next scheduled
        poll: new mail starts a poll at once instead."""
        d = Deferred.fromCoroutine(self._idle_once())
        d.addErrback(lambda f: log.info("mailbox {url}: IDLE ended: {error}", url=self.settings.url,
                                        error=f.getErrorMessage()))

    async def _idle_once(self) -> None:
        client = await self._connect()
        try:
            if b"IDLE" not in (await client.getCapabilities()):
                return
            await client.select(self.settings.folder)
            self._watching = client
            if await client.idle(self.settings.poll_interval, self.clock) and not self._stopped:
                self.idle_wakeups += 1
                self.kick()
        finally:
            self._watching = None
            client.transport.loseConnection()

    def _read_credentials(self) -> tuple[bytes | None, str]:
        """Blocking: (CA PEM or None, password)."""
        ca = Path(self.settings.ca).read_bytes() if self.settings.ca else None
        return ca, Path(self.settings.password_file).read_text().strip()

    async def _connect(self) -> _Client:
        ca, password = await self.api.run_blocking(self._read_credentials)
        context = optionsForClientTLS(self.settings.host, trustRoot=Certificate.loadPEM(ca) if ca else platformTrust())
        factory = _ClientFactory()
        greeted = factory.greeted
        greeted.addTimeout(self.settings.timeout, self.clock)
        self.reactor.connectSSL(self.settings.host, self.settings.port, factory, context,
                                timeout=self.settings.timeout)
        client = await greeted
        client.timeout = self.settings.timeout
        await client.login(self.settings.user.encode("utf-8"), password.encode("utf-8"))
        return client

    async def _session(self) -> tuple[int, bool]:
        """One connection: handle up to :data:`BATCH` messages; (handled, whether more wait)."""
        client = await self._connect()
        try:
            selected = await client.select(self.settings.folder)
            validity = int(selected.get("UIDVALIDITY", 0))
            uids = sorted(int(u) for u in await client.search(imap4.Query(all=True), uid=True))
            handled = 0
            for uid in uids[:BATCH]:
                if self._stopped:
                    break
                handled += await self._take(client, validity, uid)
            if self.fragments is not None:
                await self._reassembled(client)
            if handled:
                await client.expunge()
            return handled, len(uids) > BATCH
        finally:
            client.transport.loseConnection()

    async def _take(self, client: _Client, validity: int, uid: int) -> int:
        """Fetch one message and ingest it; 1 when it left the folder."""
        key = (validity, uid)
        fetched = await client.fetchMessage(str(uid), uid=True)
        data = next((message_bytes(v["RFC822"]) for v in fetched.values() if str(v.get("UID")) == str(uid)), None)
        if data is None:
            return 0  # expunged by someone else meanwhile
        if self.fragments is not None and is_partial(data):
            return await self._keep_fragment(client, uid, data)
        try:
            stored = await self.api.receive_package(data, transport="imap", peer=self.settings.url)
        except Refused as e:
            log.warn("mailbox {url}: message {uid} refused ({kind}): {reason}; moved to {folder}",
                     url=self.settings.url, uid=uid, kind=e.kind, reason=e.reason, folder=self.settings.refused_folder)
            await self._move_aside(client, uid, data, e.reason)
            return 1
        except StoreFailed as e:
            log.error("mailbox {url}: message {uid} not stored ({reason}); left for the next poll",
                      url=self.settings.url, uid=uid, reason=str(e))
            return 0
        except Exception as e:
            self._failures[key] = failures = self._failures.get(key, 0) + 1
            log.failure("mailbox {url}: message {uid} failed ({n} of {max})", url=self.settings.url, uid=uid,
                        n=failures, max=MAX_FAILURES)
            if failures < MAX_FAILURES:
                return 0
            await self._move_aside(client, uid, data, f"medd failed on it {failures} times: {type(e).__name__}: {e}")
            self._failures.pop(key, None)
            return 1
        self._failures.pop(key, None)
        log.info("mailbox {url}: message {uid} ({what} {uid_stored}) taken", url=self.settings.url, uid=uid,
                 what="stored" if stored.created else "already stored", uid_stored=stored.uid)
        await client.addFlags(str(uid), ["\\Deleted"], uid=True)
        return 1

    async def _keep_fragment(self, client: _Client, uid: int, data: bytes) -> int:
        """A message/partial: on disk (fsync'd) first, then deleted here; 1 when it left the folder."""
        try:
            set_id = await self.api.run_blocking(self.fragments.add, data)
        except BadFragment as e:
            log.warn("mailbox {url}: fragment {uid} refused: {reason}", url=self.settings.url, uid=uid, reason=str(e))
            await self._move_aside(client, uid, data, str(e))
            return 1
        except OSError as e:
            log.error("mailbox {url}: fragment {uid} not kept ({reason}); left for the next poll",
                      url=self.settings.url, uid=uid, reason=str(e))
            return 0
        log.info("mailbox {url}: fragment {uid} of {set_id} kept", url=self.settings.url, uid=uid, set_id=set_id)
        await client.addFlags(str(uid), ["\\Deleted"], uid=True)
        return 1

    async def _reassembled(self, client: _Client) -> None:
        """Ingest every complete set of fragments once; report the sets that stayed incomplete too long."""
        for set_id, whole in await self.api.run_blocking(self.fragments.complete):
            try:
                stored = await self.api.receive_package(whole, transport="imap", peer=self.settings.url)
            except Refused as e:
                log.warn("mailbox {url}: reassembled {set_id} refused ({kind}): {reason}; moved to {folder}",
                         url=self.settings.url, set_id=set_id, kind=e.kind, reason=e.reason,
                         folder=self.settings.refused_folder)
                await self._append_refused(client, whole, e.reason)
            except StoreFailed as e:
                log.error("mailbox {url}: reassembled {set_id} not stored ({reason}); kept for the next poll",
                          url=self.settings.url, set_id=set_id, reason=str(e))
                continue
            else:
                log.info("mailbox {url}: {set_id} reassembled, {uid} {what}", url=self.settings.url, set_id=set_id,
                         uid=stored.uid, what="stored" if stored.created else "already stored")
            await self.api.run_blocking(self.fragments.discard, set_id)
        for gone in await self.api.run_blocking(self.fragments.expire, self.settings.fragment_timeout):
            log.error("mailbox {url}: fragments of {set_id} incomplete after {age:.0f}s: have {have} of {total}; "
                      "kept in incomplete/", url=self.settings.url, set_id=gone.set_id, age=gone.age,
                      have=list(gone.have), total=gone.total)
            self.incomplete.append(gone)

    async def _append_refused(self, client: _Client, data: bytes, reason: str) -> None:
        folder = self.settings.refused_folder
        try:
            await client.create(folder)
        except imap4.IMAP4Exception:
            pass  # it exists already
        await client.append(folder, io.BytesIO(_reason_header(reason) + data))

    async def _move_aside(self, client: _Client, uid: int, data: bytes, reason: str) -> None:
        """Append the message, with its reason, to the refused folder; then mark it deleted here."""
        await self._append_refused(client, data, reason)
        await client.addFlags(str(uid), ["\\Deleted"], uid=True)


def mailbox_service(reactor, settings: MailboxSettings, api, clock, storage_path: Path,
                    max_object_size: int) -> MailboxPoller:
    """The node's mailbox poller; fragments wait in the node's storage folder (``mail-fragments/``), a
    set at most the size base64 makes of the largest object."""
    fragments = FragmentStore(Path(storage_path) / "mail-fragments", max_object_size * 4 // 3 + 1024 * 1024)
    poller = MailboxPoller(reactor, settings, api, clock, fragments)
    poller.setName("mailbox")
    return poller

