"""Database.run: calls queued together share one commit, and fail alone."""
from __future__ import annotations

import threading

import pytest
import pytest_twisted
from sqlalchemy import create_engine, text
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from medd.storage.database import Database


def _make(url: str) -> Database:
    db = Database(reactor, url)
    db.start()
    db.run_sync(lambda c: c.execute(text("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)")))
    return db


def _insert(k: int):
    def fn(conn):
        conn.execute(text("INSERT INTO t (k, v) VALUES (:k, 'x')"), {"k": k})
        return k

    return fn


def _rows(path) -> list[int]:
    engine = create_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            return [r[0] for r in conn.execute(text("SELECT k FROM t ORDER BY k"))]
    finally:
        engine.dispose()


@pytest_twisted.ensureDeferred
async def test_queued_calls_commit_together_and_a_failure_fails_alone(tmp_path):
    """Calls that queue while the pool is busy run as one batch; one that raises
    gets its own error, and the others are still committed (each re-run alone)."""
    db = _make(f"sqlite:///{tmp_path / 'i.sqlite'}")
    try:
        gate = threading.Event()
        blocker = db.run(lambda conn: gate.wait(10))
        ok1 = db.run(_insert(1))
        dup = db.run(_insert(1))  # primary key clash: this call must fail, alone
        ok2 = db.run(_insert(2))
        gate.set()
        assert await blocker is True
        assert await ok1 == 1
        assert await ok2 == 2
        with pytest.raises(Exception, match="UNIQUE"):
            await dup
        assert _rows(tmp_path / "i.sqlite") == [1, 2]
    finally:
        db.stop()


@pytest_twisted.ensureDeferred
async def test_result_is_delivered_only_after_commit(tmp_path):
    """When a run() Deferred fires, another connection already sees its write:
    an acknowledgement sent from the callback is durable."""
    path = tmp_path / "i.sqlite"
    db = _make(f"sqlite:///{path}")
    try:
        seen = []
        for k in range(5):
            d = db.run(_insert(k))
            d.addCallback(lambda k: seen.append((k, k in _rows(path))))
        await db.run(lambda conn: None)
        await deferToThread(lambda: None)
        assert seen == [(k, True) for k in range(5)]
    finally:
        db.stop()
