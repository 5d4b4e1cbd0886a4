"""audit: kinds of signed heads (genesis, head, final, replayed) and signed records (retention, key hand-over)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 13:00:00.000000

Checkpoints written before this migration keep the kind `head-v1` (their signature covers chain, sequence and
hash only); new ones sign their kind and time too. A chain may now hold several signed heads at one sequence
(a periodic `head` and the `final` one), so the unique key includes the kind. `audit_records` holds signed
retention records and key hand-overs and is append-only like the other audit tables (PostgreSQL trigger).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import bastion.db.models

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _postgresql() -> bool:
    return op.get_context().dialect.name == "postgresql"


def upgrade() -> None:
    with op.batch_alter_table("audit_checkpoints") as batch:
        batch.add_column(sa.Column("kind", sa.String(length=16), server_default="head-v1", nullable=False))
        batch.drop_constraint("uq_audit_checkpoints_chain_sequence", type_="unique")
        batch.create_unique_constraint("uq_audit_checkpoints_chain_sequence_kind", ["chain_id", "sequence", "kind"])
    op.create_table(
        "audit_records",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("chain_id", sa.String(length=64), nullable=True),
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("body", sa.JSON(), nullable=False),
        sa.Column("signed_at", bastion.db.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.Column("co_signature", sa.LargeBinary(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_records")),
    )
    op.create_index("ix_audit_records_kind_chain", "audit_records", ["kind", "chain_id"], unique=False)
    if _postgresql():
        op.execute(
            "CREATE TRIGGER audit_records_append_only BEFORE UPDATE OR DELETE ON audit_records "
            "FOR EACH ROW EXECUTE FUNCTION bastion_audit_append_only()"
        )
        op.execute(
            "CREATE TRIGGER audit_records_no_truncate BEFORE TRUNCATE ON audit_records "
            "FOR EACH STATEMENT EXECUTE FUNCTION bastion_audit_append_only()"
        )


def downgrade() -> None:
    if _postgresql():
        op.execute("DROP TRIGGER IF EXISTS audit_records_no_truncate ON audit_records")
        op.execute("DROP TRIGGER IF EXISTS audit_records_append_only ON audit_records")
    op.drop_index("ix_audit_records_kind_chain", table_name="audit_records")
    op.drop_table("audit_records")
    if _postgresql():  # the old unique key cannot hold several kinds at one sequence: keep one row each
        op.execute("SET LOCAL session_replication_role = replica")
        op.execute(
            "DELETE FROM audit_checkpoints a USING audit_checkpoints b "
            "WHERE a.chain_id = b.chain_id AND a.sequence = b.sequence AND a.id > b.id"
        )
        op.execute("SET LOCAL session_replication_role = origin")
    with op.batch_alter_table("audit_checkpoints") as batch:
        batch.drop_constraint("uq_audit_checkpoints_chain_sequence_kind", type_="unique")
        batch.create_unique_constraint("uq_audit_checkpoints_chain_sequence", ["chain_id", "sequence"])
        batch.drop_column("kind")
