"""Viewers keep the SHA-256 of the TLS client certificate issued to them
(`medd viewers add --client-cert`). Schema version 4.

Revision ID: 0004_viewers_client_cert
Revises: 0003_deliveries_outbox_index
"""
import sqlalchemy as sa
from alembic import op

revision = "0004_viewers_client_cert"
down_revision = "0003_deliveries_outbox_index"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("viewers", sa.Column("client_cert_sha256", sa.String(64), nullable=True))


def downgrade() -> None:
    raise NotImplementedError("medd's index migrations go forward only: restore the backup taken before upgrading")
