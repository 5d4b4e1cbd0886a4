"""Admin operations with their authorization and their audit record, shared by the REST API and the console.

Authorization is decided here, not in the views, so both front ends agree: a role that may never do a thing
gets 403; a tenant-admin asking about another tenant gets 404, exactly as for a tenant that does not exist.
Every change is recorded as an audit `admin` event with the actor and the values before and after (secrets
and hashes never appear in them) and is durable before the response is sent.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from bastion.audit import AdminEvent, AuditWriter
from bastion.audit.errors import AuditError
from bastion.config import PlatformConfig
from bastion.config.schema import LimitsConfig
from bastion.control.errors import ControlError, bad_request, conflict, forbidden, not_found
from bastion.control.principal import Principal
from bastion.tenancy.key_service import KeyService
from bastion.tenancy.tenants import TenancyError, TenantService
from bastion.tenancy.usage import usage_for_tenant
from bastion.tenancy.views import CreatedKey, KeyInfo, TenantInfo

log = logging.getLogger(__name__)
LIMIT_FIELDS = tuple(LimitsConfig.model_fields)


def tenant_view(info: TenantInfo) -> dict[str, Any]:
    data = asdict(info)
    data["created_at"] = info.created_at.isoformat()
    data["allowed_models"], data["allowed_profiles"] = list(info.allowed_models), list(info.allowed_profiles)
    data["allowed_apis"] = list(info.allowed_apis)
    return data


def key_view(info: KeyInfo, now: datetime | None = None) -> dict[str, Any]:
    """A key as people see it: prefix, scopes, dates and state; never the secret or its hash."""
    data: dict[str, Any] = {k: v.isoformat() if isinstance(v, datetime) else v for k, v in asdict(info).items()}
    data["scopes"] = list(info.scopes)
    data["state"] = info.state(now or datetime.now(UTC))
    return data


def limits_view(limits: LimitsConfig | None) -> dict[str, int | None]:
    return limits.model_dump() if limits is not None else dict.fromkeys(LIMIT_FIELDS)


class AdminService:
    def __init__(
        self,
        config: PlatformConfig,
        sessions: async_sessionmaker[AsyncSession],
        engine: AsyncEngine,
        keys: KeyService,
        writer: AuditWriter,
    ) -> None:
        self.config, self.sessions, self.engine = config, sessions, engine
        self.tenants = TenantService(sessions)
        self.keys = keys
        self.writer = writer

    # --- authorization ---------------------------------------------------------------------------

    @staticmethod
    def require(who: Principal, *, platform: bool = False, tenant_admin: bool = False, auditor: bool = False) -> None:
        """403 unless one of the principal's roles is among those allowed for the action at all."""
        if who.is_platform_admin:
            return
        if tenant_admin and who.is_tenant_admin:
            return
        if auditor and who.is_auditor:
            return
        raise forbidden()

    async def tenant(self, who: Principal, ref: str, *, auditor: bool = False) -> TenantInfo:
        """The tenant if the principal may see it; 404 alike for a missing tenant and someone else's."""
        try:
            info = await self.tenants.get(ref)
        except TenancyError:
            raise not_found("tenant") from None
        if who.is_platform_admin or (auditor and who.is_auditor):
            return info
        if who.is_tenant_admin and who.tenant in (info.id, info.name):
            return info
        raise not_found("tenant")

    async def tenant_names(self) -> dict[str, str]:
        """Tenant id → name, for views that get ids (the fair queues' figures); a platform admin's pages only."""
        return {t.id: t.name for t in await self.tenants.list()}

    async def own_tenant(self, who: Principal) -> TenantInfo | None:
        if not who.is_tenant_admin or who.tenant is None:
            return None
        try:
            return await self.tenants.get(who.tenant)
        except TenancyError:
            return None

    async def record(
        self,
        who: Principal,
        action: str,
        target_type: str,
        target_id: str | None,
        *,
        tenant_id: str | None = None,
        before: dict[str, Any] | None = None,
        after: dict[str, Any] | None = None,
        client: str | None = None,
    ) -> None:
        event = AdminEvent(
            actor=who.actor,
            action=action,
            target_type=target_type,
            target_id=target_id,
            tenant_id=tenant_id,
            before=before,
            after=after,
            client_address=client,
        )
        self.writer.enqueue(event)
        try:
            await self.writer.flush(timeout=10)
        except AuditError as exc:  # the change is made; say so loudly rather than pretend it was not
            log.error("admin action %s by %s not yet durable in the audit log: %s", action, who.actor, exc)

    # --- tenants ---------------------------------------------------------------------------------

    async def list_tenants(self, who: Principal) -> list[TenantInfo]:
        self.require(who, tenant_admin=True)
        if who.is_platform_admin:
            return await self.tenants.list()
        own = await self.own_tenant(who)
        return [own] if own else []

    async def create_tenant(self, who: Principal, name: str, *, limits: LimitsConfig | None = None, **fields: Any):
        self.require(who)
        self._check_profiles(fields.get("allowed_profiles"), fields.get("default_profile"))
        try:
            info = await self.tenants.create(name, limits=limits, **fields)
        except IntegrityError:  # lost a race with another create of the same name
            raise conflict(f"tenant {name!r} exists") from None
        except TenancyError as exc:
            raise (conflict(str(exc)) if "exists" in str(exc) else bad_request(str(exc))) from None
        after = {**tenant_view(info), "limits": limits_view(limits)}
        await self.record(who, "tenant.create", "tenant", info.id, tenant_id=info.id, after=after)
        return info

    async def update_tenant(self, who: Principal, ref: str, **fields: Any) -> TenantInfo:
        self.require(who)
        before = await self.tenant(who, ref)
        self._check_profiles(fields.get("allowed_profiles"), fields.get("default_profile"))
        try:
            info = await self.tenants.update(before.id, **fields)
        except TenancyError as exc:
            raise bad_request(str(exc)) from None
        await self.record(
            who,
            "tenant.update",
            "tenant",
            info.id,
            tenant_id=info.id,
            before=tenant_view(before),
            after=tenant_view(info),
        )
        await self.keys.tenant_changed(info.id)  # gateways re-read the tenant (its weight) at once
        return info

    async def set_status(self, who: Principal, ref: str, status: str) -> TenantInfo:
        self.require(who)
        before = await self.tenant(who, ref)
        info = await self.tenants.set_status(before.id, status)
        action = "tenant.suspend" if status == "suspended" else "tenant.resume"
        await self.record(
            who,
            action,
            "tenant",
            info.id,
            tenant_id=info.id,
            before={"status": before.status},
            after={"status": status},
        )
        await self.keys.tenant_changed(info.id)
        return info

    def _check_profiles(self, profiles: list[str] | None, default: str | None) -> None:
        unknown = sorted(set(profiles or []) - set(self.config.profiles))
        if default is not None and default not in self.config.profiles:
            unknown.append(default)
        if unknown:
            raise bad_request(f"unknown profile(s): {', '.join(unknown)}")

    # --- limits and budgets ----------------------------------------------------------------------

    async def get_limits(self, who: Principal, ref: str, key_id: str | None = None) -> dict[str, Any]:
        self.require(who, tenant_admin=True)
        info = await self.tenant(who, ref)
        if key_id is not None:
            key_id = (await self._key_of(info, key_id)).id  # a prefix names the key too
        return limits_view(await self.tenants.get_limits(info.id, key_id=key_id))

    async def set_limits(self, who: Principal, ref: str, limits: LimitsConfig, key_id: str | None = None) -> None:
        """Tenant limits (the caps) are the platform admin's; a tenant-admin sets per-key limits up to the caps."""
        self.require(who, tenant_admin=True)
        info = await self.tenant(who, ref)
        if key_id is None and not who.is_platform_admin:
            raise forbidden("only a platform admin sets a tenant's limits and budgets")
        if key_id is not None:
            key_id = (await self._key_of(info, key_id)).id
            if not who.is_platform_admin:
                caps = await self.tenants.get_limits(info.id)
                over = [f for f in LIMIT_FIELDS if _above(getattr(limits, f), getattr(caps, f) if caps else None)]
                if over:
                    raise bad_request(f"above the tenant's caps: {', '.join(over)}", code="over_cap")
        before = limits_view(await self.tenants.get_limits(info.id, key_id=key_id))
        await self.tenants.set_limits(info.id, limits, key_id=key_id)
        target, target_id = ("key_limits", key_id) if key_id else ("tenant_limits", info.id)
        await self.record(
            who, "limits.set", target, target_id, tenant_id=info.id, before=before, after=limits.model_dump()
        )

    # --- keys ------------------------------------------------------------------------------------

    async def _key_of(self, info: TenantInfo, key_id: str) -> KeyInfo:
        for key in await self.keys.list(info.id):
            if key_id in (key.id, key.prefix):
                return key
        raise not_found("API key")

    async def list_keys(self, who: Principal, ref: str) -> list[KeyInfo]:
        self.require(who, tenant_admin=True)
        info = await self.tenant(who, ref)
        return await self.keys.list(info.id)

    async def create_key(
        self, who: Principal, ref: str, *, name: str, scopes: list[str], expires_at: datetime | None
    ) -> CreatedKey:
        self.require(who, tenant_admin=True)
        info = await self.tenant(who, ref)
        try:
            created = await self.keys.create(info.id, name=name, scopes=scopes, expires_at=expires_at)
        except TenancyError as exc:
            raise bad_request(str(exc)) from None
        await self.record(
            who, "key.create", "api_key", created.info.id, tenant_id=info.id, after=key_view(created.info)
        )
        return created

    async def rotate_key(self, who: Principal, ref: str, key_id: str, grace_s: int) -> CreatedKey:
        self.require(who, tenant_admin=True)
        info = await self.tenant(who, ref)
        old = await self._key_of(info, key_id)
        try:
            created = await self.keys.rotate(old.id, grace=timedelta(seconds=grace_s))
        except TenancyError as exc:
            raise conflict(str(exc)) from None
        await self.record(
            who, "key.rotate", "api_key", old.id, tenant_id=info.id, before=key_view(old), after=key_view(created.info)
        )
        return created

    async def revoke_key(self, who: Principal, ref: str, key_id: str) -> KeyInfo:
        self.require(who, tenant_admin=True)
        info = await self.tenant(who, ref)
        old = await self._key_of(info, key_id)
        revoked = await self.keys.revoke(old.id)
        await self.record(
            who, "key.revoke", "api_key", old.id, tenant_id=info.id, before=key_view(old), after=key_view(revoked)
        )
        return revoked

    # --- usage -----------------------------------------------------------------------------------

    async def usage(self, who: Principal, ref: str, periods: list[str] | None = None) -> list[dict[str, Any]]:
        self.require(who, tenant_admin=True)
        info = await self.tenant(who, ref)
        return [asdict(r) for r in await usage_for_tenant(self.sessions, info.id, periods=periods)]

    # --- audit scope -----------------------------------------------------------------------------

    async def audit_scope(self, who: Principal, tenant_ref: str | None) -> str | None:
        """The tenant id an audit search or export is limited to; a tenant-admin is always limited to theirs."""
        self.require(who, tenant_admin=True, auditor=True)
        if tenant_ref:
            return (await self.tenant(who, tenant_ref, auditor=True)).id
        if who.is_platform_admin or who.is_auditor:
            return None
        own = await self.own_tenant(who)
        if own is None:
            raise not_found("tenant")
        return own.id


def _above(value: int | None, cap: int | None) -> bool:
    """A key limit above its tenant's cap; None on the key means "the tenant's limit applies", never above."""
    return value is not None and cap is not None and value > cap


def parse_time(value: str | None, name: str) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise bad_request(f"{name}: not a date or ISO time") from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


__all__ = ["AdminService", "ControlError", "key_view", "limits_view", "parse_time", "tenant_view"]
