"""`medd doctor --config FILE`: what /readyz checks, from the shell, plus certificates, the clock and the config.

One finding per line (``LEVEL check: what was found -- what to do``); the exit status is 1 when any
finding is an error, else 0 (warnings included).
"""
from __future__ import annotations

import errno
import os
import socket
from datetime import datetime, timezone
from pathlib import Path



def add_doctor_command(sub) -> None:
    default = os.environ.get("MEDD_CONFIG")
    p = sub.add_parser("doctor", help="check a node from the shell: config, database, storage, listeners, "
                                      "archive, certificates, clock")
    p.add_argument("--config", default=default, required=default is None, help="the node's config (default: $MEDD_CONFIG)")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args) -> int:
    findings = diagnose(args.config)
    for finding in findings:
        print(finding.line(), flush=True)
    return 1 if any(f.failed for f in findings) else 0


def diagnose(path: str) -> list:
    from medd.config import ConfigError, read_config
    from medd.health import (
        ERROR,
        OK,
        WARNING,
        Finding,
        certificate_findings,
        check_blob_store,
        check_clock,
        node_certificates,
        utcnow,
    )
    from medd.validation import validate_file

    try:
        config, _ = read_config(path, check_files=False)
    except ConfigError as e:
        return [Finding("config", ERROR, str(p), f"fix {path}") for p in e.problems]
    found: list[Finding] = []
    try:
        validate_file(path)
        found.append(Finding("config", OK, f"{path}: a valid {config.role} node {config.name}"))
    except ConfigError as e:
        found += [Finding("config", ERROR, str(p), "fix it (medd check-config runs the same validation)")
                  for p in e.problems]
    except Exception as e:  # a plugin that cannot load
        found.append(Finding("config", ERROR, f"{type(e).__name__}: {e}", "fix the plugin or [plugins] disabled"))
    now = utcnow()
    clock = {}
    if config.database_url:
        found += _database(config.database_url, clock)
    if config.storage_path is not None:
        if config.storage_path.is_dir():
            found += check_blob_store(config.storage_path, config.min_free_space)
        else:
            found.append(Finding("blob store", WARNING, f"{config.storage_path} does not exist yet",
                                 "the node creates it at start; check [storage] path if it should exist"))
    found += _archive(config)
    found += [_listener(name, endpoint) for name, endpoint in sorted(config.listen.items())]
    for label, cert in node_certificates(config):
        found += certificate_findings(label, cert, now)
    found += check_clock(now, **clock)
    return found


def _database(url: str, clock: dict) -> list:
    from alembic.script import ScriptDirectory

    from medd.health import ERROR, OK, WARNING, Finding, check_database
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from medd.storage.database import make_engine
    from medd.storage.migrate import alembic_config, describe, read_state, refusal

    parsed = make_url(url)
    where = parsed.render_as_string(hide_password=True)
    if parsed.drivername.startswith("sqlite") and parsed.database and not Path(parsed.database).exists():
        return [Finding("database", WARNING, f"{where} does not exist yet", "the node creates it at start")]
    engine = make_engine(url)
    try:
        reached = check_database(engine)
        if reached.failed:
            return [reached]
        found = [reached]
        with engine.connect() as conn:
            state = read_state(conn)
            if engine.dialect.name == "postgresql":
                clock["database_now"] = conn.execute(text("SELECT now()")).scalar()
            if "objects" in conn.dialect.get_table_names(conn):
                newest = conn.execute(text("SELECT max(received_at) FROM objects")).scalar()
                if isinstance(newest, str):
                    newest = datetime.fromisoformat(newest)
                if newest is not None and newest.tzinfo is None:
                    newest = newest.replace(tzinfo=timezone.utc)
                clock["newest_received"] = newest
        script = ScriptDirectory.from_config(alembic_config())
        head = script.get_current_head()
        reason = refusal(state, script, where)
        if reason:
            found.append(Finding("schema", ERROR, reason, "run the medd that wrote it, or restore a backup"))
        elif state.revisions == (head,):
            found.append(Finding("schema", OK, f"at {head} (this medd's)"))
        else:
            found.append(Finding("schema", WARNING, f"at {describe(state)}, this medd's is {head}",
                                 "back the database up (medd backup); the node upgrades it at start"))
        return found
    finally:
        engine.dispose()


def _archive(config) -> list:
    from medd.central.archiving import archive_settings
    from medd.health import check_archive
    from medd.config import ConfigError
    from medd.plugins.host import load_plugins

    try:
        settings = archive_settings(config)
        if settings is None:
            return []
        plugins = load_plugins(config.disabled_plugins)
        archive = plugins.storage[("archive", settings.backend)](config)
    except (ConfigError, KeyError):
        return []  # reported with the config
    return [check_archive(archive)]


def _listener(name: str, description: str):
    """Whether something listens on a listener's TCP port (the node, if it runs), or the port could be had."""
    from twisted.internet.endpoints import serverFromString

    from medd.health import ERROR, OK, WARNING, Finding

    check = f"listener {name}"
    try:
        endpoint = serverFromString(None, description)
    except Exception:
        return Finding(check, ERROR, f"not an endpoint: {description}", f"fix [listen] {name}")
    port, interface = getattr(endpoint, "_port", None), getattr(endpoint, "_interface", "")
    if port is None:
        return Finding(check, OK, f"{description} (not a TCP endpoint; not probed)")
    if port == 0:
        return Finding(check, OK, f"{description}: an ephemeral port, chosen at start")
    host = interface or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        if s.connect_ex((host, port)) == 0:
            return Finding(check, OK, f"something listens on {host}:{port} (the node, if it runs)")
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((interface or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
        except OSError as e:
            action = ("run the node as a user allowed to bind it, or choose a port above 1023"
                      if e.errno == errno.EACCES else f"free the port or change [listen] {name}")
            return Finding(check, ERROR, f"{description} cannot be bound: {e.strerror}", action)
    return Finding(check, WARNING, f"nothing listens on {description}", "start the node if it should be running")
