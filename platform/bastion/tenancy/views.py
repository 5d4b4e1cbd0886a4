"""Plain read-only views of tenants and keys: what services return, so callers never hold ORM rows or hashes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from bastion.config.schema import LimitsConfig
from bastion.db.models import ApiKey, Limit, Tenant


@dataclass(frozen=True)
class TenantInfo:
    id: str
    name: str
    status: str
    allowed_models: tuple[str, ...]
    allowed_profiles: tuple[str, ...]
    default_profile: str | None
    created_at: datetime
    fair_share_weight: float | None = None  # None: the platform file's `gateway.tenant_weights`, else 1
    log_content: bool = False  # prompts and completions stored, encrypted, in the audit log (docs/audit.md)
    allowed_apis: tuple[str, ...] = ()  # empty: every API (tenancy/apis.py)

    @classmethod
    def of(cls, row: Tenant) -> TenantInfo:
        return cls(
            id=row.id,
            name=row.name,
            status=row.status,
            allowed_models=tuple(row.allowed_models or ()),
            allowed_profiles=tuple(row.allowed_profiles or ()),
            default_profile=row.default_profile,
            created_at=row.created_at,
            fair_share_weight=row.fair_share_weight,
            log_content=bool(row.log_content),
            allowed_apis=tuple(row.allowed_apis or ()),
        )


@dataclass(frozen=True)
class KeyInfo:
    id: str
    tenant_id: str
    name: str
    prefix: str
    scopes: tuple[str, ...]
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None
    replaced_by: str | None

    @classmethod
    def of(cls, row: ApiKey) -> KeyInfo:
        return cls(
            id=row.id,
            tenant_id=row.tenant_id,
            name=row.name,
            prefix=row.prefix,
            scopes=tuple(row.scopes or ()),
            created_at=row.created_at,
            expires_at=row.expires_at,
            last_used_at=row.last_used_at,
            revoked_at=row.revoked_at,
            replaced_by=row.replaced_by,
        )

    def state(self, now: datetime) -> str:
        if self.revoked_at is not None and self.revoked_at <= now:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"


@dataclass(frozen=True)
class CreatedKey:
    """A new key: `token` is the only time the secret exists outside the caller's hands."""

    info: KeyInfo
    token: str


def limits_of(row: Limit | None) -> LimitsConfig | None:
    if row is None:
        return None
    return LimitsConfig(
        requests_per_minute=row.requests_per_minute,
        tokens_per_minute=row.tokens_per_minute,
        concurrent_requests=row.concurrent_requests,
        daily_token_budget=row.daily_token_budget,
        monthly_token_budget=row.monthly_token_budget,
    )
