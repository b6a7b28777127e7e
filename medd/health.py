"""Is this node fit to work? The checks behind ``GET /readyz`` and ``medd doctor``.

Each check returns :class:`Finding` values: what was looked at, how it went and,
when it went wrong, what an operator should do. The running node asks the checks
that concern it now (database, blob store, listeners, archive target);
``medd doctor`` asks the same ones from the shell, plus the certificates, the
clock and the configuration (medd/cli/doctor.py).
"""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from twisted.logger import Logger
from twisted.web.resource import Resource

from medd.webresource import PROBLEM_JSON, json_response, render_async

log = Logger()

OK, WARNING, ERROR = "ok", "warning", "error"
#: A certificate that expires within this many days is a warning.
EXPIRY_WARNING_DAYS = 30
#: How long ``/readyz`` waits for the database before calling it unreachable (seconds).
DATABASE_DEADLINE = 5.0
#: Before this, the system clock is surely wrong (medd did not exist yet).
EARLIEST_SANE_TIME = datetime(2025, 1, 1, tzinfo=timezone.utc)
#: Largest tolerated difference between this host's clock and the database server's, or the newest stored object.
CLOCK_TOLERANCE = 120.0


@dataclass(frozen=True)
class Finding:
    check: str
    level: str
    message: str
    #: What to do about it (None when nothing needs doing).
    action: str | None = None

    @property
    def failed(self) -> bool:
        return self.level == ERROR

    def line(self) -> str:
        text = f"{self.level.upper():7} {self.check}: {self.message}"
        return f"{text} -- {self.action}" if self.action else text


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# --- the checks (blocking; a running node calls them off the reactor) ---------------------------------


def check_database(engine) -> Finding:
    from sqlalchemy import text

    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1")).scalar()
    except Exception as e:
        return Finding("database", ERROR, f"not reachable: {type(e).__name__}",
                       "check [database] url, that the server runs and accepts this node's user")
    return Finding("database", OK, "reachable")


def check_blob_store(path: Path, min_free_space: int) -> list[Finding]:
    """The store's folder takes a durable write, and its file system has ``min_free_space`` left."""
    findings = []
    probe = Path(path) / "tmp" / f"health-{uuid.uuid4().hex}"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"medd health probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        findings.append(Finding("blob store", OK, "writable"))
    except OSError as e:
        findings.append(Finding("blob store", ERROR, f"not writable: {e.strerror or e}",
                                "check that [storage] path exists, is mounted and belongs to the node's user"))
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    try:
        st = os.statvfs(path)
    except OSError as e:
        findings.append(Finding("free space", ERROR, f"cannot be measured: {e.strerror or e}",
                                "check that [storage] path exists"))
        return findings
    free = st.f_bavail * st.f_frsize
    if free < min_free_space:
        findings.append(Finding("free space", ERROR, f"{_size(free)} free, below [limits] min_free_space "
                                f"({_size(min_free_space)})",
                                "free space in the blob store's file system (archive and evict, or grow it)"))
    else:
        findings.append(Finding("free space", OK, f"{_size(free)} free (minimum {_size(min_free_space)})"))
    return findings


def check_archive(archive) -> Finding | None:
    """The archive target is there (mounted, online); None when the node has no archive."""
    if archive is None:
        return None
    check = getattr(archive, "check_online", None)
    if check is None:
        return Finding("archive", OK, "present (its backend has no online check)")
    try:
        check()
    except OSError:
        return Finding("archive", ERROR, "the archive target is not there (offline or not mounted); archiving waits",
                       "mount the archive target named by [archive] path")
    return Finding("archive", OK, "target present")


def listener_bound(listener) -> bool:
    """Whether a listener service holds its socket (an EndpointListener's port, the DICOM listener's server)."""
    if hasattr(listener, "server"):
        return listener.server is not None
    return getattr(listener, "port", None) is not None


def check_listeners(listeners: dict) -> list[Finding]:
    found = []
    for name, listener in sorted(listeners.items()):
        if listener_bound(listener):
            found.append(Finding(f"listener {name}", OK, "bound"))
        else:
            found.append(Finding(f"listener {name}", ERROR, "not bound",
                                 f"see the node's log for why [listen] {name} is not listening"))
    return found


def certificate_findings(label: str, path: str, now: datetime, warn_days: int = EXPIRY_WARNING_DAYS) -> list[Finding]:
    """One finding per certificate in the PEM file ``path`` (a CA bundle has several)."""
    from cryptography import x509

    check = f"certificate {label}"
    try:
        data = Path(path).read_bytes()
        certificates = x509.load_pem_x509_certificates(data)
    except OSError as e:
        return [Finding(check, ERROR, f"cannot read {path}: {e.strerror or e}", "restore the file or fix its path")]
    except ValueError as e:
        return [Finding(check, ERROR, f"{path} holds no PEM certificate ({e})", "replace it with a PEM certificate")]
    found = []
    for cert in certificates:
        subject = cert.subject.rfc4514_string() or "(no subject)"
        until = cert.not_valid_after_utc
        left = until - now
        if until <= now:
            found.append(Finding(check, ERROR, f"{subject} in {path} expired on {until:%Y-%m-%d}",
                                 "issue a new certificate and restart the node"))
        elif cert.not_valid_before_utc > now:
            found.append(Finding(check, ERROR, f"{subject} in {path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d}",
                                 "check the clock, or the certificate's dates"))
        elif left.days < warn_days:
            found.append(Finding(check, WARNING, f"{subject} in {path} expires on {until:%Y-%m-%d} ({left.days} days)",
                                 "renew it before then"))
        else:
            found.append(Finding(check, OK, f"{subject} valid until {until:%Y-%m-%d}"))
    return found


