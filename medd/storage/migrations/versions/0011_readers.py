"""The readers table: read credentials (a token or a client certificate) for
DICOMweb QIDO-RS and WADO-RS on central (`medd readers add`).

Revision ID: 0011_readers
Revises: 0009_conflicts
"""
import sqlalchemy as sa
from alembic import op

revision = "0011_readers"
down_revision = "0010_audit"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "readers",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("token_hash", sa.String(64), unique=True),
        sa.Column("client_cert_sha256", sa.String(64), unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    raise NotImplementedError("medd's index migrations go forward only: restore the backup taken before upgrading")
