"""Retention: per tenant, in whole days, deleting only chain prefixes that a signed checkpoint covers.

For each of the tenant's chains, the newest signed checkpoint whose events are all older than the cutoff
becomes the chain's anchor; the rows up to it are deleted in the same transaction (on PostgreSQL by
`bastion_audit_prune(checkpoint id)`, the one path the append-only trigger lets through, which only the
`bastion_retention` role may execute: migration 0006), and the deletion is audited as a `retention` event.
The same transaction writes a signed retention record (policy, cut-off, range, count, actor; prunes.py), without
which verification refuses the anchor. Verification then starts at the anchor, so the chain still verifies. A
chain that fails verification up to that checkpoint is left alone: retention never deletes evidence of tampering.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from bastion.audit.errors import AuditError
from bastion.audit.events import RetentionEvent, utcnow
from bastion.audit.prunes import retention_record
from bastion.audit.signing import GENESIS_KIND, Signer
from bastion.audit.store import ANCHORS, CHECKPOINTS, EVENTS, insert_records
from bastion.audit.verify import verify_chain
from bastion.db.models import Tenant


@dataclass(frozen=True)
class RetentionResult:
    tenant_id: str | None
    chain_id: str
    up_to_sequence: int
    deleted: int
    checkpoint_hash: str
    days: int
    cutoff: datetime

    def event(self, actor: str) -> RetentionEvent:
        return RetentionEvent(
            tenant_id=self.tenant_id,
            actor=actor,
            chain_id=self.chain_id,
            up_to_sequence=self.up_to_sequence,
            checkpoint_hash=self.checkpoint_hash,
            deleted=self.deleted,
            days=self.days,
            cutoff=self.cutoff,
        )


async def tenant_policies(engine: AsyncEngine, default_days: int | None) -> dict[str | None, int]:
    """Days per tenant: the tenant's own setting, else the platform default; None is the system chain."""
    async with engine.connect() as conn:
        tenants = (await conn.execute(select(Tenant.id, Tenant.retention_days))).all()
        in_log = set((await conn.execute(select(EVENTS.c.tenant_id).distinct())).scalars())
    policies: dict[str | None, int] = {t.id: t.retention_days for t in tenants if t.retention_days}
    if default_days:
        for tenant_id in in_log:
            policies.setdefault(tenant_id, default_days)
    return policies


async def apply_retention(
    engine: AsyncEngine,
    signer: Signer,
    policies: dict[str | None, int],
    now: datetime | None = None,
    *,
    actor: str = "retention",
) -> list[RetentionResult]:
    """Delete what each policy allows, with a signed record each; the caller audits each result too."""
    now = now or utcnow()
    results = []
    for tenant_id, days in sorted(policies.items(), key=lambda item: item[0] or ""):
        if days < 1:
            raise AuditError(f"retention for tenant {tenant_id}: days must be at least 1")
        cutoff = now - timedelta(days=days)
        tenant_match = EVENTS.c.tenant_id.is_(None) if tenant_id is None else EVENTS.c.tenant_id == tenant_id
        async with engine.connect() as conn:
            chains = (await conn.execute(select(EVENTS.c.chain_id).where(tenant_match).distinct())).scalars().all()
        for chain_id in sorted(chains):
            result = await _chain(engine, signer, tenant_id, chain_id, days, cutoff, now, actor)
            if result is not None:
                results.append(result)
    return results


async def _target(engine: AsyncEngine, signer: Signer, chain_id: str, cutoff: datetime) -> tuple[Any, Any]:
    """The anchor now, and the newest signed checkpoint past it whose events are all older than cutoff."""
    async with engine.connect() as conn:
        anchor = (await conn.execute(select(ANCHORS).where(ANCHORS.c.chain_id == chain_id))).first()
        start = anchor.sequence if anchor else 0
        young = select(func.min(EVENTS.c.sequence)).where(
            EVENTS.c.chain_id == chain_id, EVENTS.c.sequence > start, EVENTS.c.occurred_at >= cutoff
        )
        first_young = (await conn.execute(young)).scalar_one_or_none()
        query = select(CHECKPOINTS).where(
            CHECKPOINTS.c.chain_id == chain_id, CHECKPOINTS.c.sequence > start, CHECKPOINTS.c.kind != GENESIS_KIND
        )
        if first_young is not None:
            query = query.where(CHECKPOINTS.c.sequence < first_young)
        candidates = (await conn.execute(query.order_by(CHECKPOINTS.c.sequence.desc()))).all()
    for cp in candidates:
        if signer.verifier.verify_head(cp):
            return anchor, cp
    return anchor, None


async def _chain(
    engine: AsyncEngine,
    signer: Signer,
    tenant_id: str | None,
    chain_id: str,
    days: int,
    cutoff: datetime,
    now: datetime,
    actor: str,
) -> RetentionResult | None:
    anchor, cp = await _target(engine, signer, chain_id, cutoff)
    if cp is None:
        return None
    checked = await verify_chain(engine, signer.verifier, chain_id, until=cp.sequence)
    if checked.problem is not None:
        raise AuditError(f"retention refused: {checked.problem}")
    async with engine.begin() as conn:
        postgresql = conn.dialect.name == "postgresql"
        prefix = (EVENTS.c.chain_id == chain_id) & (EVENTS.c.sequence <= cp.sequence)
        last_at = (await conn.execute(select(func.max(EVENTS.c.occurred_at)).where(prefix))).scalar_one()
        if postgresql:  # the function deletes and moves the anchor with the owner's rights (migration 0006)
            prune = text("SELECT bastion_audit_prune(:checkpoint)")
            deleted = int((await conn.execute(prune, {"checkpoint": cp.id})).scalar_one())
        else:
            deleted = int((await conn.execute(delete(EVENTS).where(prefix))).rowcount or 0)
        record = retention_record(
            signer,
            chain_id=chain_id,
            tenant_id=tenant_id,
            days=days,
            cutoff=cutoff,
            pruned_at=now,
            from_sequence=(anchor.sequence if anchor else 0) + 1,
            to_sequence=cp.sequence,
            deleted=deleted,
            total_deleted=(anchor.deleted if anchor else 0) + deleted,
            last_deleted_at=last_at or cutoff,
            checkpoint_hash=cp.hash,
            actor=actor,
        )
        await insert_records(conn, [record])
        if not postgresql:
            values = {"sequence": cp.sequence, "hash": cp.hash, "checkpoint_id": cp.id, "updated_at": utcnow()}
            if anchor is None:
                await conn.execute(insert(ANCHORS).values(chain_id=chain_id, deleted=deleted, **values))
            else:
                await conn.execute(
                    update(ANCHORS)
                    .where(ANCHORS.c.chain_id == chain_id)
                    .values(deleted=anchor.deleted + deleted, **values)
                )
    return RetentionResult(tenant_id, chain_id, cp.sequence, deleted, cp.hash, days, cutoff)
