"""Tables of central's routing: the directory of viewers and imaging centres,
routing rules, quarantine with its corrections, and the outbox with its
tracking history."""
from __future__ import annotations

from sqlalchemy import Column, DateTime, ForeignKey, Index, Integer, String, Table, Text, UniqueConstraint

from medd.storage.schema import UID, metadata

centres = Table(
    "centres",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    # Its credentials (`medd centres add --token / --client-cert`): the SHA-256 of its bearer
    # token and of the TLS client certificate issued to it, if any.
    Column("token_hash", String(64)),
    Column("client_cert_sha256", String(64)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # The PEM its S/MIME signatures are verified against (`--smime-cert FILE`), if any.
    Column("smime_cert", Text),
)

# How a sender is recognised as a centre: calling AE title or package origin; "network"
# rows (CIDR) restrict where its AE titles count (plain DIMSE from elsewhere names no centre).
centre_aliases = Table(
    "centre_aliases",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("centre_id", Integer, ForeignKey("centres.id", ondelete="CASCADE"), nullable=False),
    Column("kind", String(8), nullable=False),  # "ae" | "address" | "network"
    Column("value", String(255), nullable=False),
    UniqueConstraint("kind", "value"),
)

viewers = Table(
    "viewers",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("address", String(255), nullable=False, unique=True),
    Column("mode", String(8), nullable=False),  # "push" | "pull"
    Column("push_url", String(512)),
    Column("token_hash", String(64), nullable=False, unique=True),
    # SHA-256 of the client certificate issued for the TLS transport, if any.
    Column("client_cert_sha256", String(64)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # The PEM its S/MIME signatures are verified against, and packages to it encrypted to, if any.
    Column("smime_cert", Text),
)

authorisations = Table(
    "authorisations",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("viewer_id", Integer, ForeignKey("viewers.id", ondelete="CASCADE"), nullable=False),
    Column("centre_id", Integer, ForeignKey("centres.id", ondelete="CASCADE"), nullable=False),
    Column("modality", String(16), nullable=False, default=""),  # "" = every modality
    UniqueConstraint("viewer_id", "centre_id", "modality"),
)

admins = Table(
    "admins",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("password_hash", String(255)),  # scrypt (medd.viewer.users), for the console; `medd admins password`
)

# Read credentials (`medd readers add NAME --scope read`): DICOMweb QIDO-RS and WADO-RS on central.
# A reader holds a bearer token (its SHA-256), a TLS client certificate (its SHA-256), or both.
readers = Table(
    "readers",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("scope", String(16), nullable=False),  # "read"
    Column("token_hash", String(64), unique=True),
    Column("client_cert_sha256", String(64), unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

routing_rules = Table(
    "routing_rules",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("centre", String(64), nullable=False, default=""),  # "" = any centre
    Column("modality", String(16), nullable=False, default=""),  # "" = any modality
    Column("object_type", String(16), nullable=False, default=""),  # "" = any type
    Column("destination", String(255), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# One row per object once the router has decided about it (crash-safe: the
# router processes objects that have no row here).
routing_decisions = Table(
    "routing_decisions",
    metadata,
    Column("uid", UID, primary_key=True),
    Column("centre", String(64)),
    Column("outcome", String(16), nullable=False),  # "routed" | "quarantined" | "attached"
    Column("decided_at", DateTime(timezone=True), nullable=False),
)

quarantine = Table(
    "quarantine",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("uid", UID, nullable=False, index=True),
    Column("destination", String(255)),
    Column("reason", Text, nullable=False),
    Column("state", String(12), nullable=False),  # "held" | "released" | "rejected"
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("resolved_at", DateTime(timezone=True)),
)

corrections = Table(
    "corrections",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("quarantine_id", Integer, ForeignKey("quarantine.id"), nullable=False),
    Column("admin", String(64), nullable=False),
    Column("action", String(8), nullable=False),  # "route" | "reject"
    Column("old_route", String(255)),
    Column("new_route", String(255)),
    Column("reason", Text),
    Column("at", DateTime(timezone=True), nullable=False),
)

deliveries = Table(
    "deliveries",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("uid", UID, nullable=False, index=True),
    Column("destination", String(255), nullable=False, index=True),
    # queued -> sent -> delivered -> opened, or failed (retrying while next_attempt_at is set)
    Column("state", String(12), nullable=False, index=True),
    Column("message_id", String(255), nullable=False, unique=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", DateTime(timezone=True)),
    Column("last_error", Text),
    Column("opened_by", String(255)),
    # A status package to a centre (JSON of its status part) rather than a stored object:
    # ``uid`` is then the status's own id, the object it is about is inside.
    Column("status", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("uid", "destination"),
)

delivery_events = Table(
    "delivery_events",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("delivery_id", Integer, ForeignKey("deliveries.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("state", String(12), nullable=False),
    Column("detail", Text),
    Column("at", DateTime(timezone=True), nullable=False),
)

# A unique index rather than a constraint: SQLite adds one without rebuilding the table
# (a rebuild of centres would cascade to its aliases and authorisations).
Index("ux_centres_token_hash", centres.c.token_hash, unique=True)

# A viewer's waiting deliveries (GET /outbox, the push head of line) without
# scanning everything it ever received.
Index("ix_deliveries_destination_state", deliveries.c.destination, deliveries.c.state, deliveries.c.id)
