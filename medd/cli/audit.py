"""`medd audit`: read a node's audit trail; and how the other commands add to it.

Every command that issues, replaces or revokes a credential records it here
(``credential``, with the OS user as who), and the quarantine commands record
their route corrections through central's connectors (medd/audit.py).
"""
from __future__ import annotations

import getpass
import json
import os
import sys

from medd.audit import AuditTrail, credential_change, record_json
from medd.config import load_config
from medd.storage.audit import AuditLog
from medd.storage.database import WallClock, open_database, resolved

DEFAULT_CONFIG = os.environ.get("MEDD_CONFIG", "etc/central.ini")
MAX_RECORDS = 100_000


def cli_audit_trail(config, database) -> AuditTrail:
    """The audit trail of the node ``config`` describes, over an inline ``database``."""
    return AuditTrail(AuditLog(database, WallClock(), config.name))


def record_credential_change(config_path: str, what: str, account: str, action: str) -> None:
    """Record in the node's audit trail that the operator changed ``account``'s credential."""
    config = load_config(config_path)
    database = open_database(config)
    try:
        resolved(credential_change(cli_audit_trail(config, database), what, account, action=action,
                                   admin=getpass.getuser()))
    finally:
        database.stop()


def audit_list(args) -> int:
    from medd.central.webapi import audit_filter

    try:
        where = audit_filter({"since": args.since, "until": args.until, "patient": args.patient, "user": args.user,
                              "event": args.event})
    except ValueError as e:
        print(f"medd: {e}", file=sys.stderr)
        return 2
    config = load_config(args.config)
    database = open_database(config)
    try:
        records = resolved(cli_audit_trail(config, database).search(where, args.limit))
    finally:
        database.stop()
    if args.json:
        print(json.dumps([record_json(r) for r in records], indent=2))
        return 0
    for r in records:
        e = r.entry
        what = " ".join(f"{k}={v}" for k, v in (("patient", e.patient_id), ("study", e.study_instance_uid),
                                                 ("object", e.sop_instance_uid)) if v)
        print(f"{r.id:>7} {r.at.isoformat()} {e.event:<16} {e.action} {e.outcome:>2} "
              f"user={e.user or '-'} peer={e.peer or '-'} via={e.transport or '-'} {what} {e.detail or ''}".rstrip())
    return 0


def add_audit_commands(sub) -> None:
    p = sub.add_parser("audit", help="the node's audit trail (who did what, when, with what outcome)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="the node's config (default: $MEDD_CONFIG or etc/central.ini)")
    p.add_argument("--since", metavar="ISO", help="from this date or time (UTC unless it names a zone)")
    p.add_argument("--until", metavar="ISO", help="before this date or time")
    p.add_argument("--patient", metavar="ID", help="only records about this Patient ID")
    p.add_argument("--user", metavar="NAME", help="only records of this user or account")
    p.add_argument("--event", metavar="TYPE", help="store, query, retrieve, view, export, route-correction, "
                                                   "login, logout, credential or auth-refused")
    p.add_argument("--limit", type=int, default=MAX_RECORDS, help=f"at most this many records (default {MAX_RECORDS})")
    p.add_argument("--json", action="store_true", help="JSON, as GET /api/audit answers")
    p.set_defaults(func=audit_list)
