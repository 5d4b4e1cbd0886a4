"""audit: append-only by database roles (bastion_app, bastion_retention, bastion_auditor), not by a setting;
per-tenant content data keys (audit_content_keys) for erasure by crypto-shredding

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 13:10:00.000000

PostgreSQL only (SQLite, the embedded evaluation setup, has no roles; the hash chain still detects tampering).

- Three NOLOGIN group roles, created when missing (roles are cluster-wide, so creation is idempotent and safe
  against a concurrent migration of another database): `bastion_app` (SELECT and INSERT on the audit tables
  but `audit_anchors`, which it only reads; read-write on the tenancy tables), `bastion_retention` (the same
  on the audit tables, SELECT on tenants, EXECUTE on `bastion_audit_prune`), `bastion_auditor` (SELECT on the
  audit tables only). Login roles join them
  (`CREATE ROLE gateway LOGIN PASSWORD ... IN ROLE bastion_app`). Without CREATEROLE the migration stops and
  says which statements a database administrator must run first.
- The trigger no longer opens for a session setting (0002 let any role `SET LOCAL bastion.retention = 'on'`).
  A row of `audit_events` or `audit_anchors` goes only when the statement runs with the table owner's rights,
  i.e. inside `bastion_audit_prune(checkpoint id)` (SECURITY DEFINER, EXECUTE for bastion_retention only), which
  deletes one chain's prefix up to a checkpoint, at least a day old, and records the anchor. The function also
  sets a transaction-local marker, so the owner's own ad-hoc DELETE is refused as a mistake; the marker grants
  nothing to any other role. The owner or a superuser can still drop the trigger: docs/audit.md, threat model.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import bastion.db.models

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROLES = ("bastion_app", "bastion_retention", "bastion_auditor")
_TENANCY = ("tenants", "api_keys", "usage_counters", "limits", "key_usage_counters")

_CREATE_ROLES = """
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['bastion_app', 'bastion_retention', 'bastion_auditor'] LOOP
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION
                WHEN duplicate_object OR unique_violation THEN NULL;  -- created meanwhile by another migration
                WHEN insufficient_privilege THEN
                    RAISE EXCEPTION 'role % is missing and this role may not create it', r
                        USING HINT = 'as a database administrator run: CREATE ROLE bastion_app NOLOGIN; '
                                     'CREATE ROLE bastion_retention NOLOGIN; CREATE ROLE bastion_auditor NOLOGIN;';
            END;
        END IF;
    END LOOP;
END
$$
"""

_TRIGGER = """
CREATE OR REPLACE FUNCTION bastion_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'TRUNCATE'
       AND (TG_OP = 'DELETE' AND TG_TABLE_NAME IN ('audit_events', 'audit_anchors')
            OR TG_OP = 'UPDATE' AND TG_TABLE_NAME = 'audit_anchors')
       AND current_user = (SELECT pg_get_userbyid(c.relowner) FROM pg_class c WHERE c.oid = TG_RELID)
       AND current_setting('bastion.audit_prune', true) = 'on' THEN
        IF TG_OP = 'DELETE' THEN
            RETURN OLD;
        END IF;
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'audit log is append-only: % on % refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END
$$
"""

_PRUNE = """
CREATE OR REPLACE FUNCTION bastion_audit_prune(p_checkpoint_id integer) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    cp audit_checkpoints%ROWTYPE;
    start_seq bigint;
    gone bigint;
