"""The gateway's authenticator: presented key → Principal, with a short-lived cache so hits need no database.

The cache keeps each row for at most `ttl` seconds (≤ 1 s), so a revocation, suspension or limit change reaches
every gateway replica within a second even when no invalidation message arrives; `invalidate()` makes it
immediate where Redis pub/sub is wired. Unknown prefixes are cached too, so a flood of bad keys costs one query
per prefix per TTL. Last-used times are collected in memory and written in batches by `flush_last_used()`.

Database down: a key read within the last `stale_s` seconds keeps working from the cache (inference goes on
for known keys); a Redis invalidation notice still drops it, and a key that is not cached cannot be checked
(KeyStoreUnavailable, a 503), so a revocation announced while the database is down is still honoured.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import or_, select, update
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bastion.config.schema import LimitsConfig, TenantDefaultsConfig
from bastion.db.models import ApiKey, Limit, Tenant
from bastion.tenancy import key_material
from bastion.tenancy.auth_failure_guard import AuthFailureGuard
from bastion.tenancy.views import limits_of

MAX_TTL_S = 0.8  # plus one database read: revocation lands within a second
log = logging.getLogger(__name__)
# What "the database is unreachable" looks like through SQLAlchemy and asyncpg/aiosqlite (not a DataError or
# IntegrityError: those are bugs or bad input, and hiding them behind a 503 would hide them).
DB_DOWN = (OperationalError, InterfaceError, OSError, TimeoutError)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key, its tenant, and the policy that applies to both."""

    key_id: str
    key_prefix: str
    tenant_id: str
    tenant_name: str
    tenant_active: bool
    scopes: frozenset[str]
    allowed_models: frozenset[str]  # empty: every model
    allowed_profiles: frozenset[str]
    default_profile: str | None
    tenant_limits: LimitsConfig
    key_limits: LimitsConfig | None
    fair_share_weight: float | None = None  # the tenant record's; None: the platform file's, else 1
    log_content: bool = False  # the tenant opted in to encrypted prompt and completion logging
    allowed_apis: frozenset[str] = frozenset()  # empty: every API (tenancy/apis.py)

    def may_use_model(self, model: str) -> bool:
        return not self.allowed_models or model in self.allowed_models

    def may_use_api(self, api: str) -> bool:
        return not self.allowed_apis or api in self.allowed_apis


class AuthFailure(Exception):
    """The key is missing, malformed, unknown, expired or revoked (always HTTP 401)."""


class KeyStoreUnavailable(Exception):
    """The database is unreachable and the key is not in the cache: it cannot be checked (HTTP 503)."""


@dataclass(frozen=True)
class _Entry:
    secret_hash: bytes
    expires_at: float | None
    revoked_at: float | None
    principal: Principal


