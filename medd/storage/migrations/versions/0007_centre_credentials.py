"""Centres get credentials (the hashes of a bearer token and of a TLS client
certificate), an object keeps the peer address it came from (plain DIMSE:
the client IP, checked against a centre's networks), and an outbox row may
carry a status package to a centre instead of a stored object.

Revision ID: 0007_centre_credentials
Revises: 0006_gateway_forwarding
"""
import sqlalchemy as sa
from alembic import op

revision = "0007_centre_credentials"
down_revision = "0006_gateway_forwarding"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN and CREATE INDEX: on SQLite a batch rebuild of centres would cascade
    # (ON DELETE CASCADE) to its aliases and authorisations.
    op.add_column("centres", sa.Column("token_hash", sa.String(length=64), nullable=True))
    op.add_column("centres", sa.Column("client_cert_sha256", sa.String(length=64), nullable=True))
    op.create_index("ux_centres_token_hash", "centres", ["token_hash"], unique=True)
    op.add_column("deliveries", sa.Column("status", sa.Text(), nullable=True))
    op.add_column("objects", sa.Column("peer", sa.String(length=255), nullable=True))


def downgrade() -> None:
    raise NotImplementedError("medd's index migrations go forward only: restore the backup taken before upgrading")
