"""audit: anchors table; append-only triggers on PostgreSQL

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 14:50:00.000000

On PostgreSQL a trigger refuses UPDATE, DELETE and TRUNCATE on the audit tables. The retention procedure is the
one exception: inside its transaction it runs `SET LOCAL bastion.retention = 'on'`, which lets it DELETE audit
events and replace a chain's anchor; the setting ends with the transaction. SQLite has no such guard (the
embedded default is a single-machine evaluation setup); the hash chain still detects tampering there.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import bastion.db.models

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_FUNCTION = """
CREATE OR REPLACE FUNCTION bastion_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND TG_TABLE_NAME IN ('audit_events', 'audit_anchors')
       AND current_setting('bastion.retention', true) = 'on' THEN
        RETURN OLD;
    END IF;
    IF TG_OP = 'UPDATE' AND TG_TABLE_NAME = 'audit_anchors'
       AND current_setting('bastion.retention', true) = 'on' THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'audit log is append-only: % on % refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END
$$
"""
_TABLES = ("audit_events", "audit_checkpoints", "audit_anchors")


def _postgresql() -> bool:
    return op.get_context().dialect.name == "postgresql"


def upgrade() -> None:
    op.create_table(
        "audit_anchors",
        sa.Column("chain_id", sa.String(length=64), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("checkpoint_id", sa.Integer(), nullable=False),
        sa.Column("deleted", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", bastion.db.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("chain_id", name=op.f("pk_audit_anchors")),
    )
    if _postgresql():
        op.execute(_FUNCTION)
        for table in _TABLES:
            op.execute(
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION bastion_audit_append_only()"
            )
            op.execute(
                f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION bastion_audit_append_only()"
            )


def downgrade() -> None:
    if _postgresql():
        for table in _TABLES:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}")
            op.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
        op.execute("DROP FUNCTION IF EXISTS bastion_audit_append_only()")
    op.drop_table("audit_anchors")
