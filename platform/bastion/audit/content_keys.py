"""Per-tenant data keys for stored content, and erasure by destroying them (crypto-shredding).

A tenant's content of one UTC day is encrypted with that day's data key; the key is stored only wrapped by the
master content key (`audit_content_keys`). Erasing (`bastion audit erase --tenant T [--before DATE]`) empties
the wrapped keys of the days before DATE (or all of them): their content can no longer be decrypted by anyone,
while every row, and so every chain and checkpoint, stays exactly as it was and still verifies.

Limits, said where they apply: a writer caches a key for `ttl_s` (content it encrypts in that window after an
erasure of today is unreadable too: it errs toward erasure); PostgreSQL keeps a dead copy of an emptied row
until VACUUM, and backups keep theirs until they expire (each still needs the master key).
"""

from __future__ import annotations

import contextlib
import logging
import time
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from bastion.audit.crypto import (
    ContentCipher,
    data_key_id,
    decrypt_content,
    decrypt_with,
    new_data_key,
    unwrap_key,
    wrap_key,
)
from bastion.audit.errors import AuditError, AuditKeyError
from bastion.audit.events import utcnow
from bastion.db.models import AuditContentKey

log = logging.getLogger(__name__)
KEYS = AuditContentKey.__table__


class ContentErased(AuditError):
    """The content's data key was destroyed: it is gone for good (the row itself still verifies)."""


def day_of(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%d")


class TenantKeys:
    """The writer's keyring: today's data key per tenant, created on first use, cached for `ttl_s`."""

    def __init__(self, engine: AsyncEngine, master: ContentCipher, ttl_s: float = 30.0, retry_s: float = 5.0) -> None:
        self.engine, self.master, self.ttl_s, self.retry_s = engine, master, ttl_s, retry_s
        self._cache: dict[tuple[str, str], tuple[str, bytes, float]] = {}
        self._retry_at = 0.0  # after a failure, no new lookup before this: an outage must not stall the writer

    def cached(self, tenant_id: str, when: datetime) -> tuple[str, bytes] | None:
        hit = self._cache.get((tenant_id, day_of(when)))
        if hit is None or time.monotonic() - hit[2] > self.ttl_s:
            return None
        return hit[0], hit[1]

    async def current(self, tenant_id: str, when: datetime) -> tuple[str, bytes] | None:
        """(key id, data key) for the tenant's content of that day; None when the database cannot say (the
        content is then dropped, the event itself still recorded)."""
        hit = self.cached(tenant_id, when)
        if hit is not None or time.monotonic() < self._retry_at:
            return hit
        day = day_of(when)
        try:
            async with self.engine.begin() as conn:
                query = (
                    select(KEYS.c.id, KEYS.c.wrapped)
                    .where(KEYS.c.tenant_id == tenant_id, KEYS.c.day == day, KEYS.c.wrapped.is_not(None))
                    .order_by(KEYS.c.created_at.desc())
                )
                found = None
                for row in (await conn.execute(query)).all():  # a key wrapped by an earlier master key is skipped
                    with contextlib.suppress(AuditKeyError):
                        found = row.id, unwrap_key(self.master, row.id, tenant_id, bytes(row.wrapped))
                        break
                if found is not None:
                    key_id, key = found
                else:
                    key_id, key = new_data_key()
                    wrapped = wrap_key(self.master, key_id, tenant_id, key)
                    await conn.execute(KEYS.insert().values(id=key_id, tenant_id=tenant_id, day=day, wrapped=wrapped))
        except Exception as exc:
            log.warning("audit: no data key for tenant %s (%s); content not stored", tenant_id, type(exc).__name__)
            self._retry_at = time.monotonic() + self.retry_s
            return None
        self._cache[(tenant_id, day)] = (key_id, key, time.monotonic())
        return key_id, key


async def decrypt_row(engine: AsyncEngine, row: dict[str, Any], master: ContentCipher) -> Any:
    """An auditor's decryption of one row's content (None when it has none); ContentErased once erased."""
    blob = row.get("content")
    if not blob:
        return None
    blob = bytes(blob)
    key_id = data_key_id(blob)
    if key_id is None:
        return decrypt_content(row, master)
    async with engine.connect() as conn:
        key = (await conn.execute(select(KEYS).where(KEYS.c.id == key_id))).first()
    where = f"{row['chain_id']}#{row['sequence']}"
    if key is None:
        raise AuditError(f"content of {where}: its data key {key_id} is unknown")
    if key.wrapped is None:
        erased = key.erased_at.strftime("%Y-%m-%d %H:%M UTC") if key.erased_at else "?"
        raise ContentErased(f"content of {where}: erased (tenant {key.tenant_id}'s data key destroyed {erased})")
    data_key = unwrap_key(master, key.id, key.tenant_id, bytes(key.wrapped))
    return decrypt_with(data_key, blob, row["chain_id"], int(row["sequence"]))


async def erase(engine: AsyncEngine, tenant_id: str, before: date | None = None) -> int:
    """Destroy the tenant's data keys (those of days before `before`, or all): how many were destroyed."""
    where = [KEYS.c.tenant_id == tenant_id, KEYS.c.wrapped.is_not(None)]
    if before is not None:
        where.append(KEYS.c.day < before.isoformat())
    async with engine.begin() as conn:
        done = await conn.execute(update(KEYS).where(*where).values(wrapped=None, erased_at=utcnow()))
    return int(done.rowcount or 0)
