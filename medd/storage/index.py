"""The object index (objects, received packages, status events): the
:class:`ObjectIndex` connector every role uses, over blocking functions of a
connection that other connectors reuse inside their own transactions.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Callable

from sqlalchemy import and_, bindparam, func, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection

from medd.objects import KeyInformation
from medd.storage.connector import Connector
from medd.storage.schema import all_tables, conflicts, objects, receipts, status_events


@dataclass(frozen=True)
class ObjectRecord:
    """An object as indexed."""

    sop_instance_uid: str
    object_type: str
    media_type: str
    study_instance_uid: str
    digest: str
    size: int
    origin: str
    transport: str
    received_at: datetime
    sop_class_uid: str | None = None
    series_instance_uid: str | None = None
    transfer_syntax_uid: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    patient_birth_date: str | None = None
    patient_sex: str | None = None
    modality: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    study_description: str | None = None
    study_id: str | None = None
    accession_number: str | None = None
    referring_physician_name: str | None = None
    series_number: str | None = None
    series_description: str | None = None
    instance_number: str | None = None
    institution_name: str | None = None
    priority: str | None = None
    patient_age: str | None = None
    centre: str | None = None  # the registered centre, as central named it when delivering the object
    study_images: int | None = None  # images of its study central routes to this viewer, when delivered
    intended_recipients: str | None = None
    referenced_image_uid: str | None = None
    rows: int | None = None
    columns: int | None = None
    number_of_frames: int | None = None
    peer: str | None = None  # the connection it came over (a DICOM association's client IP)

    @classmethod
    def from_row(cls, row) -> "ObjectRecord":
        m = row._mapping
        return cls(**{f.name: m[f.name] for f in fields(cls)})

    @classmethod
    def from_keyinfo(cls, keyinfo: KeyInformation, **kw) -> "ObjectRecord":
        values = {
            f.name: getattr(keyinfo, f.name)
            for f in fields(cls)
            if hasattr(keyinfo, f.name) and f.name not in ("intended_recipients",)
        }
        values["intended_recipients"] = "\\".join(keyinfo.intended_recipients) or None
        values["referenced_image_uid"] = keyinfo.referenced_image_uids[0] if keyinfo.referenced_image_uids else None
        values.update(kw)
        return cls(**values)


@dataclass(frozen=True)
class Receipt:
    message_id: str
    attachment: str
    uid: str
    origin: str
    destination: str
    transport: str
    peer: str | None = None


@dataclass(frozen=True)
class StatusEvent:
    """A status message as received: its package's receipt and what it says."""

    receipt: Receipt
    event: str
    uid: str
    user: str | None = None
    time: str | None = None  # as the viewer stated it
    # Central's receipts to a centre: the viewer an object was routed to or opened on, why it was quarantined.
    viewer: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class StoreOutcome:
    """What storing did: ``created`` False means the object was already indexed.

    With ``conflict`` set (a reason) nothing was stored: the UID or the
    Message-ID is already held for another origin, or with other content, and
    ``record`` is what holds it (the refused object's own record for a
    Message-ID without an object).
    """

    record: ObjectRecord
    created: bool
    duplicate_package: bool = False
    conflict: str | None = None


@dataclass(frozen=True)
class Conflict:
    """An object refused because its identifier was already held (the ``conflicts`` table)."""

    identifier: str  # "uid" or "message-id"
    sop_instance_uid: str
    message_id: str | None
    origin: str
    transport: str
    peer: str | None
    digest: str
    held_by: str
    reason: str
    refused_at: datetime

    @classmethod
    def from_row(cls, row) -> "Conflict":
        m = row._mapping
        return cls(**{f.name: m[f.name] for f in fields(cls)})


def same_origin(a: str, b: str) -> bool:
    """Origins compare as senders do: an AE title or an address, whitespace and case aside."""
    return a.strip().casefold() == b.strip().casefold()


# Statements every stored object runs, built once: SQLAlchemy then compiles and keys each once
# for the process instead of once per object.
_OBJECT_BY_UID = select(objects).where(objects.c.sop_instance_uid == bindparam("uid"))
_RECEIPT_BY_MESSAGE_ID = select(receipts.c.origin, receipts.c.attachment).where(
    receipts.c.message_id == bindparam("message_id"))
