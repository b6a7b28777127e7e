"""The TLS socket transport's frame reader (medd.transports.tls.PackageFrameReceiver),
fed a byte stream in chunks, on a fake clock, with the package behind each
frame answered as the ingest would (ok, refused, retry, later or at once).

The first input byte sets the chunk size; the rest is the stream.
Invariant: nothing escapes dataReceived; every complete frame within the
limit gets exactly one JSON reply, in order; a frame over the limit gets
one ``too-large`` refusal and the connection closes; a stream left
incomplete is closed by its deadline.
"""
from __future__ import annotations

import json
import struct

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from medd.config import ConnectionLimits
from medd.ingest import Refused, StoreFailed, Stored
from medd.transports.tls import PackageFrameReceiver

from fuzz import seeds

MAX_SIZE = 64 * 1024
LIMITS = ConnectionLimits(request_timeout=30.0, min_transfer_rate=1000, max_connections_per_peer=4)


class _Api:
    """What a listener's protocol uses of the TransportAPI: the answer to a frame
    depends on its first byte, so the fuzzer reaches every branch."""

    def __init__(self, clock: Clock):
        self.reactor = clock
        self.limits = LIMITS
        self.max_object_size = MAX_SIZE
        self.later: list[Deferred] = []

    def receive_package(self, frame: bytes, *, transport: str, peer: str):
        choice = frame[0] % 5 if frame else 0
        if choice == 0:
            return succeed(Stored(uid="1.2.3", object_type="image", digest=None, created=True, message_id="<m@x>"))
        if choice == 1:
            return fail(Refused("bad", "invalid"))
        if choice == 2:
            return fail(StoreFailed("disk"))
        if choice == 3:
            return fail(RuntimeError("a bug in a plugin"))
        d = Deferred()
        self.later.append(d)
        return d

    def receive_packages(self, frames: list[bytes], *, transport: str, peer: str, user: str | None = None):
        return [self.receive_package(frame, transport=transport, peer=peer) for frame in frames]


def expected_frames(stream: bytes) -> tuple[int, bool]:
    """(complete frames within the limit, whether a too-large header follows them)."""
    count, at = 0, 0
    while len(stream) - at >= 4:
        (length,) = struct.unpack(">I", stream[at:at + 4])
        if length > MAX_SIZE:
            return count, True
        if len(stream) - at - 4 < length:
            break
        count, at = count + 1, at + 4 + length
    return count, False


def replies(written: bytes) -> list[dict]:
    out, at = [], 0
    while at < len(written):
        (length,) = struct.unpack(">I", written[at:at + 4])
        out.append(json.loads(written[at + 4:at + 4 + length]))
        at += 4 + length
    assert at == len(written)
    return out


def check(data: bytes) -> None:
    if not data:
        return
    size, stream = data[0] + 1, data[1:]
    clock = Clock()
    api = _Api(clock)
    protocol = PackageFrameReceiver(api)
    transport = StringTransport()
    protocol.makeConnection(transport)
    for at in range(0, len(stream), size):
        protocol.dataReceived(stream[at:at + size])
        while api.later:  # the store finishes while more bytes arrive
            api.later.pop(0).callback(Stored(uid="1.2.4", object_type="image", digest=None, created=False))
    complete, too_large = expected_frames(stream)
    answered = replies(transport.value())
    assert len(answered) == complete + too_large, (len(answered), complete, too_large)
    for reply in answered:
        assert reply["status"] in ("ok", "refused", "retry"), reply
    if too_large:
        assert answered[-1]["kind"] == "too-large" and transport.disconnecting
    else:
        assert not transport.disconnecting
        # Whatever is left unfinished (a partial frame, or nothing) is closed in time.
        clock.advance(LIMITS.request_timeout + len(stream) / LIMITS.min_transfer_rate + protocol.idle_timeout + 1)
        assert transport.disconnecting
    protocol.connectionLost(None)


def seed_inputs() -> dict[str, bytes]:
    return seeds.frames()
