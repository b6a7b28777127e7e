"""The gateway's tables: its store-and-forward queue and the receipts central
sends back. Schema version 6.

Revision ID: 0006_gateway_forwarding
Revises: 0005_drop_medd_schema
"""
import sqlalchemy as sa
from alembic import op

revision = "0006_gateway_forwarding"
down_revision = "0005_drop_medd_schema"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "gateway_forwarding",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("uid", sa.String(64), nullable=False, unique=True),
        sa.Column("study_uid", sa.String(64)),
        sa.Column("message_id", sa.String(255), nullable=False, unique=True),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(12), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.Text()),
        sa.Column("last_attempt_at", sa.DateTime(timezone=True)),
        sa.Column("queued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True)),
    )
    op.create_index("ix_gateway_forwarding_state", "gateway_forwarding", ["state", "id"])
    op.create_table(
        "gateway_receipts",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("message_id", sa.String(255), nullable=False, unique=True),
        sa.Column("uid", sa.String(64), nullable=False),
        sa.Column("event", sa.String(16), nullable=False),
        sa.Column("viewer", sa.String(255)),
        sa.Column("user", sa.String(255)),
        sa.Column("event_time", sa.String(40)),
        sa.Column("reason", sa.Text()),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_gateway_receipts_uid", "gateway_receipts", ["uid"])


def downgrade() -> None:
    raise NotImplementedError("medd's index migrations go forward only: restore the backup taken before upgrading")
