"""The embedded default's first start: one tenant and one key, created only when no tenant exists yet.

`serve/` calls `ensure_bootstrap()` at start-up and prints the returned token once; later starts return None.
Two replicas racing on an empty database both try; the unique tenant name lets exactly one win.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bastion.db.models import Tenant
from bastion.tenancy.key_service import KeyService
from bastion.tenancy.tenants import TenantService
from bastion.tenancy.views import CreatedKey

BOOTSTRAP_TENANT = "default"


async def ensure_bootstrap(
    sessions: async_sessionmaker[AsyncSession], pepper: bytes, *, tenant: str = BOOTSTRAP_TENANT
) -> CreatedKey | None:
    """Create the bootstrap tenant and an `inference` + `usage:read` key if the database has no tenant."""
    async with sessions() as session:
        if (await session.execute(select(Tenant.id).limit(1))).first() is not None:
            return None
    try:
        await TenantService(sessions).create(tenant)
    except IntegrityError:
        return None
    return await KeyService(sessions, pepper).create(tenant, name="bootstrap", scopes=["inference", "usage:read"])
