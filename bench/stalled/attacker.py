#!/usr/bin/env python3
"""Holds N stalled or drip-feeding connections open on each of medd's listeners.

Every connection is a slot that reconnects (after half a second) whenever the
node closes it, so the pressure stays at N per listener for as long as this
runs. Even slots stall (a few bytes, then nothing); odd slots drip one byte
of a plausible request every ``--drip-interval`` seconds. Slot i connects
from 127.0.0.(FIRST + i // PER_ADDRESS), so that ``[limits]
max_connections_per_peer`` does not turn most of them away (every 127.0.0.x
reaches loopback on Linux).

Prints one JSON line of counters a second on stdout; stops on SIGTERM.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl
import sys
import time


def client_hello() -> bytes:
    """The first flight of a real TLS handshake."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    tls = context.wrap_bio(incoming, outgoing, server_hostname="central.bench")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


# (what a stalled slot sends once, what a dripping slot sends a byte at a time)
PAYLOADS = {
    # A-ASSOCIATE-RQ: 3 bytes of a PDU header; or a header claiming 16 kB, then its body.
    "dicom": (b"\x01\x00\x00", b"\x01\x00\x00\x00\x40\x00" + b"\x00\x01" + b"\x00" * 2000),
    "http": (b"PO", b"POST /packages HTTP/1.1\r\nHost: central.bench\r\nContent-Type: message/rfc822\r\n"
                    b"Content-Length: 100000\r\n\r\n" + b"From: a@b.example\r\n" * 200),
    "smtp": (b"", b"EHLO attacker.example\r\nMAIL FROM:<a@attacker.example>\r\nRCPT TO:<central@central.bench>\r\n"
                  b"DATA\r\n" + b"X-Drip: 1\r\n" * 200),
    "tls": (b"", client_hello()),
}


class Counters:
    def __init__(self, listeners):
        self.open = {k: 0 for k in listeners}
        self.closed_by_node = {k: 0 for k in listeners}
        self.connect_failed = {k: 0 for k in listeners}
        self.bytes_sent = {k: 0 for k in listeners}


async def slot(counters: Counters, listener: str, host: str, port: int, source: str, drip: bool, interval: float):
    stalled, dripped = PAYLOADS[listener]
    while True:
        try:
            reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
        except OSError:
            counters.connect_failed[listener] += 1
            await asyncio.sleep(1.0)
            continue
        counters.open[listener] += 1
        until_closed = asyncio.ensure_future(_drain(reader))
        try:
            if drip:
                for i in range(len(dripped)):
                    if until_closed.done():
                        break
                    writer.write(dripped[i:i + 1])
                    counters.bytes_sent[listener] += 1
                    await asyncio.wait([until_closed], timeout=interval)
            elif stalled:
                writer.write(stalled)
                counters.bytes_sent[listener] += len(stalled)
            await until_closed
        except (OSError, ConnectionError):
            pass
        finally:
            counters.open[listener] -= 1
            counters.closed_by_node[listener] += 1
            until_closed.cancel()
            writer.transport.abort()
        await asyncio.sleep(0.5)


async def _drain(reader) -> None:
    """Read (and drop) whatever the node says until it closes."""
    try:
        while await reader.read(65536):
            pass
    except (OSError, ConnectionError):
        pass


async def main(a) -> None:
    ports = {k: v for k, v in (("dicom", a.dicom), ("http", a.http), ("tls", a.tls), ("smtp", a.smtp)) if v}
    counters = Counters(ports)
    tasks = []
    for listener, port in ports.items():
        for i in range(a.per_listener):
            source = f"127.0.0.{a.first_source + i // a.per_address}"
            tasks.append(asyncio.ensure_future(
                slot(counters, listener, a.host, port, source, drip=i % 2 == 1, interval=a.drip_interval)))
            if i % 20 == 19:
                await asyncio.sleep(0.05)  # a burst of SYNs past the listen backlog would only be retried
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    t0 = time.monotonic()
    while not stop.is_set():
        print(json.dumps({"t": round(time.monotonic() - t0, 1), "open": counters.open,
                          "closed_by_node": counters.closed_by_node, "connect_failed": counters.connect_failed,
                          "bytes_sent": counters.bytes_sent}), flush=True)
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except asyncio.TimeoutError:
            pass
    for t in tasks:
        t.cancel()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    for name in ("dicom", "http", "tls", "smtp"):
        p.add_argument(f"--{name}", type=int, default=0, help=f"the node's {name} port (0: leave it alone)")
    p.add_argument("--per-listener", type=int, default=200)
    p.add_argument("--per-address", type=int, default=30, help="connections per source address (under the cap)")
    p.add_argument("--first-source", type=int, default=2, help="127.0.0.FIRST is the first source address")
    p.add_argument("--drip-interval", type=float, default=5.0, help="seconds between a dripping slot's bytes")
    a = p.parse_args()
    if a.first_source + (a.per_listener - 1) // a.per_address > 254:
        sys.exit("not enough 127.0.0.x source addresses for that many connections")
    asyncio.run(main(a))