_INSERT_OBJECT = objects.insert()
_INSERT_OBJECT_IF_NEW = {
    "sqlite": sqlite_insert(objects).on_conflict_do_nothing(index_elements=[objects.c.sop_instance_uid]),
    "postgresql": postgresql_insert(objects).on_conflict_do_nothing(index_elements=[objects.c.sop_instance_uid]),
}
_INSERT_RECEIPT = receipts.insert()


def object_by_uid(conn: Connection, uid: str) -> ObjectRecord | None:
    row = conn.execute(_OBJECT_BY_UID, {"uid": uid}).first()
    return ObjectRecord.from_row(row) if row else None


def _refuse(conn: Connection, record: ObjectRecord, receipt: Receipt | None, identifier: str, held_by: str,
            reason: str, holder: ObjectRecord | None) -> StoreOutcome:
    conn.execute(conflicts.insert().values(
        identifier=identifier, sop_instance_uid=record.sop_instance_uid,
        message_id=receipt.message_id if receipt is not None else None, origin=record.origin,
        transport=record.transport, peer=record.peer, digest=record.digest, held_by=held_by, reason=reason,
        refused_at=record.received_at,
    ))
    return StoreOutcome(holder or record, created=False, conflict=reason)


def store_object(conn: Connection, record: ObjectRecord, receipt: Receipt | None = None,
                 with_new: Callable[[Connection, ObjectRecord], None] | None = None) -> StoreOutcome:
    """Index ``record`` (and the package ``receipt``) unless already indexed.

    Idempotent: the same package (same Message-ID, origin and attachment) or
    the same object (same UID, origin and content) stored again changes
    nothing. Anything else that reuses an identifier already held is a
    ``conflict``, recorded in ``conflicts`` and not stored: the first holder
    keeps it, and the later sender is told, so that neither an object nor a
    Message-ID can be squatted silently. ``with_new(conn, record)`` writes what
    a role keeps beside a new object in the same transaction (the gateway's
    forwarding queue); it must be idempotent, as every call here may be re-run
    after a rollback.
    """
    if receipt is not None:
        held = conn.execute(_RECEIPT_BY_MESSAGE_ID, {"message_id": receipt.message_id}).first()
        if held is not None:
            existing = object_by_uid(conn, record.sop_instance_uid)
            if same_origin(held.origin, receipt.origin) and held.attachment == receipt.attachment:
                return StoreOutcome(existing or record, created=False, duplicate_package=True)
            whose = "another origin" if not same_origin(held.origin, receipt.origin) else "another attachment"
            return _refuse(conn, record, receipt, "message-id", held.origin,
                           f"Message-ID already used by {whose}: {receipt.message_id}", None)
    if _insert_if_new(conn, record):
        if receipt is not None:
            conn.execute(_INSERT_RECEIPT, {**receipt.__dict__, "received_at": record.received_at})
        if with_new is not None:
            with_new(conn, record)
        return StoreOutcome(record, created=True)
    existing = object_by_uid(conn, record.sop_instance_uid)
    if not same_origin(existing.origin, record.origin):
        return _refuse(conn, record, receipt, "uid", existing.origin,
                       f"UID already held for another origin: {record.sop_instance_uid}", existing)
    if existing.digest != record.digest:
        return _refuse(conn, record, receipt, "uid", existing.origin,
                       f"UID already stored with other content: {record.sop_instance_uid}", existing)
    if receipt is not None:
        conn.execute(_INSERT_RECEIPT, {**receipt.__dict__, "received_at": record.received_at})
    return StoreOutcome(existing, created=False)


def _insert_if_new(conn: Connection, record: ObjectRecord) -> bool:
    """Insert the object's row unless its UID is already indexed; whether it was inserted.

    One statement (INSERT ... ON CONFLICT DO NOTHING) where the backend has it, rather than a
    lookup before every insert: a new object, the common case, costs no SELECT."""
    if_new = _INSERT_OBJECT_IF_NEW.get(conn.dialect.name)
    if if_new is not None:
        return conn.execute(if_new, record.__dict__).rowcount == 1
    if object_by_uid(conn, record.sop_instance_uid) is not None:
        return False
    conn.execute(_INSERT_OBJECT, record.__dict__)
    return True


def list_conflicts(conn: Connection, limit: int = 100, offset: int = 0) -> list[Conflict]:
    """The recorded conflicts, newest first."""
    q = select(conflicts).order_by(conflicts.c.id.desc()).limit(limit).offset(offset)
    return [Conflict.from_row(r) for r in conn.execute(q)]


