"""The audit trail: one record per access and per refusal, in the shape of an IHE ATNA
audit message (DICOM PS3.15 A.5, RFC 3881).

A node builds one :class:`AuditTrail` over its :class:`~medd.storage.audit.AuditLog`
and hands it to what it wires (the ingest, the transports' API, the web
resources, the command line); each records what it saw with
:meth:`AuditTrail.record`. The ingest writes a store's record in the very
transaction that indexes the object, so the hot path pays no extra commit.

With ``[audit] syslog = tls://host:port`` the node also sends every record,
as RFC 3881 XML in an RFC 5424 message over TLS with octet-counting framing
(RFC 5425), to that syslog. The database is the source: the
:class:`SyslogForwarder` reads what was not yet sent and marks it sent only
after the connection closed cleanly, so a syslog outage loses nothing and
never blocks anything; it retries with backoff.
"""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from xml.etree import ElementTree as ET

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from medd.config import Config, ConfigError, ConfigProblem
from medd.scheduling import Backoff, CoalescingPass
from medd.storage.audit import AuditEntry, AuditFilter, AuditLog, AuditRecord

log = Logger()

# RFC 3881 EventOutcomeIndicator.
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = 0, 4, 8, 12

AUDIT_KEYS = ("syslog", "ca", "client_cert", "client_key", "retry_base", "retry_max_delay", "interval")


@dataclass(frozen=True)
class EventKind:
    """How one of medd's events is coded in an ATNA message (DCM codes, PS3.16 CID 400-403)."""

    code: str
    meaning: str
    action: str
    type_code: tuple[str, str] | None = None


LOGIN = ("110122", "Login")
EVENTS: dict[str, EventKind] = {
    "store": EventKind("110104", "DICOM Instances Transferred", "C"),
    "query": EventKind("110112", "Query", "E"),
    "retrieve": EventKind("110104", "DICOM Instances Transferred", "R"),
    "view": EventKind("110103", "DICOM Instances Accessed", "R"),
    "export": EventKind("110106", "Export", "R"),
    "route-correction": EventKind("110103", "DICOM Instances Accessed", "U"),
    "login": EventKind("110114", "User Authentication", "E", LOGIN),
    "logout": EventKind("110114", "User Authentication", "E", ("110123", "Logout")),
    "credential": EventKind("110113", "Security Alert", "U", ("110137", "User Security Attributes Changed")),
    # A centre, viewer or routing rule added or removed from the console.
    "directory": EventKind("110113", "Security Alert", "U", ("110128", "Network Configuration")),
    "auth-refused": EventKind("110114", "User Authentication", "E", LOGIN),
}


class AuditTrail:
    """What every part of a node records through. See the module docstring."""

    def __init__(self, log: AuditLog):
        self.log = log
        self.node = log.node
        self._forwarders: list["SyslogForwarder"] = []

    @staticmethod
    def entry(event: str, *, action: str | None = None, outcome: int = SUCCESS, **fields) -> AuditEntry:
        """An :class:`AuditEntry` for ``event`` (one of :data:`EVENTS`), its action code by default."""
        kind = EVENTS[event]
        return AuditEntry(event=event, action=action or kind.action, outcome=outcome, **fields)

    def record(self, event: str, **fields) -> Deferred:
        """Deferred None once the record is committed; the keywords are :meth:`entry`'s."""
        return self.log.append(self.entry(event, **fields)).addCallback(self.recorded)

    def appender(self, entry: AuditEntry):
        """``fn(conn)`` appending ``entry`` inside someone else's transaction; call :meth:`recorded` after it commits."""
        return self.log.appender(entry)

    def recorded(self, result=None):
        """Tell the syslog forwarders that there is something new (passes ``result`` through)."""
        for forwarder in self._forwarders:
            forwarder.notify()
        return result

    def search(self, where: AuditFilter, limit: int) -> Deferred:
        return self.log.search(where, limit)

    def add_forwarder(self, forwarder: "SyslogForwarder") -> None:
        self._forwarders.append(forwarder)


