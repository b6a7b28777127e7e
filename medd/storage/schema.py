"""The relational index: tables for objects, received packages and status events."""
from __future__ import annotations

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
)

# Every change to a table here, in routing_tables.py, viewer_tables.py or gateway_tables.py comes with a
# migration in medd/storage/migrations/versions (`medd db revision`, see README);
# tests/test_migrations.py fails while the two disagree.
metadata = MetaData()

UID = String(64)

objects = Table(
    "objects",
    metadata,
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
    # The request's priority (RequestedProcedurePriority: STAT, HIGH, ROUTINE, MEDIUM, LOW) and Patient's Age.
    Column("priority", String(16)),
    Column("patient_age", String(4)),
    # What central said when it delivered the object to a viewer: the registered centre it came
    # from and how many images of its study central routes to that viewer (NULL elsewhere).
    Column("centre", String(64)),
    Column("study_images", Integer),
    # Values of (0040,1010), backslash-separated as in DICOM.
    Column("intended_recipients", Text),
    # Overlays: the image the presentation state annotates.
    Column("referenced_image_uid", UID, index=True),
    Column("rows", Integer),
    Column("columns", Integer),
    Column("number_of_frames", Integer),
    Column("digest", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    # Who sent it: the calling AE title, package origin or authenticated peer.
    Column("origin", String(255), nullable=False),
    Column("transport", String(16), nullable=False),
    # The connection it came over (a DICOM association's client IP), where the transport knows it.
    Column("peer", String(255)),
    Column("received_at", DateTime(timezone=True), nullable=False),
)

receipts = Table(
    "receipts",
    metadata,
    Column("id", Integer, primary_key=True),
    # The idempotency key of a package: a resent package is not stored twice.
    Column("message_id", String(255), nullable=False, unique=True),
    Column("attachment", String(512), nullable=False),
    Column("uid", UID, nullable=False, index=True),
    Column("origin", String(255), nullable=False),
    Column("destination", String(255), nullable=False),
    Column("transport", String(16), nullable=False),
    # The connection it came over: client IP, or a TLS client certificate's CN.
    Column("peer", String(255)),
    Column("received_at", DateTime(timezone=True), nullable=False),
)

status_events = Table(
    "status_events",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("message_id", String(255), nullable=False, unique=True),
    Column("event", String(16), nullable=False),
    Column("uid", UID, nullable=False, index=True),
    Column("user", String(255)),
    Column("event_time", String(40)),
    Column("origin", String(255), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
)

# Objects refused because their identifier was already held: a SOP Instance UID
# held for another origin or with other content, or a Message-ID another origin
# (or another attachment) already used. For the administrator: a squatter, or a
# centre that reuses UIDs.
conflicts = Table(
    "conflicts",
    metadata,
    Column("id", Integer, primary_key=True),
    # "uid" or "message-id": which identifier was already held.
    Column("identifier", String(16), nullable=False),
    Column("sop_instance_uid", UID, nullable=False, index=True),
    Column("message_id", String(255)),
    # Who tried, and over what.
    Column("origin", String(255), nullable=False),
    Column("transport", String(16), nullable=False),
    Column("peer", String(255)),
    Column("digest", String(64), nullable=False),
    # Who holds the identifier.
    Column("held_by", String(255), nullable=False),
    Column("reason", Text, nullable=False),
    Column("refused_at", DateTime(timezone=True), nullable=False, index=True),
)

# --- the archive catalogue: where each object's lifetime copy is --------------------------

archive_volumes = Table(
    "archive_volumes",
    metadata,
    Column("id", Integer, primary_key=True),
    # Relative to the archive root: <centre slug>/<modality slug>/vol-NNNNNN.tar
    Column("path", String(512), nullable=False, unique=True),
    # The real names the slugs in the path stand for.
    Column("centre", String(255), nullable=False, index=True),
    Column("modality", String(16), index=True),
    Column("sequence", Integer, nullable=False),
    # open -> closed -> verified (-> offsite); "damaged" when verify found a bad member.
    Column("state", String(16), nullable=False, index=True),
    # Bytes committed: the end of the last catalogued member (of the end marker once closed).
    Column("size", BigInteger, nullable=False),
    Column("members", Integer, nullable=False),
    # SHA-256 of the whole volume file, set when it is closed.
    Column("checksum", String(64)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("closed_at", DateTime(timezone=True)),
    Column("verified_at", DateTime(timezone=True)),
)

archived_objects = Table(
    "archived_objects",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("sop_instance_uid", UID, nullable=False, unique=True),
    Column("digest", String(64), nullable=False, index=True),
    Column("volume_id", Integer, ForeignKey("archive_volumes.id"), nullable=False, index=True),
    Column("member_name", String(255), nullable=False),
    # Where the member's tar header starts, and where its bytes start.
    Column("header_offset", BigInteger, nullable=False),
    Column("data_offset", BigInteger, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("archived_at", DateTime(timezone=True), nullable=False),
    # Read back from the volume and hashed: only then may the working copy go.
    Column("verified_at", DateTime(timezone=True)),
    # The working-store copy was removed by retention (NULL again once restored).
    Column("evicted_at", DateTime(timezone=True)),
)

Index("ix_objects_study_series", objects.c.study_instance_uid, objects.c.series_instance_uid)


# --- the audit trail: one row per access, append-only (PS3.15 A.5 / RFC 3881) --------------

audit = Table(
    "audit",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("at", DateTime(timezone=True), nullable=False, index=True),
    Column("node", String(255), nullable=False),
    # What happened: medd's name for it (store, query, ...), the ATNA EventActionCode (C/R/U/D/E)
    # and the RFC 3881 EventOutcomeIndicator (0, 4, 8, 12).
    Column("event", String(32), nullable=False, index=True),
    Column("action", String(1), nullable=False),
    Column("outcome", Integer, nullable=False),
    # Who: a person or account name, the credential it used, the network address, how it came.
    Column("user", String(255), index=True),
    Column("credential", String(255)),
    Column("peer", String(255)),
    Column("transport", String(16)),
    # What: the patient and the objects, where known.
    Column("patient_id", String(64), index=True),
    Column("study_instance_uid", UID),
    Column("series_instance_uid", UID),
    Column("sop_instance_uid", UID, index=True),
    Column("detail", Text),
)

# How far the audit trail has been sent to each syslog (the audit table itself is never updated).
audit_forwarded = Table(
    "audit_forwarded",
    metadata,
    Column("target", String(255), primary_key=True),
    Column("last_id", Integer, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)


def all_tables() -> MetaData:
    """``metadata`` with every table medd declares: the modules of central's, the
    viewer's and the gateway's tables register theirs on it when imported."""
    import medd.storage.gateway_tables  # noqa: F401
    import medd.storage.routing_tables  # noqa: F401
    import medd.storage.viewer_tables  # noqa: F401

    return metadata
