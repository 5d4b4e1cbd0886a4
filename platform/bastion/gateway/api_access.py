"""The per-tenant API switch (the tenant's `allowed_apis`, tenancy/apis.py), checked right after authentication
on every inference route, so a refused call is audited and counted like any other 403."""

from __future__ import annotations

from bastion.gateway.errors import ApiError
from bastion.tenancy.authenticator import Principal

_API_OF_ENDPOINT = {
    "chat": "chat",
    "completion": "completions",
    "messages": "messages",
}  # the engine's endpoint names → API names


def require_api(principal: Principal, endpoint: str) -> None:
    """Raise the 403 (`api_not_allowed`) when the caller's tenant may not use this endpoint's API."""
    api = _API_OF_ENDPOINT.get(endpoint, endpoint)
    if not principal.may_use_api(api):
        raise ApiError(403, f"Your tenant is not allowed to use the {api} API", code="api_not_allowed")
