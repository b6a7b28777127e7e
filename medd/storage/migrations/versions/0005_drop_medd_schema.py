"""Alembic's alembic_version records the schema from here on: the table medd_schema(version),
which medd kept before, goes.

A medd of schema version 4 or older that is started on the database afterwards
still refuses it (it finds tables but no version), rather than running on a
schema it does not know.

Revision ID: 0005_drop_medd_schema
Revises: 0004_viewers_client_cert
"""
from alembic import op

revision = "0005_drop_medd_schema"
down_revision = "0004_viewers_client_cert"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_table("medd_schema")


def downgrade() -> None:
    raise NotImplementedError("medd's index migrations go forward only: restore the backup taken before upgrading")
