"""The reading room's worklist: what an object says of its request's priority and the
patient's age, what central said of it when delivering it (the registered centre, how
many images of its study it routes to that viewer), and the reading-room session's idle lock.

Revision ID: 0012_worklist
Revises: 0011_readers
"""
import sqlalchemy as sa
from alembic import op

revision = "0012_worklist"
down_revision = "0011_readers"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("objects", sa.Column("priority", sa.String(16), nullable=True))
    op.add_column("objects", sa.Column("patient_age", sa.String(4), nullable=True))
    op.add_column("objects", sa.Column("centre", sa.String(64), nullable=True))
    op.add_column("objects", sa.Column("study_images", sa.Integer(), nullable=True))
    op.add_column("viewer_sessions", sa.Column("locked_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    raise NotImplementedError("medd's index migrations go forward only: restore the backup taken before upgrading")