def export_recorder(audit: AuditTrail):
    """``exported(conn, delivery, detail)`` for central's outbox: an export record for a delivery
    acknowledged by its viewer or centre, written in the transaction that marks it delivered."""
    from medd.storage.index import object_by_uid

    def exported(conn, delivery, detail: str) -> None:
        record = object_by_uid(conn, delivery.uid) if delivery.status is None else None
        what = f"status {delivery.status.get('event')} " if delivery.status else ""
        audit.appender(audit.entry(
            "export", user=delivery.destination, credential=delivery.destination,
            patient_id=record.patient_id if record else None,
            study_instance_uid=record.study_instance_uid if record else None,
            series_instance_uid=record.series_instance_uid if record else None,
            sop_instance_uid=delivery.uid, detail=f"{what}delivery {delivery.id}: {detail}"))(conn)

    return exported


def correction_recorder(audit: AuditTrail):
    """``corrected(conn, uid, admin, action, detail)`` for central's quarantine: a route-correction record
    (U: routed, D: rejected) written in the correction's transaction."""
    from medd.storage.index import object_by_uid

    def corrected(conn, uid: str, admin: str, action: str, detail: str) -> None:
        record = object_by_uid(conn, uid)
        audit.appender(audit.entry(
            "route-correction", action=action, user=admin, credential=admin,
            patient_id=record.patient_id if record else None,
            study_instance_uid=record.study_instance_uid if record else None,
            series_instance_uid=record.series_instance_uid if record else None, sop_instance_uid=uid,
            detail=detail))(conn)

    return corrected


def credential_change(audit: AuditTrail, what: str, account: str, *, action: str, admin: str | None,
                      peer: str | None = None, transport: str = "cli") -> Deferred:
    """Record that a credential of ``account`` was issued (C), replaced (U) or revoked (D) by ``admin``."""
    return audit.record("credential", action=action, user=admin, credential=account, peer=peer, transport=transport,
                        detail=what)


# --- RFC 3881 / PS3.15 A.5 XML ------------------------------------------------------------------------


def _coded(parent, tag: str, code: str, meaning: str, system: str = "DCM"):
    return ET.SubElement(parent, tag, {"csd-code": code, "codeSystemName": system, "originalText": meaning})


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def audit_message(record: AuditRecord) -> bytes:
    """The record as a DICOM PS3.15 A.5 ``AuditMessage`` (RFC 3881 shape), UTF-8 XML."""
    e = record.entry
    kind = EVENTS.get(e.event, EventKind("110100", "Application Activity", e.action))
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(root, "EventIdentification", {
        "EventActionCode": e.action,
        "EventDateTime": record.at.astimezone(timezone.utc).isoformat().replace("+00:00", "Z"),
        "EventOutcomeIndicator": str(e.outcome),
    })
    _coded(ident, "EventID", kind.code, kind.meaning)
    if kind.type_code is not None:
        _coded(ident, "EventTypeCode", *kind.type_code)
    if e.detail:
        ET.SubElement(ident, "EventOutcomeDescription").text = e.detail
    requestor = {"UserID": e.user or e.credential or e.peer or "unknown", "UserIsRequestor": "true"}
    if e.credential:
        requestor["AlternativeUserID"] = e.credential
    if e.peer:
        requestor["NetworkAccessPointID"] = e.peer
        requestor["NetworkAccessPointTypeCode"] = "2" if _is_ip(e.peer) else "1"
    ET.SubElement(root, "ActiveParticipant", requestor)
    ET.SubElement(root, "ActiveParticipant", {"UserID": record.node, "UserIsRequestor": "false"})
    ET.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": record.node})
    if e.patient_id:
        patient = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": e.patient_id, "ParticipantObjectTypeCode": "1",
            "ParticipantObjectTypeCodeRole": "1"})
        _coded(patient, "ParticipantObjectIDTypeCode", "2", "Patient Number", "RFC-3881")
    if e.study_instance_uid:
        study = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": e.study_instance_uid, "ParticipantObjectTypeCode": "2",
            "ParticipantObjectTypeCodeRole": "3"})
        _coded(study, "ParticipantObjectIDTypeCode", "110180", "Study Instance UID")
        if e.sop_instance_uid:
            description = ET.SubElement(study, "ParticipantObjectDescription")
            if e.series_instance_uid:
                ET.SubElement(description, "Series", {"UID": e.series_instance_uid})
            ET.SubElement(ET.SubElement(description, "SOPClass", {"NumberOfInstances": "1"}), "Instance",
                          {"UID": e.sop_instance_uid})
    elif e.sop_instance_uid:
        instance = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": e.sop_instance_uid, "ParticipantObjectTypeCode": "2",
            "ParticipantObjectTypeCodeRole": "3"})
        _coded(instance, "ParticipantObjectIDTypeCode", "110181", "SOP Class UID")
    return ET.tostring(root, encoding="utf-8", xml_declaration=False)