def node_certificates(config) -> list[tuple[str, str]]:
    """(label, path) of every certificate file the node's config names: ``[tls]``, its client certificates
    towards central, viewers and syslog."""
    folder = Path(config.path).resolve().parent
    named = [("[tls] certificate", config.tls_certificate), ("[tls] client_ca", config.tls_client_ca)]
    for section, keys in (("push", ("tls_ca", "tls_client_cert")), ("central", ("ca", "client_cert")),
                          ("gateway", ("ca", "client_cert")), ("audit", ("ca", "client_cert"))):
        values = config.section(section)
        for key in keys:
            if values.get(key, "").strip():
                named.append((f"[{section}] {key}", str(folder / values[key].strip())))
    return [(label, path) for label, path in named if path]


def check_clock(now: datetime, *, database_now: datetime | None = None,
                newest_received: datetime | None = None) -> list[Finding]:
    """The host's clock is plausible: not before medd existed, close to the database server's, and not
    behind the newest object the node has received (a clock that went back)."""
    found = []
    if now < EARLIEST_SANE_TIME:
        found.append(Finding("clock", ERROR, f"the system clock says {now:%Y-%m-%d %H:%M} UTC",
                             "set the clock and enable NTP (timedatectl set-ntp true)"))
    if database_now is not None and abs((database_now - now).total_seconds()) > CLOCK_TOLERANCE:
        found.append(Finding("clock", ERROR, f"the database server's clock differs by "
                             f"{(database_now - now).total_seconds():+.0f} s",
                             "synchronise both hosts with NTP"))
    if newest_received is not None and (newest_received - now).total_seconds() > CLOCK_TOLERANCE:
        found.append(Finding("clock", ERROR, f"an object was received at {newest_received:%Y-%m-%d %H:%M:%S} UTC, "
                             "later than now: the clock went back", "set the clock right and enable NTP"))
    if not found:
        found.append(Finding("clock", OK, f"{now:%Y-%m-%d %H:%M:%S} UTC"))
    return found


# --- the running node's readiness, and its two pages --------------------------------------------------


class Readiness:
    """What ``GET /readyz`` asks of a running node. The blocking checks run on ``run_blocking`` (the
    node's parsing pool), the database's through the database pool with a deadline."""

    def __init__(self, reactor, *, database, run_blocking, storage_path: Path, min_free_space: int,
                 listeners: dict, archive=None):
        self.reactor = reactor
        self.database = database
        self.run_blocking = run_blocking
        self.storage_path = storage_path
        self.min_free_space = min_free_space
        self.listeners = listeners
        self.archive = archive

    async def _database(self) -> Finding:
        from sqlalchemy import text

        d = self.database.run(lambda conn: conn.execute(text("SELECT 1")).scalar())
        d.addTimeout(DATABASE_DEADLINE, self.reactor)
        try:
            await d
        except Exception as e:
            log.warn("readiness: the database is not reachable: {error!r}", error=e)
            return Finding("database", ERROR, f"not reachable: {type(e).__name__}")
        return Finding("database", OK, "reachable")

    def _files(self) -> list[Finding]:
        found = check_blob_store(self.storage_path, self.min_free_space)
        archive = check_archive(self.archive)
        return found + ([archive] if archive else [])

    async def check(self) -> list[Finding]:
        found = [await self._database()]
        found += await self.run_blocking(self._files)
        found += check_listeners(self.listeners)
        return found

    def resources(self) -> dict[str, Resource]:
        return {"healthz": HealthzResource(), "readyz": ReadyzResource(self)}


class HealthzResource(Resource):
    """``GET /healthz``: the process answers. Open to anyone, so it says nothing else."""

    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return b'{"status": "alive"}'


class ReadyzResource(Resource):
    """``GET /readyz``: 200 when every check passes, else 503 problem JSON naming what fails. Open to
    anyone (load balancers, orchestrators), so it names checks, never paths or addresses."""

    isLeaf = True

    def __init__(self, readiness: Readiness):
        super().__init__()
        self.readiness = readiness

    def render_GET(self, request):
        request.setHeader(b"cache-control", b"no-store")
        return render_async(request, self._get)

    async def _get(self, request):
        findings = await self.readiness.check()
        checks = [{"check": f.check, "status": f.level} for f in findings]
        failing = [f for f in findings if f.failed]
        if not failing:
            return json_response(200, {"status": "ready", "checks": checks})
        doc = {
            "type": "urn:medd:problem:not-ready", "title": "Not ready", "status": 503,
            "detail": "; ".join(f"{f.check}: {f.message}" for f in failing),
            "failing": [{"check": f.check, "message": f.message} for f in failing],
            "checks": checks,
        }
        return json_response(503, doc, PROBLEM_JSON, **{"Retry-After": "10"})


def findings_json(findings: list[Finding]) -> str:
    return json.dumps([asdict(f) for f in findings])


def utcnow() -> datetime:
    return datetime.fromtimestamp(time.time(), timezone.utc)

