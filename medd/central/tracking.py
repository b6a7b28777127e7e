"""Tracking as the administrator sees it: an object's history (read by the
:class:`~medd.storage.tracking.Tracking` connector) as JSON-ready data, for the
admin API and ``medd track --json``."""
from __future__ import annotations

import dataclasses
from datetime import datetime

from medd.storage.routing import QuarantineEntry
from medd.storage.tracking import ObjectHistory, StudyState


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
        "overlays": [{k: _iso(getattr(a, k)) for k in ("uid", "origin", "received_at", "supersedes", "current",
                                                    "sop_class_uid")}
                     for a in history.overlays],
        "reports": [_plain(a) for a in history.reports],
    }


def study_json(study: StudyState) -> dict:
    """A study's state (:class:`~medd.storage.tracking.StudyState`) as JSON-ready data."""
    return {
        "study_uid": study.study_uid, "state": study.state, "centre": study.centre, "patient_id": study.patient_id,
        "modalities": list(study.modalities), "images": study.images,
        "first_received_at": _iso(study.first_received_at), "last_received_at": _iso(study.last_received_at),
        "quarantined": study.quarantined,
        "destinations": [
            {"destination": d.destination, "images": d.images, "pending": d.pending, "delivered": d.delivered,
             "opened": d.opened, "opened_by": [{"user": u, "images": n} for u, n in d.opened_by]}
            for d in study.destinations
        ],
        "reports": [_plain(a) for a in study.reports],
        "overlays": study.overlays,
    }


def study_lines(study: StudyState) -> list[str]:
    """A study's state for ``medd track`` (one line per destination)."""
    lines = [f"study {study.study_uid}: {study.state}  centre {study.centre or 'unknown'}  "
             f"{'/'.join(study.modalities) or '-'}  patient {study.patient_id or '-'}",
             f"  received {study.images} image(s), {study.first_received_at.isoformat()} to "
             f"{study.last_received_at.isoformat()}" + (f"; {study.quarantined} quarantined" if study.quarantined else "")]
    for d in study.destinations:
        who = ", ".join(f"{u} ({n})" for u, n in d.opened_by) or "nobody"
        lines.append(f"  -> {d.destination}: {d.delivered}/{d.images} delivered, {d.pending} pending, "
                     f"{d.opened} opened; opened by {who}")
    for r in study.reports:
        lines.append(f"  reported: {r.uid} from {r.origin} at {r.received_at.isoformat()}")
    if study.overlays:
        lines.append(f"  {study.overlays} overlay(s)")
    return lines


def quarantine_json(entry: QuarantineEntry) -> dict:
    return _plain(entry)
