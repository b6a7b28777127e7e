"""Polling the real reactor and guessing a free port: what the tests did before
the clock was injected. No routing or delivery test uses them any more (they
await the services' own Deferreds, drive a ``Clock`` and bind to port 0); they
stay importable only for the tests that still call them (test_viewer,
test_reading_room, test_dicom_receiver) until those are rewritten."""
from __future__ import annotations

import socket

from twisted.internet import reactor
from twisted.internet.task import deferLater


async def eventually(check, timeout: float = 20.0, interval: float = 0.05):
    """Await ``check()`` (a Deferred/coroutine or value) until it is truthy; fail after ``timeout``.

    Delivery runs in the background, so tests wait for the state they
    expect instead of asserting on a timing.
    """
    waited = 0.0
    while True:
        result = check()
        if hasattr(result, "addCallback") or hasattr(result, "__await__"):
            result = await result
        if result:
            return result
        if waited >= timeout:
            raise AssertionError(f"condition not met within {timeout}s: {getattr(check, '__doc__', None) or check}")
        await deferLater(reactor, interval, lambda: None)
        waited += interval


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
