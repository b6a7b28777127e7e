"""`medd gateway status` and `medd track` on a gateway: what waits for central,
and what central said about each object. They read the node's database
directly (the daemon need not run)."""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager

from medd.config import load_config
from medd.storage.database import WallClock, open_database, resolved
from medd.storage.forwarding import CentralReceipt, Forwarding, ForwardingItem, ResultItem

DEFAULT_CONFIG = os.environ.get("MEDD_CONFIG", "etc/gateway.ini")


@contextmanager
def _forwarding(config):
    database = open_database(config)
    try:
        yield Forwarding(database, WallClock())
    finally:
        database.stop()


def _when(value) -> str | None:
    return value.isoformat() if value is not None else None


def item_json(item: ForwardingItem | None) -> dict | None:
    if item is None:
        return None
    return {
        "uid": item.uid, "study_uid": item.study_uid, "message_id": item.message_id, "size": item.size,
        "state": item.state, "attempts": item.attempts, "queued_at": _when(item.queued_at),
        "next_attempt_at": _when(item.next_attempt_at) if item.state == "waiting" else None,
        "sent_at": _when(item.sent_at), "last_attempt_at": _when(item.last_attempt_at), "last_error": item.last_error,
    }


def result_json(item: ResultItem | None) -> dict | None:
    if item is None:
        return None
    return {
        "uid": item.uid, "object_type": item.object_type, "state": item.state, "attempts": item.attempts,
        "queued_at": _when(item.queued_at), "stored_at": _when(item.stored_at),
        "last_attempt_at": _when(item.last_attempt_at), "last_error": item.last_error,
    }


def receipt_json(r: CentralReceipt) -> dict:
    return {"uid": r.uid, "event": r.event, "viewer": r.viewer, "user": r.user, "time": r.time, "reason": r.reason,
            "received_at": _when(r.received_at)}


def _receipt_line(r: CentralReceipt) -> str:
    detail = " ".join(f"{k} {v}" for k, v in (("viewer", r.viewer), ("by", r.user), ("at", r.time),
                                              ("reason", r.reason)) if v)
    return f"{r.event:<12} {detail}".rstrip()


def cmd_status(args) -> int:
    config = load_config(args.config)
    with _forwarding(config) as forwarding:
        s = resolved(forwarding.summary())
        latest = resolved(forwarding.latest_receipts(args.latest))
        results = resolved(forwarding.results_summary())
    doc = {
        "waiting": {"count": s.waiting, "bytes": s.waiting_bytes},
        "oldest_waiting": item_json(s.oldest_waiting),
        "last_success": item_json(s.last_sent),
        "last_error": item_json(s.last_error),
        "given_up": s.given_up,
        "latest_receipts": [receipt_json(r) for r in latest],
        "results_to_pacs": {
            "waiting": results.waiting, "oldest_waiting": result_json(results.oldest_waiting),
            "last_stored": result_json(results.last_stored), "last_error": result_json(results.last_error),
            "refused": results.refused, "skipped": results.skipped,
        },
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"waiting for central: {s.waiting} objects, {s.waiting_bytes} bytes")
    if s.oldest_waiting:
        o = s.oldest_waiting
        print(f"  oldest: {o.uid} queued {_when(o.queued_at)}, {o.attempts} attempts")
    print(f"last success: {s.last_sent.uid} at {_when(s.last_sent.sent_at)}" if s.last_sent else "last success: none")
    if s.last_error:
        e = s.last_error
        print(f"last error: {_when(e.last_attempt_at)} {e.uid}: {e.last_error}")
    if s.given_up:
        print(f"given up (refused by central or lost): {s.given_up}")
    if results.waiting or results.last_stored or results.last_error or results.skipped:
        print(f"results waiting for the PACS: {results.waiting}"
              + (f" (oldest {results.oldest_waiting.uid}, {results.oldest_waiting.attempts} attempts)"
                 if results.oldest_waiting else ""))
        if results.last_stored:
            print(f"  last stored: {results.last_stored.uid} at {_when(results.last_stored.stored_at)}")
        if results.last_error:
            e = results.last_error
            print(f"  last error: {_when(e.last_attempt_at)} {e.uid}: {e.last_error}")
        if results.refused or results.skipped:
            print(f"  refused by the PACS or lost: {results.refused}; skipped (text reports): {results.skipped}")
    if latest:
        print("latest receipts from central:")
        for r in latest:
            print(f"  {r.uid}  {_receipt_line(r)}")
    return 0


def track(args) -> int:
    """`medd track UID` on a gateway: its forwarding state and central's receipts about it."""
    config = load_config(args.config)
    with _forwarding(config) as forwarding:
        item = resolved(forwarding.of_object(args.uid))
        receipts = resolved(forwarding.receipts_of(args.uid))
    if item is None and not receipts:
        print(f"medd: nothing known about {args.uid}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"uid": args.uid, "forwarding": item_json(item),
                          "receipts": [receipt_json(r) for r in receipts]}, indent=2))
        return 0
    print(args.uid)
    if item is not None:
        when = {"sent": f" at {_when(item.sent_at)}", "waiting": f", next attempt {_when(item.next_attempt_at)}"}
        print(f"  forwarding: {item.state}{when.get(item.state, '')} (attempts {item.attempts})"
              + (f"; last error: {item.last_error}" if item.last_error and item.state != "sent" else ""))
    for r in receipts:
        print(f"  {_when(r.received_at)} {_receipt_line(r)}")
    return 0


def add_gateway_commands(sub) -> None:
    g = sub.add_parser("gateway", help="the gateway: what waits for central").add_subparsers(
        dest="gateway_command", required=True)
    p = g.add_parser("status", help="what waits for central, the last success and error, the latest receipts")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="the gateway's config (default: $MEDD_CONFIG or etc/gateway.ini)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--latest", type=int, default=10, help="how many objects' latest receipts to show")
    p.set_defaults(func=cmd_status)