def unreferenced(conn: Connection, digests: list[str]) -> set[str]:
    """Those of ``digests`` that no table of this database references (a ``digest`` column of any
    table: objects, the archive catalogue, the viewer's outgoing packages, the gateway's queues).
    The conflicts table only records what was refused, so it holds no blob."""
    left = set(digests)
    for table in all_tables().sorted_tables:
        if not left or "digest" not in table.c or table is conflicts:
            continue
        column = table.c.digest
        for chunk in _chunks(sorted(left), 500):
            left -= {d for (d,) in conn.execute(select(column).where(column.in_(chunk)).distinct())}
    return left


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def store_status(conn: Connection, status: StatusEvent, at: datetime) -> bool:
    """Record a status event; False if this package was already recorded."""
    receipt = status.receipt
    if conn.execute(select(status_events.c.id).where(status_events.c.message_id == receipt.message_id)).first():
        return False
    conn.execute(receipts.insert().values(**receipt.__dict__, received_at=at))
    conn.execute(
        status_events.insert().values(
            message_id=receipt.message_id, event=status.event, uid=status.uid, user=status.user,
            event_time=status.time, origin=receipt.origin, received_at=at,
        )
    )
    return True


# --- queries (QIDO-RS and the CLI) -----------------------------------------------------------

STUDY_FILTERS = {
    "PatientID": objects.c.patient_id,
    "PatientName": objects.c.patient_name,
    "StudyInstanceUID": objects.c.study_instance_uid,
    "AccessionNumber": objects.c.accession_number,
    "StudyDate": objects.c.study_date,
    "ModalitiesInStudy": objects.c.modality,
    "Modality": objects.c.modality,
    "StudyID": objects.c.study_id,
    "SeriesInstanceUID": objects.c.series_instance_uid,
    "SOPInstanceUID": objects.c.sop_instance_uid,
    "SOPClassUID": objects.c.sop_class_uid,
}


@dataclass(frozen=True)
class Match:
    """A QIDO-style filter: attribute keyword and DICOM matching value."""

    keyword: str
    value: str


def wildcard_match(column, value: str, *, substring: bool = False, ignore_case: bool = False):
    """``column`` LIKE a DICOM wildcard pattern (``*`` any run, ``?`` one character).

    SQL's own wildcards and the escape character in ``value`` match
    themselves. With ``substring``, a value without wildcards matches
    anywhere in the column (the worklist's search boxes); ``ignore_case``
    compares lower-cased.
    """
    if ignore_case:
        column, value = func.lower(column), value.lower()
    pattern = value.replace("\\", "\\\\").replace("%", r"\%").replace("_", r"\_")
    if substring and "*" not in value and "?" not in value:
        pattern = f"%{pattern}%"
    return column.like(pattern.replace("*", "%").replace("?", "_"), escape="\\")


def _condition(match: Match):
    column = STUDY_FILTERS[match.keyword]
    value = match.value
    if match.keyword == "StudyDate" and "-" in value:
        low, _, high = value.partition("-")
        parts = []
        if low:
            parts.append(column >= low)
        if high:
            parts.append(column <= high)
        return and_(*parts)
    if (match.keyword.endswith("UID") or match.keyword == "ModalitiesInStudy") and "\\" in value:
        return column.in_(value.split("\\"))
    if "*" in value or "?" in value:
        return wildcard_match(column, value)
    return column == value


def _where(matches: list[Match]):
    return and_(*[_condition(m) for m in matches]) if matches else None


def study_columns() -> list:
    """Study-level attributes aggregated over a study's objects (for a GROUP BY study)."""
    c = objects.c
    study_level = (
        c.patient_id, c.patient_name, c.patient_birth_date, c.patient_sex, c.study_date, c.study_time,
        c.study_description, c.study_id, c.accession_number, c.referring_physician_name, c.institution_name,
    )
    return [
        c.study_instance_uid,
        *(func.min(column).label(column.name) for column in study_level),
        func.count(func.distinct(c.series_instance_uid)).label("series_count"),
    ]