# RFC 5424: facility 10 (security/authorization), severity 5 (notice) for success, 4 (warning) otherwise.
def syslog_message(record: AuditRecord, hostname: str | None = None) -> bytes:
    """One RFC 5424 message carrying the record's XML (MSGID ``IHE+RFC-3881``, as IHE ATNA sends it)."""
    severity = 5 if record.entry.outcome == SUCCESS else 4
    stamp = record.at.astimezone(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
    host = (hostname or socket.gethostname() or "-").replace(" ", "")[:255]
    header = f"<{10 * 8 + severity}>1 {stamp} {host} medd - IHE+RFC-3881 - "
    return header.encode("ascii", "replace") + b"\xef\xbb\xbf" + audit_message(record)


def octet_counted(message: bytes) -> bytes:
    """RFC 5425 framing: ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(message)).encode("ascii") + b" " + message


# --- [audit] ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditSettings:
    """``[audit]``: where the trail is also sent (None: the database only) and how it retries."""

    syslog_host: str | None = None
    syslog_port: int = 6514
    ca: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    retry: Backoff = Backoff(5.0, 300.0)
    interval: float = 60.0

    @property
    def target(self) -> str:
        return f"tls://{self.syslog_host}:{self.syslog_port}"


def audit_settings(config: Config, *, check_files: bool = True) -> AuditSettings:
    """Parse ``[audit]``; :class:`ConfigError` names every unusable key."""
    values = config.section("audit")
    problems: list[ConfigProblem] = []
    base = Path(config.path).resolve().parent

    def problem(key, message):
        problems.append(ConfigProblem(config.path, "audit", key, message))

    settings = AuditSettings()
    url = values.get("syslog", "").strip()
    if url:
        scheme, _, rest = url.partition("://")
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        if scheme != "tls" or not host or not port.isdigit() or not 0 < int(port) < 65536:
            problem("syslog", f"not tls://host:port (RFC 5425 syslog over TLS): {url!r}")
        else:
            settings = replace(settings, syslog_host=host, syslog_port=int(port))
    files = {}
    for key in ("ca", "client_cert", "client_key"):
        value = values.get(key, "").strip()
        if not value:
            continue
        if check_files and not (base / value).is_file():
            problem(key, f"no such file: {base / value}")
        files[key] = str(base / value)
    if files and not url:
        problem(next(iter(files)), "applies only with [audit] syslog")
    if url and "ca" not in files:
        problem("ca", "the CA that signed the syslog's certificate is required with [audit] syslog")
    if "client_key" in files and "client_cert" not in files:
        problem("client_key", "needs [audit] client_cert")
    numbers = {}
    for key, default in (("retry_base", 5.0), ("retry_max_delay", 300.0), ("interval", 60.0)):
        text = values.get(key, "").strip()
        numbers[key] = default
        if text:
            try:
                numbers[key] = float(text)
                if not 0 < numbers[key] <= 86400:
                    raise ValueError(text)
            except ValueError:
                problem(key, f"not a number of seconds between 0 and 86400: {text!r}")
    if problems:
        raise ConfigError(problems)
    return replace(settings, **files, retry=Backoff(numbers["retry_base"], numbers["retry_max_delay"]),
                   interval=numbers["interval"])


# --- the syslog forwarder -------------------------------------------------------------------------------


@implementer(IHandshakeListener)
class _OneBatch(Protocol):
    """Writes the frames and closes; ``done`` fires once the TLS handshake completed and the connection
    closed after the last byte was written.

    RFC 5425 has no acknowledgement: that is all a sender can know. rsyslog closes without a TLS
    close_notify of its own, so a connection lost after a completed handshake and our close counts
    as sent; a failed handshake (a certificate refused either way) or a reset before it does not.
    """

    def __init__(self, frames: bytes):
        self.frames = frames
        self.handshook = False
        self.done: Deferred = Deferred()

    def connectionMade(self):
        self.transport.write(self.frames)
        self.transport.loseConnection()

    def handshakeCompleted(self):
        self.handshook = True

    def connectionLost(self, reason):
        if self.handshook and reason.check(ConnectionDone, ConnectionLost):
            self.done.callback(None)
        else:
            self.done.errback(reason)


def tls_connector(reactor, settings: AuditSettings, timeout: float = 30.0):
    """``connect(protocol)`` -> Deferred: a TLS 1.2+ connection to the syslog, its certificate checked
    against ``[audit] ca`` and its name, presenting ``client_cert`` if configured."""
    from twisted.internet import ssl
    from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS

    trust = ssl.Certificate.loadPEM(Path(settings.ca).read_bytes())
    client = None
    if settings.client_cert:
        pem = Path(settings.client_cert).read_bytes()
        if settings.client_key:
            pem += b"\n" + Path(settings.client_key).read_bytes()
        client = ssl.PrivateCertificate.loadPEM(pem)
    options = ssl.optionsForClientTLS(settings.syslog_host, trustRoot=trust, clientCertificate=client,
                                      extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2})
    endpoint = wrapClientTLS(options, HostnameEndpoint(reactor, settings.syslog_host.encode("idna"),
                                                       settings.syslog_port, timeout=timeout))

    def connect(protocol):
        return connectProtocol(endpoint, protocol)

    return connect


class SyslogForwarder(Service):
    """Sends the node's audit trail to one syslog, from the database, at least once.

    A pass reads the records after the target's mark, sends up to ``batch``
    of them over one connection, and moves the mark once that connection
    closed cleanly. It runs shortly after new records (``notify``), every
    ``interval`` (records other processes wrote: the command line), and after
    a failure with exponential backoff. Nothing waits for it.
    """

    log = Logger()

    def __init__(self, audit: AuditTrail, settings: AuditSettings, connect, clock, *, batch: int = 200,
                 delay: float = 0.5, deadline: float = 60.0):
        self.audit = audit
        self.settings = settings
        self.target = settings.target
        self.connect = connect
        self.clock = clock
        self.batch = batch
        self.delay = delay
        self.deadline = deadline
        self.failures = 0
        self._due = False
        self.sends = CoalescingPass(self._pass, f"audit syslog to {self.target}", clock)
        audit.add_forwarder(self)

    def startService(self):
        super().startService()
        self.sends.kick()

    def stopService(self):
        super().stopService()
        self.sends.unschedule()
        return self.sends.idle()

    def notify(self) -> None:
        if self.running and not self._due and not self.failures:
            self._due = True
            self.sends.schedule(self.delay)

    async def _pass(self) -> None:
        self._due = False
        try:
            while await self._send_some():
                pass
        except Exception as e:
            self.failures += 1
            wait = self.settings.retry.delay(self.failures)
            self.log.warn("audit trail not sent to {target} ({error}); retry in {wait} s",
                          target=self.target, error=str(getattr(e, "value", e)) or type(e).__name__, wait=wait)
            if self.running:
                self.sends.schedule(wait)
            return
        self.failures = 0
        if self.running and not self._due:
            self.sends.schedule(self.settings.interval)

    async def _send_some(self) -> bool:
        """Send the next batch; True if it was full (there may be more)."""
        after = await self.audit.log.forwarded(self.target)
        records = await self.audit.log.search(AuditFilter(after_id=after), self.batch)
        if not records:
            return False
        frames = b"".join(octet_counted(syslog_message(r)) for r in records)
        protocol = _OneBatch(frames)
        connected = self.connect(protocol).addTimeout(self.deadline, self.clock)
        await connected
        await protocol.done.addTimeout(self.deadline, self.clock)
        await self.audit.log.mark_forwarded(self.target, records[-1].id)
        return len(records) == self.batch


def audit_time(text: str) -> datetime:
    """An ISO 8601 date or time (UTC when it names no zone); ValueError otherwise."""
    value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def record_json(record: AuditRecord) -> dict:
    """A record as the CLI's ``--json`` and ``GET /api/audit`` show it."""
    e = record.entry
    return {"id": record.id, "at": record.at.isoformat(), "node": record.node, "event": e.event,
            "event_id": EVENTS[e.event].code if e.event in EVENTS else None, "action": e.action, "outcome": e.outcome,
            "user": e.user, "credential": e.credential, "peer": e.peer, "transport": e.transport,
            "patient_id": e.patient_id, "study_instance_uid": e.study_instance_uid,
            "series_instance_uid": e.series_instance_uid, "sop_instance_uid": e.sop_instance_uid, "detail": e.detail}
