"""Tables of the gateway node: the objects waiting to be forwarded to central,
and the receipts central sent back about them."""
from __future__ import annotations

from sqlalchemy import BigInteger, Column, DateTime, Index, Integer, String, Table, Text

from medd.storage.schema import UID, metadata

# One row per object received from the centre's modalities, in arrival order:
# the store-and-forward queue. The object's bytes are in the blob store.
gateway_forwarding = Table(
    "gateway_forwarding",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("uid", UID, nullable=False, unique=True),
    Column("study_uid", UID),
    # Chosen once, when queued: every resend carries it, so central stores the object once.
    Column("message_id", String(255), nullable=False, unique=True),
    Column("digest", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    # waiting -> sent, or refused (central said it is bad) / lost (its bytes are gone)
    Column("state", String(12), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("last_error", Text),
    Column("last_attempt_at", DateTime(timezone=True)),
    Column("queued_at", DateTime(timezone=True), nullable=False),
    Column("sent_at", DateTime(timezone=True)),
)

Index("ix_gateway_forwarding_state", gateway_forwarding.c.state, gateway_forwarding.c.id)

# What central said about an object (status packages pulled from its outbox):
# received, routed, quarantined, delivered, opened, reported.
gateway_receipts = Table(
    "gateway_receipts",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("message_id", String(255), nullable=False, unique=True),
    Column("uid", UID, nullable=False, index=True),
    Column("event", String(16), nullable=False),
    Column("viewer", String(255)),
    Column("user", String(255)),
    Column("event_time", String(40)),
    Column("reason", Text),
    Column("received_at", DateTime(timezone=True), nullable=False),
)

# Overlays (GSPS) and reports (SR) central sent back, for the centre's PACS
# ([gateway] results_to), one row each in arrival order. The bytes are in the blob store.
gateway_results = Table(
    "gateway_results",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("uid", UID, nullable=False, unique=True),
    Column("object_type", String(16), nullable=False),
    Column("sop_class_uid", UID),
    Column("transfer_syntax_uid", UID),
    Column("digest", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    # waiting -> stored, or refused (a C-STORE failure status), skipped (a text
    # report: C-STORE cannot carry it), lost (its bytes are gone); last_error says why
    Column("state", String(12), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("last_error", Text),
    Column("last_attempt_at", DateTime(timezone=True)),
    Column("queued_at", DateTime(timezone=True), nullable=False),
    Column("stored_at", DateTime(timezone=True)),
)

Index("ix_gateway_results_state", gateway_results.c.state, gateway_results.c.id)