BEGIN
    SELECT * INTO cp FROM audit_checkpoints WHERE id = p_checkpoint_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no audit checkpoint %', p_checkpoint_id USING ERRCODE = 'no_data_found';
    END IF;
    SELECT sequence INTO start_seq FROM audit_anchors WHERE chain_id = cp.chain_id;
    IF start_seq IS NOT NULL AND start_seq >= cp.sequence THEN
        RAISE EXCEPTION 'checkpoint % is not past chain %''s anchor', p_checkpoint_id, cp.chain_id
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF EXISTS (SELECT FROM audit_events WHERE chain_id = cp.chain_id AND sequence <= cp.sequence
               AND occurred_at > now() - interval '1 day') THEN
        RAISE EXCEPTION 'events up to checkpoint % are not all a day old', p_checkpoint_id
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM set_config('bastion.audit_prune', 'on', true);
    DELETE FROM audit_events WHERE chain_id = cp.chain_id AND sequence <= cp.sequence;
    GET DIAGNOSTICS gone = ROW_COUNT;
    INSERT INTO audit_anchors (chain_id, sequence, hash, checkpoint_id, deleted, updated_at)
    VALUES (cp.chain_id, cp.sequence, cp.hash, cp.id, gone, now())
    ON CONFLICT (chain_id) DO UPDATE SET sequence = EXCLUDED.sequence, hash = EXCLUDED.hash,
        checkpoint_id = EXCLUDED.checkpoint_id, deleted = audit_anchors.deleted + EXCLUDED.deleted,
        updated_at = EXCLUDED.updated_at;
    PERFORM set_config('bastion.audit_prune', 'off', true);
    RETURN gone;
END
$$
"""

# Every audit table present when this runs (so tables added by other migrations are covered too).
_AUDIT_GRANTS = """
DO $$
DECLARE
    t text;
BEGIN
    FOR t IN SELECT tablename FROM pg_tables WHERE schemaname = current_schema() AND tablename LIKE 'audit\\_%' LOOP
        EXECUTE format('REVOKE ALL ON %I FROM PUBLIC', t);
        EXECUTE format('GRANT SELECT ON %I TO bastion_app, bastion_retention, bastion_auditor', t);
        IF t <> 'audit_anchors' THEN  -- anchors are written by bastion_audit_prune alone
            EXECUTE format('GRANT INSERT ON %I TO bastion_app, bastion_retention', t);
        END IF;
    END LOOP;
END
$$
"""

_OLD_TRIGGER = """
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


def _postgresql() -> bool:
    return op.get_context().dialect.name == "postgresql"


def upgrade() -> None:
    op.create_table(
        "audit_content_keys",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("tenant_id", sa.String(length=32), nullable=False),
        sa.Column("day", sa.String(length=10), nullable=False),
        sa.Column("wrapped", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", bastion.db.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("erased_at", bastion.db.models.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_content_keys")),
    )
    with op.batch_alter_table("audit_content_keys", schema=None) as batch_op:
        batch_op.create_index("ix_audit_content_keys_tenant_day", ["tenant_id", "day"], unique=False)
    if not _postgresql():
        return
    op.execute(_CREATE_ROLES)
    op.execute(_TRIGGER)
    op.execute(_PRUNE)
    op.execute("REVOKE ALL ON FUNCTION bastion_audit_prune(integer) FROM PUBLIC")
    op.execute("GRANT EXECUTE ON FUNCTION bastion_audit_prune(integer) TO bastion_retention")
    op.execute(_AUDIT_GRANTS)
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {', '.join(_TENANCY)} TO bastion_app")
    op.execute("GRANT SELECT ON tenants TO bastion_retention")  # per-tenant retention days
    # verify checks each anchor against the tenant's retention policy (0005's signed records): two columns only.
    op.execute("GRANT SELECT (id, retention_days) ON tenants TO bastion_auditor")
    # Erasure (crypto-shredding) empties a tenant's data keys: retention's job, never the app's.
    op.execute("GRANT UPDATE (wrapped, erased_at) ON audit_content_keys TO bastion_retention")
    op.execute("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO bastion_app, bastion_retention")


def downgrade() -> None:
    with op.batch_alter_table("audit_content_keys", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_content_keys_tenant_day")
    op.drop_table("audit_content_keys")
    if not _postgresql():
        return
    op.execute(_OLD_TRIGGER)
    op.execute("DROP FUNCTION IF EXISTS bastion_audit_prune(integer)")
    # The roles are cluster-wide (other databases may use them): only this database's grants go.
    op.execute("REVOKE ALL ON ALL TABLES IN SCHEMA public FROM bastion_app, bastion_retention, bastion_auditor")
    op.execute("REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM bastion_app, bastion_retention")
