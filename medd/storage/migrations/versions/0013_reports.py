"""Report drafts (one per study and reading-room user, saved as the radiologist types) and report
sources (who vouched for each report a viewer holds). The reports a viewer's
own reading room made before (transport ``local``, in the node's own name) are
vouched for by that viewer; any other report it holds is vouched for by no one
until central sends it again.

Revision ID: 0013_reports
Revises: 0012_worklist
"""
import sqlalchemy as sa
from alembic import op

revision = "0013_reports"
down_revision = "0012_worklist"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "viewer_report_drafts",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("user", sa.String(64), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("study_uid", "user"),
    )
    op.create_table(
        "viewer_report_sources",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("uid", sa.String(64), nullable=False, unique=True),
        sa.Column("source", sa.String(12), nullable=False),
        sa.Column("node", sa.String(255), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.execute(
        "INSERT INTO viewer_report_sources (uid, source, node, recorded_at) "
        "SELECT sop_instance_uid, 'viewer', origin, received_at FROM objects "
        "WHERE object_type = 'report' AND transport = 'local'"
    )


def downgrade() -> None:
    raise NotImplementedError("medd's index migrations go forward only: restore the backup taken before upgrading")
