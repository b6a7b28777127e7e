"""Tracking as the administrator sees it: an object's history (read by the
:class:`~medd.storage.tracking.Tracking` connector) as JSON-ready data, for the
admin API and ``medd track --json``."""
from __future__ import annotations

import dataclasses
from datetime import datetime

from medd.storage.routing import QuarantineEntry
from medd.storage.tracking import ObjectHistory


def _iso(value):
    return value.isoformat() if isinstance(value, datetime) else value


def _plain(instance) -> dict:
    return {k: _iso(v) for k, v in dataclasses.asdict(instance).items()}


def history_json(history: ObjectHistory) -> dict:
    """Everything known about one object, as JSON-ready data."""
    return {
        "object": _plain(history.object),
        "received": [{**_plain(r.receipt), "received_at": _iso(r.received_at)} for r in history.received],
        "routing": _plain(history.routing) if history.routing else None,
        "quarantine": [
            {**{k: _iso(getattr(q, k)) for k in ("id", "destination", "reason", "state", "created_at")},
             "corrections": [_plain(c) for c in q.corrections]}
            for q in history.quarantine
        ],
        "deliveries": [
            {**{k: _iso(getattr(d, k)) for k in ("id", "destination", "state", "attempts", "next_attempt_at", "last_error",
                                                 "opened_by", "message_id")},
             "history": [_plain(e) for e in d.history]}
            for d in history.deliveries
        ],
        "status": [_plain(s) for s in history.status],
        "overlays": [{k: _iso(getattr(a, k)) for k in ("uid", "origin", "received_at", "supersedes", "current")}
                     for a in history.overlays],
        "reports": [_plain(a) for a in history.reports],
    }


def quarantine_json(entry: QuarantineEntry) -> dict:
    return _plain(entry)
