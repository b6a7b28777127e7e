"""Tracking: the state and history of every (object, destination), status
messages from viewers, and the overlays and reports attached to an image or
study."""
from __future__ import annotations

import dataclasses
from datetime import datetime

from sqlalchemy import and_, select
from sqlalchemy.engine import Connection

from medd.central.outbox import set_state
from medd.storage.index import ObjectRecord, now, object_by_uid
from medd.storage.routing_tables import corrections, deliveries, delivery_events, quarantine, routing_decisions
from medd.storage.schema import objects, receipts, status_events


def mark_opened(conn: Connection, uid: str, viewer: str, user: str | None, when: str | None) -> int:
    """Set ``opened`` on the delivery of ``uid`` to ``viewer``; returns rows changed."""
    rows = conn.execute(
        select(deliveries.c.id, deliveries.c.state).where(
            and_(deliveries.c.uid == uid, deliveries.c.destination == viewer.strip().lower())
        )
    ).all()
    at = now()
    for row in rows:
        set_state(conn, row.id, "opened", at, f"opened by {user or '?'} at {when or at.isoformat()}", opened_by=user,
                  next_attempt_at=None)
    return len(rows)


def record_status(database, clock):
    """``record_status(status)`` for central's ingest: store a status message and,
    for "opened", move the delivery to opened, in one transaction."""
    from medd.storage.connector import utc
    from medd.storage.index import store_status

    def record(status):
        at = utc(clock.seconds())

        def thd(conn) -> bool:
            created = store_status(conn, status, at)
            if created and status.event in ("opened", "viewed"):
                mark_opened(conn, status.uid, status.receipt.origin, status.user, status.time)
            return created

        return database.run(thd)

    return record


def _iso(value):
    return value.isoformat() if isinstance(value, datetime) else value


def _record_json(record: ObjectRecord) -> dict:
    return {k: _iso(v) for k, v in dataclasses.asdict(record).items()}


def object_history(conn: Connection, uid: str) -> dict | None:
    """Everything known about one object, as JSON-ready data."""
    record = object_by_uid(conn, uid)
    if record is None:
        return None
    decision = conn.execute(select(routing_decisions).where(routing_decisions.c.uid == uid)).first()
    out = {
        "object": _record_json(record),
        "received": [
            {k: _iso(v) for k, v in r._mapping.items() if k != "id"}
            for r in conn.execute(select(receipts).where(receipts.c.uid == uid).order_by(receipts.c.id))
        ],
        "routing": {"centre": decision.centre, "outcome": decision.outcome, "decided_at": _iso(decision.decided_at)}
        if decision else None,
        "quarantine": [],
        "deliveries": [],
        "status": [
            {"event": r.event, "user": r.user, "time": r.event_time, "origin": r.origin, "received_at": _iso(r.received_at)}
            for r in conn.execute(select(status_events).where(status_events.c.uid == uid).order_by(status_events.c.id))
        ],
        "overlays": [],
        "reports": [],
    }
    for q in conn.execute(select(quarantine).where(quarantine.c.uid == uid).order_by(quarantine.c.id)):
        fixes = [
            {"admin": c.admin, "action": c.action, "old_route": c.old_route, "new_route": c.new_route,
             "reason": c.reason, "at": _iso(c.at)}
            for c in conn.execute(select(corrections).where(corrections.c.quarantine_id == q.id).order_by(corrections.c.id))
        ]
        out["quarantine"].append({"id": q.id, "destination": q.destination, "reason": q.reason, "state": q.state,
                                  "created_at": _iso(q.created_at), "corrections": fixes})
    for d in conn.execute(select(deliveries).where(deliveries.c.uid == uid).order_by(deliveries.c.id)):
        events = [
            {"state": e.state, "detail": e.detail, "at": _iso(e.at)}
            for e in conn.execute(select(delivery_events).where(delivery_events.c.delivery_id == d.id).order_by(delivery_events.c.id))
        ]
        out["deliveries"].append({
            "id": d.id, "destination": d.destination, "state": d.state, "attempts": d.attempts,
            "next_attempt_at": _iso(d.next_attempt_at), "last_error": d.last_error, "opened_by": d.opened_by,
            "message_id": d.message_id, "history": events,
        })
    if record.object_type == "image":
        for r in conn.execute(select(objects).where(and_(objects.c.object_type == "overlay",
                                                         objects.c.referenced_image_uid == uid)).order_by(objects.c.id)):
            out["overlays"].append({"uid": r.sop_instance_uid, "origin": r.origin, "received_at": _iso(r.received_at)})
    for r in conn.execute(select(objects).where(and_(objects.c.object_type == "report",
                                                     objects.c.study_instance_uid == record.study_instance_uid)).order_by(objects.c.id)):
        if r.sop_instance_uid != uid:
            out["reports"].append({"uid": r.sop_instance_uid, "media_type": r.media_type, "origin": r.origin,
                                   "received_at": _iso(r.received_at)})
    return out


def track(conn: Connection, uid: str) -> list[dict]:
    """Histories for an object UID, a study UID, or a Message-ID."""
    direct = object_history(conn, uid)
    if direct is not None:
        return [direct]
    uids = list(conn.execute(
        select(objects.c.sop_instance_uid).where(objects.c.study_instance_uid == uid).order_by(objects.c.id)).scalars())
    if not uids:
        uids = list(conn.execute(select(receipts.c.uid).where(receipts.c.message_id == uid)).scalars())
        uids += list(conn.execute(select(deliveries.c.uid).where(deliveries.c.message_id == uid)).scalars())
    return [h for h in (object_history(conn, u) for u in dict.fromkeys(uids)) if h is not None]
