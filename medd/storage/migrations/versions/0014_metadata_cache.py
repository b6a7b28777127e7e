"""The viewer's metadata cache: each stored object's WADO-RS metadata (dicom+json), by blob digest.

Revision ID: 0014_metadata_cache
Revises: 0013_reports
"""
import sqlalchemy as sa
from alembic import op

revision = "0014_metadata_cache"
down_revision = "0013_reports"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "object_metadata",
        sa.Column("digest", sa.String(64), primary_key=True),
        sa.Column("document", sa.Text(), nullable=False),
    )


def downgrade() -> None:
    raise NotImplementedError("medd's index migrations go forward only: restore the backup taken before upgrading")
