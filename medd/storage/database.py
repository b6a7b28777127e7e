"""SQLAlchemy off the reactor thread.

One named thread pool runs every database call; ``run(fn)`` calls
``fn(connection)`` inside a transaction on that pool and returns a Deferred.
Results must be plain values or dataclasses, never rows or cursors that
escape their transaction.
"""
from __future__ import annotations

import time
from typing import Callable, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import StaticPool
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from medd.storage.schema import metadata

T = TypeVar("T")


def make_engine(url: str) -> Engine:
    """An engine with the settings medd relies on (durable SQLite commits)."""
    parsed = make_url(url)
    if parsed.drivername.startswith("sqlite"):
        memory = parsed.database in (None, "", ":memory:")
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            poolclass=StaticPool if memory else None,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            if not memory:
                cursor.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before it returns, so an
            # acknowledgement sent after it is never lost.
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=4)


class Database:
    """An engine plus the thread pool that is the only place it is used."""

    log = Logger()

    def __init__(self, reactor, url: str, *, threads: int | None = None, retries: int = 5):
        self.reactor = reactor
        self.engine = make_engine(url)
        is_sqlite = self.engine.dialect.name == "sqlite"
        # SQLite has one writer; more threads would only queue on its lock.
        size = threads or (1 if is_sqlite else 4)
        self.pool = ThreadPool(minthreads=1, maxthreads=size, name="medd-db")
        self.retries = retries
        self._started = False

    def start(self) -> None:
        if not self._started:
            self.pool.start()
            self._started = True

    def stop(self) -> None:
        if self._started:
            self.pool.stop()
            self._started = False
        self.engine.dispose()

    def create_schema(self) -> None:
        """Create missing tables (blocking; called once at start-up)."""
        import medd.storage.routing_tables  # noqa: F401  (registers central's tables)

        metadata.create_all(self.engine)

    def run_sync(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` in a transaction on the calling thread, retrying transient errors."""
        delay = 0.05
        for attempt in range(self.retries + 1):
            try:
                with self.engine.begin() as conn:
                    return fn(conn)
            except OperationalError as e:
                if attempt == self.retries:
                    raise
                self.log.warn("database busy ({error}); retry {n}", error=e.orig, n=attempt + 1)
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        raise AssertionError("unreachable")

    def run(self, fn: Callable[[Connection], T]):
        """Deferred result of ``fn(connection)`` run in a transaction on the pool."""
        self.start()
        return deferToThreadPool(self.reactor, self.pool, self.run_sync, fn)
