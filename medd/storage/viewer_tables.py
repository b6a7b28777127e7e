"""Tables of the viewer node: reading-room users and their sessions, which
images each user has opened, the packages waiting to go to central, report
drafts and who vouched for each report."""
from __future__ import annotations

from sqlalchemy import Column, DateTime, Index, Integer, String, Table, Text, UniqueConstraint

from medd.storage.schema import UID, metadata

viewer_users = Table(
    "viewer_users",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    # "scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>": the parameters travel with the hash.
    Column("password_hash", String(255), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

viewer_sessions = Table(
    "viewer_sessions",
    metadata,
    Column("id", Integer, primary_key=True),
    # SHA-256 of the session token; the token itself is only ever in the browser.
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("user", String(64), nullable=False, index=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    # Set when the page locked after [reading_room] idle_lock minutes without input: every request
    # of the session is refused until its user types the password again.
    Column("locked_at", DateTime(timezone=True)),
)

# One row per (image, user) the first time the user opened it; later opens update opened_at.
viewer_opened = Table(
    "viewer_opened",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("uid", UID, nullable=False, index=True),
    Column("user", String(64), nullable=False),
    Column("first_opened_at", DateTime(timezone=True), nullable=False),
    Column("opened_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("uid", "user"),
)

# Packages waiting to go to central (bytes in the blob store, by digest).
viewer_outgoing = Table(
    "viewer_outgoing",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("message_id", String(255), nullable=False, unique=True),
    Column("attachment", String(512), nullable=False),
    Column("uid", UID, nullable=False, index=True),
    Column("digest", String(64), nullable=False),
    # waiting -> sent, or refused (central said the package is bad; retrying will not help)
    Column("state", String(12), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("last_error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("sent_at", DateTime(timezone=True)),
)

Index("ix_viewer_outgoing_state", viewer_outgoing.c.state, viewer_outgoing.c.id)

# A radiologist's unsigned report text for a study, saved as they type: one per (study, user).
viewer_report_drafts = Table(
    "viewer_report_drafts",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("study_uid", UID, nullable=False),
    Column("user", String(64), nullable=False),
    Column("text", Text, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("study_uid", "user"),
)

# Who made each report, as the node that delivered it vouched (its Medd-Report-Source): central, or this
# viewer for its own radiologists' reports. A report without a row is vouched for by no one.
viewer_report_sources = Table(
    "viewer_report_sources",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("uid", UID, nullable=False, unique=True),
    Column("source", String(12), nullable=False),  # viewer | centre
    Column("node", String(255), nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
)

# WADO-RS metadata of each stored object (its dicom+json without pixel data), by the blob's digest: written
# at ingest (or the first time it is asked for), so that a series' metadata is one query, not a parse of
# every object. A cache: a missing row is made again from the blob.
object_metadata = Table(
    "object_metadata",
    metadata,
    Column("digest", String(64), primary_key=True),
    Column("document", Text, nullable=False),
)
