"""The audit trail (``audit``, append-only: the database refuses UPDATE and DELETE on it)
and how far it has been sent to each syslog (``audit_forwarded``).

Revision ID: 0010_audit
Revises: 0009_conflicts
"""
import sqlalchemy as sa
from alembic import op

revision = "0010_audit"
down_revision = "0009_conflicts"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("node", sa.String(255), nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("action", sa.String(1), nullable=False),
        sa.Column("outcome", sa.Integer(), nullable=False),
        sa.Column("user", sa.String(255)),
        sa.Column("credential", sa.String(255)),
        sa.Column("peer", sa.String(255)),
        sa.Column("transport", sa.String(16)),
        sa.Column("patient_id", sa.String(64)),
        sa.Column("study_instance_uid", sa.String(64)),
        sa.Column("series_instance_uid", sa.String(64)),
        sa.Column("sop_instance_uid", sa.String(64)),
        sa.Column("detail", sa.Text()),
    )
    for column in ("at", "event", "user", "patient_id", "sop_instance_uid"):
        op.create_index(f"ix_audit_{column}", "audit", [column])
    op.create_table(
        "audit_forwarded",
        sa.Column("target", sa.String(255), primary_key=True),
        sa.Column("last_id", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    # Append-only in the database too, not only in medd's code.
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for verb in ("UPDATE", "DELETE"):
            op.execute(f"CREATE TRIGGER audit_no_{verb.lower()} BEFORE {verb} ON audit "
                       f"BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END")
    elif dialect == "postgresql":
        op.execute("CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS "
                   "$$ BEGIN RAISE EXCEPTION 'the audit trail is append-only'; END $$")
        op.execute("CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit "
                   "FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only()")


def downgrade() -> None:
    raise NotImplementedError("medd's index migrations go forward only: restore the backup taken before upgrading")
