"""The bounded MIME readers: a package's MIME structure (medd.package.parse_package,
which SMTP, HTTP and TLS receivers all reach) and a STOW-RS multipart/related body
(medd.transports.dicomweb.split_multipart).

Invariant: only InvalidObject (package) or a 400/413 Problem (STOW-RS) escapes;
an accepted package yields one non-multipart object part.
"""
from __future__ import annotations

import io

from medd.objects import InvalidObject
from medd.package import parse_package
from medd.transports.dicomweb import split_multipart
from medd.webresource import Problem

from fuzz import seeds

MAX_SIZE = 1024 * 1024


def check(data: bytes) -> None:
    try:
        msg, part = parse_package(data, MAX_SIZE)
    except InvalidObject as e:
        assert e.reason
    else:
        assert not part.is_multipart()
    # STOW-RS: the first line names the boundary, as a client's Content-Type would.
    first, _, _ = data.partition(b"\r\n")
    boundary = first[2:72].decode("latin-1") if first.startswith(b"--") else "b0"
    try:
        parts = split_multipart(io.BytesIO(data), boundary)
    except Problem as e:
        assert e.status in (400, 413), e.status
    else:
        assert sum(len(p.data) for p in parts) <= len(data)


def seed_inputs() -> dict[str, bytes]:
    return seeds.multiparts()