def search_studies(conn: Connection, matches: list[Match], limit: int = 100, offset: int = 0) -> list[dict]:
    """Study-level rows: one dict of study attributes per matching study.

    Only DICOM instances count: a plain-text report is attached to its study
    but is no instance of it (QIDO-RS and WADO-RS know nothing of it).
    """
    c = objects.c
    dicom = c.media_type == "application/dicom"
    inner = select(c.study_instance_uid).where(dicom).distinct()
    where = _where(matches)
    if where is not None:
        inner = inner.where(where)
    q = (
        select(*study_columns(), func.count().label("instance_count"))
        .where(and_(dicom, c.study_instance_uid.in_(inner)))
        .group_by(c.study_instance_uid)
        .order_by(func.min(c.study_date), c.study_instance_uid)
        .limit(limit)
        .offset(offset)
    )
    studies = [dict(r._mapping) for r in conn.execute(q)]
    if studies:
        uids = [s["study_instance_uid"] for s in studies]
        mods: dict[str, set] = {}
        for uid, modality in conn.execute(
            select(c.study_instance_uid, c.modality).distinct().where(c.study_instance_uid.in_(uids))
        ):
            if modality:
                mods.setdefault(uid, set()).add(modality)
        for s in studies:
            s["modalities"] = sorted(mods.get(s["study_instance_uid"], ()))
    return studies


def search_series(conn: Connection, study_uid: str | None, matches: list[Match], limit: int = 100, offset: int = 0) -> list[dict]:
    c = objects.c
    q = select(
        c.study_instance_uid,
        c.series_instance_uid,
        func.min(c.modality).label("modality"),
        func.min(c.series_number).label("series_number"),
        func.min(c.series_description).label("series_description"),
        func.count().label("instance_count"),
    ).where(c.series_instance_uid.is_not(None))
    if study_uid:
        q = q.where(c.study_instance_uid == study_uid)
    where = _where(matches)
    if where is not None:
        q = q.where(where)
    q = q.group_by(c.study_instance_uid, c.series_instance_uid).order_by(c.series_instance_uid).limit(limit).offset(offset)
    return [dict(r._mapping) for r in conn.execute(q)]


def search_instances(
    conn: Connection, study_uid: str | None, series_uid: str | None, matches: list[Match], limit: int = 100, offset: int = 0
) -> list[ObjectRecord]:
    c = objects.c
    q = select(objects).where(c.media_type == "application/dicom")
    if study_uid:
        q = q.where(c.study_instance_uid == study_uid)
    if series_uid:
        q = q.where(c.series_instance_uid == series_uid)
    where = _where(matches)
    if where is not None:
        q = q.where(where)
    q = q.order_by(c.id).limit(limit).offset(offset)
    return [ObjectRecord.from_row(r) for r in conn.execute(q)]


def count_objects(conn: Connection) -> int:
    return conn.execute(select(func.count()).select_from(objects)).scalar_one()


class ObjectIndex(Connector):
    """The object index of a node, whatever its role. Every method returns a Deferred."""

    def store_object(self, record: ObjectRecord, receipt: Receipt | None = None,
                     with_new: Callable[[Connection, ObjectRecord], None] | None = None,
                     then: Callable[[Connection, StoreOutcome], None] | None = None):
        """Deferred :class:`StoreOutcome`; see :func:`store_object`. ``then(conn, outcome)``
        writes what the outcome calls for in the same transaction (the ingest's audit record)."""

        def run(conn):
            outcome = store_object(conn, record, receipt, with_new)
            if then is not None:
                then(conn, outcome)
            return outcome

        return self.db.run(run)

    def conflicts(self, limit: int = 100, offset: int = 0):
        """Deferred list of :class:`Conflict`, newest first: what was refused as already held."""
        return self.db.run(lambda conn: list_conflicts(conn, limit, offset))

    def unreferenced(self, digests: list[str]):
        """Deferred set: those of ``digests`` no row references (the blob sweep's question)."""
        return self.db.run(lambda conn: unreferenced(conn, digests))

    def store_status(self, status: StatusEvent):
        """Deferred bool: whether the status message was new."""
        at = self.now()
        return self.db.run(lambda conn: store_status(conn, status, at))

    def object_by_uid(self, uid: str):
        """Deferred :class:`ObjectRecord` or None."""
        return self.db.run(lambda conn: object_by_uid(conn, uid))

    def search_studies(self, matches: list[Match], limit: int = 100, offset: int = 0):
        return self.db.run(lambda conn: search_studies(conn, matches, limit, offset))

    def search_series(self, study_uid: str | None, matches: list[Match], limit: int = 100, offset: int = 0):
        return self.db.run(lambda conn: search_series(conn, study_uid, matches, limit, offset))

    def search_instances(self, study_uid: str | None, series_uid: str | None, matches: list[Match],
                         limit: int | None = 100, offset: int = 0):
        return self.db.run(lambda conn: search_instances(conn, study_uid, series_uid, matches, limit, offset))

    def count_objects(self):
        return self.db.run(count_objects)