def _ts(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


class Authenticator:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        pepper: bytes,
        defaults: TenantDefaultsConfig,
        *,
        ttl: float = 0.5,
        stale_s: float = 0.0,
        guard: AuthFailureGuard | None = None,
    ) -> None:
        if not 0 < ttl <= MAX_TTL_S:
            raise ValueError(f"ttl must be in (0, {MAX_TTL_S}] so revocation takes effect within a second")
        self._sessions = sessions
        self._pepper = pepper
        self._defaults = defaults
        self._ttl = ttl
        self.guard = guard  # refused keys per client address (the HTTP layer knows the address)
        self._stale_s = stale_s  # how old a cached key may be and still serve while the database is down
        self.db_down = False
        self._db_retry_at = 0.0
        self._cache: dict[str, _Entry | None] = {}
        self._cached_at: dict[str, float] = {}
        self._loading: dict[str, asyncio.Future[_Entry | None]] = {}
        self._last_used: dict[str, float] = {}

    async def authenticate(self, token: str | None) -> Principal:
        if not token:
            raise AuthFailure("missing API key; send `Authorization: Bearer bst_...`")
        parsed = key_material.parse(token)
        if parsed is None:
            raise AuthFailure("invalid API key")
        prefix, secret = parsed
        entry = await self._entry(prefix)
        if entry is None or not key_material.verify(self._pepper, secret, entry.secret_hash):
            raise AuthFailure("invalid API key")
        now = time.time()
        if entry.revoked_at is not None and entry.revoked_at <= now:
            raise AuthFailure("API key revoked")
        if entry.expires_at is not None and entry.expires_at <= now:
            raise AuthFailure("API key expired")
        self._last_used[entry.principal.key_id] = now
        return entry.principal

    def invalidate(self, prefix: str | None = None) -> None:
        """Forget one prefix (or all): the next request for it reads the database."""
        if prefix is None:
            self._cache.clear()
            self._cached_at.clear()
        else:
            self._cache.pop(prefix, None)
            self._cached_at.pop(prefix, None)

    async def _entry(self, prefix: str) -> _Entry | None:
        at = self._cached_at.get(prefix)
        if at is not None and time.monotonic() - at < self._ttl:
            return self._cache[prefix]
        pending = self._loading.get(prefix)
        if pending is not None:  # one query per prefix however many requests miss at once
            return await asyncio.shield(pending)
        future: asyncio.Future[_Entry | None] = asyncio.get_running_loop().create_future()
        self._loading[prefix] = future
        started = time.monotonic()  # the row's age counts from the query, not from its answer
        try:
            entry, stale = await self._load_or_stale(prefix)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(exc)
                future.exception()  # mark retrieved: waiters, if any, re-raise it
            raise
        finally:
            self._loading.pop(prefix, None)
        future.set_result(entry)
        if stale:  # keep the time of the last real read: the bound counts from there
            return entry
        if len(self._cache) > 100_000:
            self.invalidate()
        self._cache[prefix] = entry
        self._cached_at[prefix] = started
        return entry

    def _stale_entry(self, prefix: str, exc: BaseException | None) -> tuple[_Entry | None, bool]:
        """While the database is down: the cached row if recent enough, else KeyStoreUnavailable."""
        if not self.db_down:
            log.warning("database unreachable (%s): cached keys serve for %g s", type(exc).__name__, self._stale_s)
        self.db_down = True
        at = self._cached_at.get(prefix)
        if at is not None and time.monotonic() - at < self._stale_s:
            return self._cache[prefix], True
        raise KeyStoreUnavailable("the key store is unavailable") from None

    async def _load_or_stale(self, prefix: str) -> tuple[_Entry | None, bool]:
        """(row, stale): the row from the database, or the cached one (stale) while the database is down."""
        if self.db_down and time.monotonic() < self._db_retry_at:  # do not pay a failed connect per request
            return self._stale_entry(prefix, None)
        try:
            entry = await self._load(prefix)
        except DB_DOWN as exc:
            self._db_retry_at = time.monotonic() + 1.0
            return self._stale_entry(prefix, exc)
        if self.db_down:
            log.warning("database reachable again: keys are read from it")
        self.db_down = False
        return entry, False

    async def _load(self, prefix: str) -> _Entry | None:
        async with self._sessions() as session:
            found = (await session.execute(select(ApiKey, Tenant).join(Tenant).where(ApiKey.prefix == prefix))).first()
            if found is None:
                return None
            key, tenant = found
            rows = (
                await session.execute(
                    select(Limit).where(
                        Limit.tenant_id == tenant.id, or_(Limit.key_id.is_(None), Limit.key_id == key.id)
                    )
                )
            ).scalars()
            by_key = {row.key_id: row for row in rows}
        tenant_limits = limits_of(by_key.get(None)) or self._defaults.limits
        principal = Principal(
            key_id=key.id,
            key_prefix=key.prefix,
            tenant_id=tenant.id,
            tenant_name=tenant.name,
            tenant_active=tenant.status == "active",
            scopes=frozenset(key.scopes or ()),
            allowed_models=frozenset(tenant.allowed_models or ()),
            allowed_profiles=frozenset(tenant.allowed_profiles or self._defaults.allowed_profiles),
            default_profile=tenant.default_profile or self._defaults.default_profile,
            tenant_limits=tenant_limits,
            key_limits=limits_of(by_key.get(key.id)),
            fair_share_weight=tenant.fair_share_weight,
            log_content=bool(tenant.log_content),
            allowed_apis=frozenset(tenant.allowed_apis or ()),
        )
        return _Entry(key.secret_hash, _ts(key.expires_at), _ts(key.revoked_at), principal)

    async def flush_last_used(self) -> int:
        """Write the collected last-used times in one transaction; returns how many keys were updated."""
        if not self._last_used:
            return 0
        pending, self._last_used = self._last_used, {}
        async with self._sessions() as session:
            for key_id, at in pending.items():
                await session.execute(
                    update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=datetime.fromtimestamp(at, UTC))
                )
            await session.commit()
        return len(pending)
