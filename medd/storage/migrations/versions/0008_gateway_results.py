"""The gateway's queue of overlays and reports for the centre's PACS
([gateway] results_to).

Revision ID: 0008_gateway_results
Revises: 0007_centre_credentials
"""
import sqlalchemy as sa
from alembic import op

revision = "0008_gateway_results"
down_revision = "0007_centre_credentials"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "gateway_results",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("uid", sa.String(64), nullable=False, unique=True),
        sa.Column("object_type", sa.String(16), nullable=False),
        sa.Column("sop_class_uid", sa.String(64)),
        sa.Column("transfer_syntax_uid", sa.String(64)),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(12), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.Text()),
        sa.Column("last_attempt_at", sa.DateTime(timezone=True)),
        sa.Column("queued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stored_at", sa.DateTime(timezone=True)),
    )
    op.create_index("ix_gateway_results_state", "gateway_results", ["state", "id"])


def downgrade() -> None:
    raise NotImplementedError("medd's index migrations go forward only: restore the backup taken before upgrading")
