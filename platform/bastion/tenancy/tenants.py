"""Tenant administration: create, update, suspend, and the limits row that overrides the platform defaults."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bastion.config.schema import LimitsConfig, weight_problem
from bastion.db.models import Limit, Tenant
from bastion.errors import BastionError
from bastion.tenancy.apis import APIS, unknown_apis
from bastion.tenancy.views import TenantInfo, limits_of

ACTIVE = "active"
SUSPENDED = "suspended"


class TenancyError(BastionError):
    """A tenant or key request that cannot be carried out (unknown name, duplicate, bad value)."""


async def find_tenant(session: AsyncSession, ref: str) -> Tenant:
    """A tenant by name or id."""
    row = (await session.execute(select(Tenant).where((Tenant.name == ref) | (Tenant.id == ref)))).scalars().first()
    if row is None:
        raise TenancyError(f"no tenant {ref!r}")
    return row


class TenantService:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def create(
        self,
        name: str,
        *,
        allowed_models: Sequence[str] = (),
        allowed_profiles: Sequence[str] = (),
        default_profile: str | None = None,
        limits: LimitsConfig | None = None,
        fair_share_weight: float | None = None,
        log_content: bool = False,
        allowed_apis: Sequence[str] = (),
    ) -> TenantInfo:
        if not name or len(name) > 64:
            raise TenancyError("a tenant name has 1 to 64 characters")
        _check_weight(fair_share_weight)
        _check_apis(allowed_apis)
        if default_profile is not None and allowed_profiles and default_profile not in allowed_profiles:
            raise TenancyError(f"default profile {default_profile!r} is not among the allowed profiles")
        async with self._sessions() as session:
            exists = await session.execute(select(Tenant.id).where(Tenant.name == name))
            if exists.first() is not None:
                raise TenancyError(f"tenant {name!r} exists")
            row = Tenant(
                name=name,
                status=ACTIVE,
                allowed_models=list(allowed_models),
                allowed_profiles=list(allowed_profiles),
                default_profile=default_profile,
                fair_share_weight=fair_share_weight,
                log_content=log_content,
                allowed_apis=list(allowed_apis),
            )
            session.add(row)
            await session.flush()
            if limits is not None:
                session.add(Limit(tenant_id=row.id, key_id=None, **limits.model_dump()))
            await session.commit()
            return TenantInfo.of(row)

    async def update(
        self,
        ref: str,
        *,
        allowed_models: Sequence[str] | None = None,
        allowed_profiles: Sequence[str] | None = None,
        default_profile: str | None = None,
        clear_default_profile: bool = False,
        fair_share_weight: float | None = None,
        clear_fair_share_weight: bool = False,
        log_content: bool | None = None,
        allowed_apis: Sequence[str] | None = None,
    ) -> TenantInfo:
        """Change what is given (None: unchanged); `clear_*` sets the field back to the platform's default."""
        _check_weight(fair_share_weight)
        if fair_share_weight is not None and clear_fair_share_weight:
            raise TenancyError("give fair_share_weight or clear_fair_share_weight, not both")
        _check_apis(allowed_apis or ())
        async with self._sessions() as session:
            row = await find_tenant(session, ref)
            if allowed_apis is not None:
                row.allowed_apis = list(allowed_apis)
            if allowed_models is not None:
                row.allowed_models = list(allowed_models)
            if allowed_profiles is not None:
                row.allowed_profiles = list(allowed_profiles)
            if default_profile is not None or clear_default_profile:
                row.default_profile = default_profile
            if fair_share_weight is not None or clear_fair_share_weight:
                row.fair_share_weight = fair_share_weight
            if log_content is not None:
                row.log_content = log_content
            await session.commit()
            return TenantInfo.of(row)

    async def set_status(self, ref: str, status: str) -> TenantInfo:
        if status not in (ACTIVE, SUSPENDED):
            raise TenancyError(f"status must be {ACTIVE} or {SUSPENDED}")
        async with self._sessions() as session:
            row = await find_tenant(session, ref)
            row.status = status
            await session.commit()
            return TenantInfo.of(row)

    async def suspend(self, ref: str) -> TenantInfo:
        return await self.set_status(ref, SUSPENDED)

    async def resume(self, ref: str) -> TenantInfo:
        return await self.set_status(ref, ACTIVE)

    async def get(self, ref: str) -> TenantInfo:
        async with self._sessions() as session:
            return TenantInfo.of(await find_tenant(session, ref))

    async def list(self) -> list[TenantInfo]:
        async with self._sessions() as session:
            rows = (await session.execute(select(Tenant).order_by(Tenant.name))).scalars().all()
            return [TenantInfo.of(r) for r in rows]

    async def set_limits(self, ref: str, limits: LimitsConfig, *, key_id: str | None = None) -> None:
        """Replace the tenant's (or one key's) limits; a None field means no limit at that level."""
        async with self._sessions() as session:
            tenant = await find_tenant(session, ref)
            row = (
                await session.execute(
                    select(Limit).where(Limit.tenant_id == tenant.id, _key_is(key_id)),
                )
            ).scalar_one_or_none()
            if row is None:
                row = Limit(tenant_id=tenant.id, key_id=key_id)
                session.add(row)
            for field, value in limits.model_dump().items():
                setattr(row, field, value)
            await session.commit()

    async def get_limits(self, ref: str, *, key_id: str | None = None) -> LimitsConfig | None:
        async with self._sessions() as session:
            tenant = await find_tenant(session, ref)
            row = (
                await session.execute(select(Limit).where(Limit.tenant_id == tenant.id, _key_is(key_id)))
            ).scalar_one_or_none()
            return limits_of(row)


def _check_weight(weight: float | None) -> None:
    problem = weight_problem(weight) if weight is not None else None
    if problem is not None:
        raise TenancyError(f"fair_share_weight: {problem}")


def _key_is(key_id: str | None):
    return Limit.key_id.is_(None) if key_id is None else Limit.key_id == key_id


def _check_apis(names: Sequence[str]) -> None:
    if unknown := unknown_apis(names):
        raise TenancyError(f"unknown API {unknown[0]!r}; the APIs are {', '.join(APIS)}")
