"""S/MIME certificates of centres and viewers (`medd centres add … --smime-cert FILE`, `medd viewers
add … --smime-cert FILE`): the PEM a package's signature is verified against over SMTP and IMAP.

Revision ID: 0016_smime
Revises: 0015_admin_passwords
"""
import sqlalchemy as sa
from alembic import op

revision = "0016_smime"
down_revision = "0015_admin_passwords"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("centres") as batch:
        batch.add_column(sa.Column("smime_cert", sa.Text()))
    with op.batch_alter_table("viewers") as batch:
        batch.add_column(sa.Column("smime_cert", sa.Text()))


def downgrade() -> None:
    raise NotImplementedError("medd's index migrations go forward only: restore the backup taken before upgrading")
