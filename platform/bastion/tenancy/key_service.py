"""API key administration: create (the secret is returned once), list, revoke, rotate with a grace period.

Every change is published through an optional `notify` callback so gateways can drop cached keys at once; their
cache TTL (≤ 1 s) is the guarantee, the notification only makes it faster.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bastion.db.models import ApiKey, Tenant, utcnow
from bastion.tenancy import key_material
from bastion.tenancy.tenants import TenancyError, find_tenant
from bastion.tenancy.views import CreatedKey, KeyInfo

Notify = Callable[[str], Awaitable[None]]  # called with the changed key's prefix


async def _find_key(session: AsyncSession, ref: str) -> ApiKey:
    """A key by id or by its visible prefix (never by secret)."""
    row = (await session.execute(select(ApiKey).where((ApiKey.id == ref) | (ApiKey.prefix == ref)))).scalars().first()
    if row is None:
        raise TenancyError(f"no API key {ref!r}")
    return row


def _check_scopes(scopes: Sequence[str]) -> list[str]:
    unknown = sorted(set(scopes) - set(key_material.SCOPES))
    if unknown:
        raise TenancyError(f"unknown scope(s) {', '.join(unknown)}; known: {', '.join(key_material.SCOPES)}")
    if not scopes:
        raise TenancyError("a key needs at least one scope")
    return sorted(set(scopes))


class KeyService:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], pepper: bytes, notify: Notify | None = None) -> None:
        self._sessions = sessions
        self._pepper = pepper
        self._notify = notify

    def _new_row(self, tenant_id: str, name: str, scopes: list[str], expires_at: datetime | None):
        material = key_material.generate()
        row = ApiKey(
            tenant_id=tenant_id,
            name=name,
            prefix=material.prefix,
            secret_hash=key_material.hash_secret(self._pepper, material.secret),
            scopes=scopes,
            expires_at=expires_at,
        )
        return row, material.token

    async def create(
        self,
        tenant: str,
        *,
        name: str = "",
        scopes: Sequence[str] = ("inference",),
        expires_at: datetime | None = None,
    ) -> CreatedKey:
        checked = _check_scopes(scopes)
        if expires_at is not None and expires_at.tzinfo is None:
            raise TenancyError("expires_at needs a time zone")
        async with self._sessions() as session:
            owner = await find_tenant(session, tenant)
            row, token = self._new_row(owner.id, name, checked, expires_at)
            session.add(row)
            await session.commit()
            return CreatedKey(info=KeyInfo.of(row), token=token)

    async def list(self, tenant: str | None = None) -> list[KeyInfo]:
        async with self._sessions() as session:
            query = select(ApiKey).order_by(ApiKey.created_at)
            if tenant is not None:
                owner = await find_tenant(session, tenant)
                query = query.where(ApiKey.tenant_id == owner.id)
            return [KeyInfo.of(r) for r in (await session.execute(query)).scalars().all()]

    async def revoke(self, ref: str) -> KeyInfo:
        async with self._sessions() as session:
            row = await _find_key(session, ref)
            if row.revoked_at is None:
                row.revoked_at = utcnow()
            await session.commit()
            info = KeyInfo.of(row)
        await self._changed(info.prefix)
        return info

    async def rotate(self, ref: str, *, grace: timedelta = timedelta(hours=24)) -> CreatedKey:
        """A new key with the same tenant, name, scopes and expiry; the old one keeps working for `grace`."""
        if grace < timedelta(0):
            raise TenancyError("the grace period cannot be negative")
        async with self._sessions() as session:
            old = await _find_key(session, ref)
            now = utcnow()
            if old.revoked_at is not None or (old.expires_at is not None and old.expires_at <= now):
                raise TenancyError(f"key {old.prefix} is revoked or expired; create a new one instead")
            tenant = await session.get(Tenant, old.tenant_id)
            assert tenant is not None
            row, token = self._new_row(old.tenant_id, old.name, list(old.scopes), old.expires_at)
            session.add(row)
            await session.flush()
            old.replaced_by = row.id
            until = now + grace
            old.expires_at = until if old.expires_at is None else min(old.expires_at, until)
            await session.commit()
            created = CreatedKey(info=KeyInfo.of(row), token=token)
            old_prefix = old.prefix
        await self._changed(old_prefix)
        return created

    async def tenant_changed(self, tenant_id: str) -> None:
        """A change to the tenant every key carries (its weight, status): each gateway drops the tenant's keys
        from its cache, so the next request reads the tenant again (the cache's TTL bounds the delay anyway)."""
        if self._notify is None:
            return
        async with self._sessions() as session:
            prefixes = (await session.execute(select(ApiKey.prefix).where(ApiKey.tenant_id == tenant_id))).scalars()
            for prefix in list(prefixes):
                await self._notify(prefix)

    async def _changed(self, prefix: str) -> None:
        if self._notify is not None:
            await self._notify(prefix)
