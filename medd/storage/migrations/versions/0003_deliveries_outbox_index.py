"""Index deliveries by (destination, state, id): a viewer's waiting deliveries (GET /outbox, the
push head of line) without scanning everything it ever received. Schema version 3.

Revision ID: 0003_deliveries_outbox_index
Revises: 0002_baseline
"""
from alembic import op

revision = "0003_deliveries_outbox_index"
down_revision = "0002_baseline"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_deliveries_destination_state", "deliveries", ["destination", "state", "id"])


def downgrade() -> None:
    raise NotImplementedError("medd's index migrations go forward only: restore the backup taken before upgrading")
