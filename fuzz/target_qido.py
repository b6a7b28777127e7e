"""The QIDO-RS parameter parser (medd.transports.dicomweb.parse_query), and the
query it makes run on a real SQLite index (where an out-of-range offset once
gave a 500).

The input is the raw query string, split as Twisted fills ``request.args``;
its length picks the level (studies, series, instances). Invariant: only a
400 Problem escapes the parser; limit and offset stay in range; the index
answers every query that parsed.
"""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import create_engine
from sqlalchemy.pool import StaticPool
from twisted.web.http import parse_qs

from medd.storage.index import search_instances, search_series, search_studies
from medd.storage.migrate import upgrade
from medd.transports.dicomweb import MAX_LIMIT, MAX_OFFSET, QUERY_KEYWORDS, parse_query
from medd.webresource import Problem

from fuzz import seeds

_engine = create_engine("sqlite://", poolclass=StaticPool)
upgrade(_engine)


@dataclass
class _Request:
    args: dict


def check(data: bytes) -> None:
    try:
        query = parse_query(_Request(parse_qs(data, 1)))
    except Problem as e:
        assert e.status == 400 and e.detail, (e.status, e.detail)
        return
    assert 0 <= query.limit <= MAX_LIMIT and 0 <= query.offset <= MAX_OFFSET, (query.limit, query.offset)
    assert all(m.keyword in QUERY_KEYWORDS for m in query.matches)
    with _engine.connect() as conn:
        level = len(data) % 3
        if level == 0:
            search_studies(conn, query.matches, query.limit + 1, query.offset)
        elif level == 1:
            search_series(conn, None, query.matches, query.limit + 1, query.offset)
        else:
            search_instances(conn, None, None, query.matches, query.limit + 1, query.offset)


def seed_inputs() -> dict[str, bytes]:
    return seeds.queries()
