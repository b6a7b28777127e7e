"""The conflicts table: objects refused because their SOP Instance UID or
Message-ID was already held for another origin or with other content.

Revision ID: 0009_conflicts
Revises: 0008_gateway_results
"""
import sqlalchemy as sa
from alembic import op

revision = "0009_conflicts"
down_revision = "0008_gateway_results"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "conflicts",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("identifier", sa.String(16), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("message_id", sa.String(255)),
        sa.Column("origin", sa.String(255), nullable=False),
        sa.Column("transport", sa.String(16), nullable=False),
        sa.Column("peer", sa.String(255)),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("held_by", sa.String(255), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("refused_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_conflicts_refused_at", "conflicts", ["refused_at"])
    op.create_index("ix_conflicts_sop_instance_uid", "conflicts", ["sop_instance_uid"])


def downgrade() -> None:
    raise NotImplementedError("medd's index migrations go forward only: restore the backup taken before upgrading")
