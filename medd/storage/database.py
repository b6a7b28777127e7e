"""SQLAlchemy off the reactor thread.

One named thread pool runs every database call; ``run(fn)`` calls
``fn(connection)`` inside a transaction on that pool and returns a Deferred.
Results must be plain values or dataclasses, never rows or cursors that
escape their transaction. Calls that queue up while the pool is busy are
committed together (group commit), and each Deferred fires only after the
commit that made its call durable.
"""
from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from collections import deque
from contextlib import contextmanager
from typing import Callable, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import StaticPool
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


def make_engine(url: str) -> Engine:
    """An engine with the settings medd relies on (durable SQLite commits)."""
    parsed = make_url(url)
    if parsed.drivername.startswith("sqlite"):
        memory = parsed.database in (None, "", ":memory:")
        if not memory:
            # SQLite creates the file but not its folder (etc/central.ini points into ../var).
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            poolclass=StaticPool if memory else None,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            if not memory:
                _write_ahead_log(cursor)
            # FULL: a commit is on disk before it returns, so an
            # acknowledgement sent after it is never lost.
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=4)


def _write_ahead_log(cursor, patience: float = 30.0) -> None:
    """Put the SQLite file in WAL mode (it stays so; later calls change nothing).

    Switching a new file needs it to itself, and SQLite answers "locked" at once,
    without its busy timeout, while another connection is writing to it (a second
    process starting on the file while the first creates the schema): wait for that.
    """
    deadline = time.monotonic() + patience
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Database:
    """An engine plus the thread pool that is the only place it is used."""

    log = Logger()

    def __init__(self, reactor, url: str, *, threads: int | None = None, retries: int = 5, inline: bool = False):
        self.reactor = reactor
        # Inline: run() runs on the calling thread and returns a fired
        # Deferred (command-line tools, which have no reactor running).
        self.inline = inline
        self.engine = make_engine(url)
        is_sqlite = self.engine.dialect.name == "sqlite"
        # SQLite has one writer; more threads would only queue on its lock.
        size = threads or (1 if is_sqlite else 4)
        self.pool = ThreadPool(minthreads=1, maxthreads=size, name="medd-db")
        self.retries = retries
        self._started = False
        # Calls waiting for the pool: (fn, Deferred). Filled on the reactor
        # thread, emptied by whichever pool thread gets there first.
        self._queue: deque = deque()
        # SQLite has one pool thread, which keeps one connection: checking a
        # connection out of the engine's pool for every call costs more than
        # the INSERT it runs.
        self._keep_connection = is_sqlite
        self._connection: Connection | None = None
        #: Called with the seconds each pool transaction took (the node's metrics), or None.
        self.observe_transaction: Callable[[float], None] | None = None

    def start(self) -> None:
        if not self._started:
            self.pool.start()
            self._started = True

    def stop(self) -> None:
        if self._started:
            self.pool.stop()
            self._started = False
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        self.engine.dispose()

    def create_schema(self) -> None:
        """Create the schema in a new database, or upgrade an older one to this medd's
        (blocking; once at start-up). Raises ``medd.storage.migrate.SchemaRefused`` for a
        database this medd cannot upgrade."""
        from medd.storage.migrate import upgrade

        upgrade(self.engine)

    def run_sync(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` in a transaction on the calling thread, retrying transient errors."""
        return self._retrying(self.engine.begin, fn)

    def _retrying(self, begin, fn: Callable[[Connection], T], on_error=None) -> T:
        """``fn`` in a transaction from ``begin()``, retried with backoff on OperationalError."""
        delay = 0.05
        for attempt in range(self.retries + 1):
            try:
                with begin() as conn:
                    return fn(conn)
            except OperationalError as e:
                if on_error is not None:
                    on_error()
                if attempt == self.retries:
                    raise
                self.log.warn("database busy ({error}); retry {n}", error=e.orig, n=attempt + 1)
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        raise AssertionError("unreachable")

    def run(self, fn: Callable[[Connection], T]) -> Deferred:
        """Deferred result of ``fn(connection)`` run in a transaction on the pool.

        ``fn`` may share its transaction with other calls queued at the same
        time; the Deferred fires once that transaction is committed, so a
        caller acknowledging on it acknowledges only what is durable. ``fn``
        must not catch database errors of its own (a failing call makes the
        batch run again one call at a time), and must be safe to re-run after
        a rollback, as the retries of :meth:`run_sync` already require.
        """
        if self.inline:
            try:
                return succeed(self.run_sync(fn))
            except Exception:
                return fail()
        self.start()
        d = Deferred()
        self._queue.append((fn, d))
        self.pool.callInThread(self._drain)
        return d

    def _drain(self) -> None:
        """On a pool thread: run everything queued so far, commit once, report."""
        batch = []
        while True:
            try:
                batch.append(self._queue.popleft())
            except IndexError:
                break
        if not batch:
            return  # an earlier drain took this call along
        outcomes = None
        started = time.monotonic()
        if len(batch) > 1:
            try:
                with self._begin() as conn:
                    results = [(True, fn(conn)) for fn, _ in batch]
                # Only now, the COMMIT (the with block's exit) having returned: a
                # failed commit must not report the calls' results as successes.
                outcomes = results
            except Exception:
                # One call failed, or the commit did, and rolled the others back
                # with it; give each its own transaction so only the failing one fails.
                self._forget_connection()
        if outcomes is None:
            outcomes = [self._attempt(fn) for fn, _ in batch]
        if self.observe_transaction is not None:
            self.observe_transaction(time.monotonic() - started)
        self.reactor.callFromThread(self._report, batch, outcomes)

    def _attempt(self, fn):
        try:
            return True, self._run_own(fn)
        except Exception:
            self._forget_connection()
            return False, Failure()

    def _run_own(self, fn):
        """Like :meth:`run_sync`, on the pool thread's kept connection."""
        if not self._keep_connection:
            return self.run_sync(fn)
        # Only the pool thread may drop its kept connection, so only here.
        return self._retrying(self._begin, fn, on_error=self._forget_connection)

    @contextmanager
    def _begin(self):
        """A transaction, as ``engine.begin()``, yielding its connection.

        Its block must end in a COMMIT: SQLAlchemy leaves a block whose transaction was ended
        inside it (rolled back, or invalidated by a lost connection whose error a call caught)
        without committing and without an error, which would report uncommitted work as done;
        that raises :class:`TransactionLost` instead."""
        if not self._keep_connection:
            with self.engine.begin() as conn:
                transaction = conn.get_transaction()
                yield conn
                _still_active(transaction)
            return
        if self._connection is None:
            self._connection = self.engine.connect()
        with self._connection.begin() as transaction:
            yield self._connection
            _still_active(transaction)

    def _forget_connection(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            except Exception:
                pass
            self._connection = None

    @staticmethod
    def _report(batch, outcomes) -> None:
        for (_, d), (ok, value) in zip(batch, outcomes):
            if ok:
                d.callback(value)
            else:
                d.errback(value)


class TransactionLost(RuntimeError):
    """A transaction ended before its COMMIT: nothing it did is durable."""


def _still_active(transaction) -> None:
    if transaction is None or not transaction.is_active:
        raise TransactionLost("the transaction ended before its commit (rolled back or its connection lost)")


class WallClock:
    """The clock of a command-line tool, which has no reactor: ``time.time()``."""

    @staticmethod
    def seconds() -> float:
        return time.time()


def open_database(config, *, reactor=None) -> Database:
    """The database of the node ``config`` describes, schema brought up to date.

    With a ``reactor`` its calls run on the database pool (a running node);
    without one they run inline on the calling thread, which is what every
    command-line tool uses (see :func:`resolved`).
    """
    database = Database(reactor, config.database_url, inline=reactor is None)
    database.create_schema()
    return database


def resolved(d: Deferred):
    """The result of a Deferred that has already fired (an inline database's), or its exception."""
    results: list = []
    d.addBoth(results.append)
    if not results:
        raise RuntimeError("the Deferred has not fired; resolved() is for an inline database")
    result = results[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result
