"""The index as medd schema versions 2, 3 and 4 made it before Alembic (``metadata.create_all``
plus a ``medd_schema`` row), frozen here: the migration tests build such a database and
upgrade it. Never edit these tables to follow the models; they are what sites have."""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
)

UID = String(64)


def legacy_metadata(version: int) -> MetaData:
    """The tables of schema ``version`` (2: viewer tables, no outbox index; 3: the outbox
    index, commit 84cdef1; 4: viewers.client_cert_sha256, commit ab684a6)."""
    md = MetaData()
    objects = Table(
        "objects", md,
        Column("id", Integer, primary_key=True),
        Column("sop_instance_uid", UID, nullable=False, unique=True),
        Column("object_type", String(16), nullable=False),
        Column("media_type", String(64), nullable=False),
        Column("sop_class_uid", UID),
        Column("study_instance_uid", UID, nullable=False, index=True),
        Column("series_instance_uid", UID, index=True),
        Column("transfer_syntax_uid", UID),
        Column("patient_id", String(64), index=True),
        Column("patient_name", String(324)),
        Column("patient_birth_date", String(8)),
        Column("patient_sex", String(16)),
        Column("modality", String(16), index=True),
        Column("study_date", String(8), index=True),
        Column("study_time", String(16)),
        Column("study_description", String(64)),
        Column("study_id", String(16)),
        Column("accession_number", String(16), index=True),
        Column("referring_physician_name", String(324)),
        Column("series_number", String(12)),
        Column("series_description", String(64)),
        Column("instance_number", String(12)),
        Column("institution_name", String(64)),
        Column("intended_recipients", Text),
        Column("referenced_image_uid", UID, index=True),
        Column("rows", Integer),
        Column("columns", Integer),
        Column("number_of_frames", Integer),
        Column("digest", String(64), nullable=False),
        Column("size", BigInteger, nullable=False),
        Column("origin", String(255), nullable=False),
        Column("transport", String(16), nullable=False),
        Column("received_at", DateTime(timezone=True), nullable=False),
    )
    Table(
        "receipts", md,
        Column("id", Integer, primary_key=True),
        Column("message_id", String(255), nullable=False, unique=True),
        Column("attachment", String(512), nullable=False),
        Column("uid", UID, nullable=False, index=True),
        Column("origin", String(255), nullable=False),
        Column("destination", String(255), nullable=False),
        Column("transport", String(16), nullable=False),
        Column("peer", String(255)),
        Column("received_at", DateTime(timezone=True), nullable=False),
    )
    Table(
        "status_events", md,
        Column("id", Integer, primary_key=True),
        Column("message_id", String(255), nullable=False, unique=True),
        Column("event", String(16), nullable=False),
        Column("uid", UID, nullable=False, index=True),
        Column("user", String(255)),
        Column("event_time", String(40)),
        Column("origin", String(255), nullable=False),
        Column("received_at", DateTime(timezone=True), nullable=False),
    )
    Table(
        "archive_volumes", md,
        Column("id", Integer, primary_key=True),
        Column("path", String(512), nullable=False, unique=True),
        Column("centre", String(255), nullable=False, index=True),
        Column("modality", String(16), index=True),
        Column("sequence", Integer, nullable=False),
        Column("state", String(16), nullable=False, index=True),
        Column("size", BigInteger, nullable=False),
        Column("members", Integer, nullable=False),
        Column("checksum", String(64)),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("closed_at", DateTime(timezone=True)),
        Column("verified_at", DateTime(timezone=True)),
    )
    Table(
        "archived_objects", md,
        Column("id", Integer, primary_key=True),
        Column("sop_instance_uid", UID, nullable=False, unique=True),
        Column("digest", String(64), nullable=False, index=True),
        Column("volume_id", Integer, ForeignKey("archive_volumes.id"), nullable=False, index=True),
        Column("member_name", String(255), nullable=False),
        Column("header_offset", BigInteger, nullable=False),
        Column("data_offset", BigInteger, nullable=False),
        Column("size", BigInteger, nullable=False),
        Column("sha256", String(64), nullable=False),
        Column("archived_at", DateTime(timezone=True), nullable=False),
        Column("verified_at", DateTime(timezone=True)),
        Column("evicted_at", DateTime(timezone=True)),
    )
    Index("ix_objects_study_series", objects.c.study_instance_uid, objects.c.series_instance_uid)
    Table("medd_schema", md, Column("version", Integer, nullable=False))

    Table(
        "centres", md,
        Column("id", Integer, primary_key=True),
        Column("name", String(64), nullable=False, unique=True),
        Column("created_at", DateTime(timezone=True), nullable=False),
    )
    Table(
        "centre_aliases", md,
        Column("id", Integer, primary_key=True),
        Column("centre_id", Integer, ForeignKey("centres.id", ondelete="CASCADE"), nullable=False),
        Column("kind", String(8), nullable=False),
        Column("value", String(255), nullable=False),
        UniqueConstraint("kind", "value"),
    )
    Table(
        "viewers", md,
        Column("id", Integer, primary_key=True),
        Column("address", String(255), nullable=False, unique=True),
        Column("mode", String(8), nullable=False),
        Column("push_url", String(512)),
        Column("token_hash", String(64), nullable=False, unique=True),
        *([Column("client_cert_sha256", String(64))] if version >= 4 else []),
        Column("created_at", DateTime(timezone=True), nullable=False),
    )
    Table(
        "authorisations", md,
        Column("id", Integer, primary_key=True),
        Column("viewer_id", Integer, ForeignKey("viewers.id", ondelete="CASCADE"), nullable=False),
        Column("centre_id", Integer, ForeignKey("centres.id", ondelete="CASCADE"), nullable=False),
        Column("modality", String(16), nullable=False, default=""),
        UniqueConstraint("viewer_id", "centre_id", "modality"),
    )
    Table(
        "admins", md,
        Column("id", Integer, primary_key=True),
        Column("name", String(64), nullable=False, unique=True),
        Column("token_hash", String(64), nullable=False, unique=True),
        Column("created_at", DateTime(timezone=True), nullable=False),
    )
    Table(
        "routing_rules", md,
        Column("id", Integer, primary_key=True),
        Column("centre", String(64), nullable=False, default=""),
        Column("modality", String(16), nullable=False, default=""),
        Column("object_type", String(16), nullable=False, default=""),
        Column("destination", String(255), nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
    )
    Table(
        "routing_decisions", md,
        Column("uid", UID, primary_key=True),
        Column("centre", String(64)),
        Column("outcome", String(16), nullable=False),
        Column("decided_at", DateTime(timezone=True), nullable=False),
    )
    Table(
        "quarantine", md,
        Column("id", Integer, primary_key=True),
        Column("uid", UID, nullable=False, index=True),
        Column("destination", String(255)),
        Column("reason", Text, nullable=False),
        Column("state", String(12), nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("resolved_at", DateTime(timezone=True)),
    )
    Table(
        "corrections", md,
        Column("id", Integer, primary_key=True),
        Column("quarantine_id", Integer, ForeignKey("quarantine.id"), nullable=False),
        Column("admin", String(64), nullable=False),
        Column("action", String(8), nullable=False),
        Column("old_route", String(255)),
        Column("new_route", String(255)),
        Column("reason", Text),
        Column("at", DateTime(timezone=True), nullable=False),
    )
    deliveries = Table(
        "deliveries", md,
        Column("id", Integer, primary_key=True),
        Column("uid", UID, nullable=False, index=True),
        Column("destination", String(255), nullable=False, index=True),
        Column("state", String(12), nullable=False, index=True),
        Column("message_id", String(255), nullable=False, unique=True),
        Column("attempts", Integer, nullable=False, default=0),
        Column("next_attempt_at", DateTime(timezone=True)),
        Column("last_error", Text),
        Column("opened_by", String(255)),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
        UniqueConstraint("uid", "destination"),
    )
    Table(
        "delivery_events", md,
        Column("id", Integer, primary_key=True),
        Column("delivery_id", Integer, ForeignKey("deliveries.id", ondelete="CASCADE"), nullable=False, index=True),
        Column("state", String(12), nullable=False),
        Column("detail", Text),
        Column("at", DateTime(timezone=True), nullable=False),
    )
    if version >= 3:
        Index("ix_deliveries_destination_state", deliveries.c.destination, deliveries.c.state, deliveries.c.id)

    Table(
        "viewer_users", md,
        Column("id", Integer, primary_key=True),
        Column("name", String(64), nullable=False, unique=True),
        Column("password_hash", String(255), nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
    )
    Table(
        "viewer_sessions", md,
        Column("id", Integer, primary_key=True),
        Column("token_hash", String(64), nullable=False, unique=True),
        Column("user", String(64), nullable=False, index=True),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("expires_at", DateTime(timezone=True), nullable=False),
    )
    Table(
        "viewer_opened", md,
        Column("id", Integer, primary_key=True),
        Column("uid", UID, nullable=False, index=True),
        Column("user", String(64), nullable=False),
        Column("first_opened_at", DateTime(timezone=True), nullable=False),
        Column("opened_at", DateTime(timezone=True), nullable=False),
        UniqueConstraint("uid", "user"),
    )
    outgoing = Table(
        "viewer_outgoing", md,
        Column("id", Integer, primary_key=True),
        Column("message_id", String(255), nullable=False, unique=True),
        Column("attachment", String(512), nullable=False),
        Column("uid", UID, nullable=False, index=True),
        Column("digest", String(64), nullable=False),
        Column("state", String(12), nullable=False),
        Column("attempts", Integer, nullable=False, default=0),
        Column("next_attempt_at", DateTime(timezone=True), nullable=False),
        Column("last_error", Text),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("sent_at", DateTime(timezone=True)),
    )
    Index("ix_viewer_outgoing_state", outgoing.c.state, outgoing.c.id)
    return md


AT = datetime(2026, 11, 1, 9, 30, tzinfo=timezone.utc)
STUDY = "1.2.826.0.1.3680043.8.498.1"
IMAGE = STUDY + ".1.1"
VIEWER = "dr-lee@viewers.example"


def sample_rows(version: int) -> dict[str, list[dict]]:
    """A little of everything a central and a viewer keep: one object that was received,
    routed, delivered, opened and archived, and the directory behind it. Ids are left to
    the database (each table starts at 1), so its sequences stay right on PostgreSQL."""
    viewer = {"address": VIEWER, "mode": "pull", "push_url": None, "token_hash": "a" * 64, "created_at": AT}
    if version >= 4:
        viewer["client_cert_sha256"] = "c" * 64
    return {
        "objects": [{
            "sop_instance_uid": IMAGE, "object_type": "image", "media_type": "application/dicom",
            "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "study_instance_uid": STUDY,
            "series_instance_uid": STUDY + ".1", "patient_id": "P-0001", "patient_name": "Doe^Jane",
            "modality": "CT", "study_date": "20261101", "rows": 512, "columns": 512, "digest": "d" * 64,
            "size": 525_000, "origin": "CT1", "transport": "dicom", "received_at": AT,
        }],
        "receipts": [{
            "message_id": "<1@centre-a.example>", "attachment": f"image; uid={IMAGE}", "uid": IMAGE,
            "origin": "ct1@centre-a.example", "destination": "central.example", "transport": "http",
            "peer": "192.0.2.7", "received_at": AT,
        }],
        "status_events": [{
            "message_id": "<2@viewers.example>", "event": "opened", "uid": IMAGE, "user": "dr-lee",
            "event_time": "2026-11-01T10:00:00Z", "origin": VIEWER, "received_at": AT,
        }],
        "archive_volumes": [{
            "path": "centre-a/CT/vol-000001.tar", "centre": "centre-a", "modality": "CT", "sequence": 1,
            "state": "closed", "size": 530_432, "members": 1, "checksum": "e" * 64, "created_at": AT, "closed_at": AT,
        }],
        "archived_objects": [{
            "sop_instance_uid": IMAGE, "digest": "d" * 64, "volume_id": 1, "member_name": "d" * 64,
            "header_offset": 0, "data_offset": 512, "size": 525_000, "sha256": "d" * 64, "archived_at": AT,
            "verified_at": AT,
        }],
        "medd_schema": [{"version": version}],
        "centres": [{"name": "centre-a", "created_at": AT}],
        "centre_aliases": [{"centre_id": 1, "kind": "ae", "value": "CT1"}],
        "viewers": [viewer],
        "authorisations": [{"viewer_id": 1, "centre_id": 1, "modality": "CT"}],
        "admins": [{"name": "alice", "token_hash": "b" * 64, "created_at": AT}],
        "routing_rules": [{"centre": "centre-a", "modality": "CT", "object_type": "", "destination": VIEWER,
                           "created_at": AT}],
        "routing_decisions": [{"uid": IMAGE, "centre": "centre-a", "outcome": "routed", "decided_at": AT}],
        "deliveries": [{
            "uid": IMAGE, "destination": VIEWER, "state": "opened", "message_id": "<3@central.example>",
            "attempts": 1, "opened_by": "dr-lee", "created_at": AT, "updated_at": AT,
        }],
        "delivery_events": [{"delivery_id": 1, "state": "delivered", "detail": None, "at": AT},
                            {"delivery_id": 1, "state": "opened", "detail": "dr-lee", "at": AT}],
        "viewer_users": [{"name": "dr-lee", "password_hash": "scrypt$16384$8$1$c2FsdA==$aGFzaA==",
                          "created_at": AT}],
    }


def make_legacy_database(url: str, version: int) -> MetaData:
    """A database as medd of schema ``version`` left it, with :func:`sample_rows`; returns its tables."""
    md = legacy_metadata(version)
    engine = create_engine(url)
    try:
        md.create_all(engine)
        with engine.begin() as conn:
            for table in md.sorted_tables:
                rows = sample_rows(version).get(table.name)
                if rows:
                    conn.execute(table.insert(), rows)
    finally:
        engine.dispose()
    return md
