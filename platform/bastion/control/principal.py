"""Who is acting and what their roles allow. Roles come from Keycloak realm roles or the client's roles.

Tenant binding: a tenant-admin's token carries the tenant (name or id) in the `bastion_tenant` claim (a Keycloak
user attribute exposed by a "User Attribute" protocol mapper). A tenant-admin without it can do nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

PLATFORM_ADMIN = "platform-admin"
TENANT_ADMIN = "tenant-admin"
AUDITOR = "auditor"
ROLES = (PLATFORM_ADMIN, TENANT_ADMIN, AUDITOR)
TENANT_CLAIM = "bastion_tenant"


@dataclass(frozen=True)
class Principal:
    subject: str
    username: str
    roles: frozenset[str]
    tenant: str | None = None  # the bound tenant's name or id (tenant-admin)
    via: str = "oidc"  # oidc | local
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def actor(self) -> str:
        """What audit rows record: the identity provider's username and subject, never a token."""
        return f"{self.via}:{self.username}"[:128]

    @property
    def is_platform_admin(self) -> bool:
        return PLATFORM_ADMIN in self.roles

    @property
    def is_auditor(self) -> bool:
        return AUDITOR in self.roles or self.is_platform_admin

    @property
    def is_tenant_admin(self) -> bool:
        return TENANT_ADMIN in self.roles and self.tenant is not None

    def as_dict(self) -> dict[str, Any]:
        return {"username": self.username, "roles": sorted(self.roles), "tenant": self.tenant, "via": self.via}


def roles_from_claims(claims: Mapping[str, Any], client_id: str | None) -> frozenset[str]:
    """Bastion roles among `realm_access.roles` and `resource_access.<client>.roles`; others are ignored."""
    found: set[str] = set()
    realm = claims.get("realm_access")
    if isinstance(realm, Mapping):
        found.update(_strings(realm.get("roles")))
    resources = claims.get("resource_access")
    if client_id and isinstance(resources, Mapping):
        mine = resources.get(client_id)
        if isinstance(mine, Mapping):
            found.update(_strings(mine.get("roles")))
    return frozenset(found & set(ROLES))


def _strings(value: Any) -> Iterable[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def principal_from_claims(claims: Mapping[str, Any], client_id: str | None) -> Principal:
    tenant = claims.get(TENANT_CLAIM)
    if isinstance(tenant, list):  # a multivalued attribute mapper gives a list; only one tenant is supported
        tenant = tenant[0] if len(tenant) == 1 else None
    username = claims.get("preferred_username") or claims.get("sub") or "unknown"
    return Principal(
        subject=str(claims.get("sub", "")),
        username=str(username),
        roles=roles_from_claims(claims, client_id),
        tenant=tenant if isinstance(tenant, str) and tenant else None,
    )
