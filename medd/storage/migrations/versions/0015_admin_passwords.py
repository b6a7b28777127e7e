"""Administrators may also have a password (scrypt hash) to log in to central's console.

Revision ID: 0015_admin_passwords
Revises: 0014_metadata_cache
"""
import sqlalchemy as sa
from alembic import op

revision = "0015_admin_passwords"
down_revision = "0014_metadata_cache"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("admins", sa.Column("password_hash", sa.String(255), nullable=True))


def downgrade() -> None:
    raise NotImplementedError("medd's index migrations go forward only: restore the backup taken before upgrading")
