"""The admin API on PostgreSQL with tokens from a real OpenID Connect provider: for each role the allowed and the
denied actions (a tenant-admin gets 404 for another tenant's things), the JSON error format, secrets shown once
and never stored or audited, and every change audited with its actor and before/after values."""

from __future__ import annotations

import io
import json
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "oidc"))
import idp_harness as h

from bastion.control.app import create_app
from bastion.db import migrate
from bastion.pool.live_stats import ReplicaStats

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def idp(tmp_path_factory: pytest.TempPathFactory) -> h.TestIdp:
    return h.shared_idp(tmp_path_factory.mktemp("idp"))


async def _live() -> list[ReplicaStats]:
    return [ReplicaStats("m1@fast-agentic", "r1", healthy=True, queue_depth=2, tok_s=41.5, acceptance_rate=0.72)]


@pytest.fixture(scope="module")
def api(idp: h.TestIdp, pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    tmp = tmp_path_factory.mktemp("control-api")
    migrate.upgrade(pg_url)
    config = h.platform_config(tmp, pg_url, idp.issuer)
    app = create_app(config, settings=h.control_settings(config), stats_provider=_live)
    with h.ServerThread(app, h.free_port()) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


class As:
    """Requests as one user of the provider (a fresh token through the password grant)."""

    def __init__(self, api: httpx.Client, idp: h.TestIdp, user: str) -> None:
        self.api, self.headers = api, {"Authorization": f"Bearer {idp.token(user)}"}

    def __getattr__(self, method: str):
        def call(url: str, headers: dict | None = None, **kw) -> httpx.Response:
            return self.api.request(method.upper(), url, headers={**self.headers, **(headers or {})}, **kw)

        return call


@pytest.fixture(scope="module")
def users(api: httpx.Client, idp: h.TestIdp) -> dict[str, As]:
    return {name: As(api, idp, name) for name in h.USERS}


@pytest.fixture(scope="module")
def tenants(users: dict[str, As]) -> dict[str, dict]:
    """acme (alice's) with caps, and globex (bob's), created by the platform admin."""
    pat = users["pat"]
    made = {}
    for name in ("acme", "globex"):
        limits = {"requests_per_minute": 100, "tokens_per_minute": 10_000, "monthly_token_budget": 1_000_000}
        response = pat.post("/admin/api/tenants", json={"name": name, "limits": limits})
        assert response.status_code == 201, response.text
        made[name] = response.json()
    return made


def error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"])
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


def test_platform_admin_manages_tenants(users: dict[str, As], tenants: dict[str, dict]) -> None:
    pat = users["pat"]
    names = [t["name"] for t in pat.get("/admin/api/tenants").json()]
    assert {"acme", "globex"} <= set(names)
    made = pat.post("/admin/api/tenants", json={"name": "initech", "allowed_profiles": ["deep-context"]})
    assert made.status_code == 201 and made.json()["allowed_profiles"] == ["deep-context"]
    updated = pat.patch("/admin/api/tenants/initech", json={"default_profile": "deep-context"})
    assert updated.status_code == 200 and updated.json()["default_profile"] == "deep-context"
    assert made.json()["allowed_apis"] == []  # every API
    apis = pat.patch("/admin/api/tenants/initech", json={"allowed_apis": ["chat", "messages"]})
    assert apis.status_code == 200 and apis.json()["allowed_apis"] == ["chat", "messages"]
    assert pat.get("/admin/api/tenants/initech").json()["allowed_apis"] == ["chat", "messages"]
    assert pat.post("/admin/api/tenants/initech/suspend").json()["status"] == "suspended"
    assert pat.post("/admin/api/tenants/initech/resume").json()["status"] == "active"
    caps = {"requests_per_minute": 50, "daily_token_budget": 5000}
    assert pat.put("/admin/api/tenants/initech/limits", json=caps).status_code == 200
    limits = pat.get("/admin/api/tenants/initech/limits").json()
    assert limits["requests_per_minute"] == 50 and limits["daily_token_budget"] == 5000
    assert limits["tokens_per_minute"] is None


def test_bad_input_is_4xx_json(users: dict[str, As], tenants: dict[str, dict]) -> None:
    pat = users["pat"]
    error(pat.post("/admin/api/tenants", json={"name": "acme"}), 409, "conflict")
    error(pat.post("/admin/api/tenants", json={"name": ""}), 422, "invalid_value")
    error(pat.post("/admin/api/tenants", json={"name": "x", "surprise": 1}), 422, "invalid_value")
    error(pat.post("/admin/api/tenants", json={"name": "y", "allowed_profiles": ["nope"]}), 422)
    error(pat.post("/admin/api/tenants", json={"name": "y", "allowed_apis": ["graphql"]}), 422, "invalid_value")
    error(pat.patch("/admin/api/tenants/acme", json={"allowed_apis": ["nope"]}), 422, "invalid_value")
    error(pat.put("/admin/api/tenants/acme/limits", json={"requests_per_minute": 0}), 422)
    error(pat.post("/admin/api/tenants/acme/keys", json={"scopes": ["root"]}), 422)
    error(pat.get("/admin/api/tenants/no-such-tenant"), 404, "not_found")
    error(pat.get("/admin/api/audit/events", params={"kind": "bogus"}), 422)
    error(pat.get("/admin/api/audit/events", params={"from": "yesterday"}), 422)
    error(pat.post("/admin/api/pool/plan", json={"kv_dtype": "int3"}), 422)
    error(pat.get("/admin/api/nowhere"), 404)
    error(pat.post("/admin/api/tenants", content=b"{not json", headers={"content-type": "application/json"}), 422)


def test_keys_secret_shown_once_and_never_stored(users: dict[str, As], tenants: dict[str, dict]) -> None:
    pat = users["pat"]
    created = pat.post("/admin/api/tenants/acme/keys", json={"name": "ci", "scopes": ["inference", "usage:read"]})
    assert created.status_code == 201
    secret, key = created.json()["secret"], created.json()["key"]
    assert secret.startswith(f"bst_{key['prefix']}_")
    listed = pat.get("/admin/api/tenants/acme/keys").text
    assert secret not in listed and secret.rsplit("_", 1)[1] not in listed
    assert "hash" not in listed and key["prefix"] in listed
    rotated = pat.post(f"/admin/api/tenants/acme/keys/{key['id']}/rotate", json={"grace_seconds": 0})
    assert rotated.status_code == 201 and rotated.json()["secret"] != secret
    revoked = pat.post(f"/admin/api/tenants/acme/keys/{rotated.json()['key']['id']}/revoke")
    assert revoked.json()["state"] == "revoked" and "secret" not in revoked.json()
    events = pat.get("/admin/api/audit/events", params={"kind": "admin", "limit": 500}).text
    assert secret not in events and rotated.json()["secret"] not in events
    assert "key.create" in events and "key.rotate" in events and "key.revoke" in events


def test_admin_actions_are_audited_with_actor_and_values(users: dict[str, As], tenants: dict[str, dict]) -> None:
    pat = users["pat"]
    pat.post("/admin/api/tenants/globex/suspend")
    pat.post("/admin/api/tenants/globex/resume")
    events = pat.get(
        "/admin/api/audit/events", params={"tenant": "globex", "kind": "admin", "actor": "oidc:pat"}
    ).json()
    suspend = next(e for e in events if e["payload"]["action"] == "tenant.suspend")
    assert suspend["actor"] == "oidc:pat" and suspend["tenant_id"] == tenants["globex"]["id"]
    assert suspend["payload"]["before"] == {"status": "active"}
    assert suspend["payload"]["after"] == {"status": "suspended"}
    created = next(e for e in events if e["payload"]["action"] == "tenant.create")
    assert created["payload"]["after"]["limits"]["requests_per_minute"] == 100


def test_content_logging_is_set_through_the_api_and_audited(users: dict[str, As], tenants: dict[str, dict]) -> None:
    pat = users["pat"]
    made = pat.post("/admin/api/tenants", json={"name": "logged-co", "log_content": True})
    assert made.status_code == 201 and made.json()["log_content"] is True
    assert pat.get("/admin/api/tenants/globex").json()["log_content"] is False
    changed = pat.patch("/admin/api/tenants/globex", json={"log_content": True})
    assert changed.status_code == 200 and changed.json()["log_content"] is True
    assert pat.patch("/admin/api/tenants/globex", json={"log_content": "sometimes"}).status_code == 422
    events = pat.get("/admin/api/audit/events", params={"tenant": "globex", "kind": "admin"}).json()
    update = next(e for e in events if e["payload"]["action"] == "tenant.update")
    assert (update["payload"]["before"]["log_content"], update["payload"]["after"]["log_content"]) == (False, True)
    assert update["actor"] == "oidc:pat"
    assert pat.patch("/admin/api/tenants/globex", json={"log_content": False}).json()["log_content"] is False


def test_tenant_admin_sees_only_their_tenant(users: dict[str, As], tenants: dict[str, dict]) -> None:
    alice, pat = users["alice"], users["pat"]
    assert [t["name"] for t in alice.get("/admin/api/tenants").json()] == ["acme"]
    assert alice.get("/admin/api/tenants/acme").status_code == 200
    globex_key = pat.post("/admin/api/tenants/globex/keys", json={"name": "b"}).json()["key"]["id"]
    for url in (
        "/admin/api/tenants/globex",
        f"/admin/api/tenants/{tenants['globex']['id']}",
        "/admin/api/tenants/globex/keys",
        "/admin/api/tenants/globex/usage",
        "/admin/api/tenants/globex/limits",
        f"/admin/api/tenants/globex/keys/{globex_key}/limits",
    ):
        error(alice.get(url), 404, "not_found")
    error(alice.get("/admin/api/audit/events", params={"tenant": "globex"}), 404)
    error(alice.post("/admin/api/audit/exports", json={"tenant": "globex"}), 404)
    error(alice.post("/admin/api/tenants/globex/keys", json={}), 404)
    error(alice.post(f"/admin/api/tenants/globex/keys/{globex_key}/revoke"), 404)
    error(alice.post(f"/admin/api/tenants/acme/keys/{globex_key}/revoke"), 404)  # B's key under A's name
    # ... and the same answers as for a tenant that does not exist.
    assert alice.get("/admin/api/tenants/globex").json() == alice.get("/admin/api/tenants/nope").json()


def test_tenant_admin_manages_own_keys_within_caps(users: dict[str, As], tenants: dict[str, dict]) -> None:
    alice = users["alice"]
    created = alice.post("/admin/api/tenants/acme/keys", json={"name": "alice-key"})
    assert created.status_code == 201
    key_id = created.json()["key"]["id"]
    ok = alice.put(f"/admin/api/tenants/acme/keys/{key_id}/limits", json={"requests_per_minute": 60})
    assert ok.status_code == 200
    assert alice.get(f"/admin/api/tenants/acme/keys/{key_id}/limits").json()["requests_per_minute"] == 60
    over = alice.put(f"/admin/api/tenants/acme/keys/{key_id}/limits", json={"tokens_per_minute": 20_000})
    assert error(over, 422, "over_cap")["message"].endswith("tokens_per_minute")
    error(alice.put("/admin/api/tenants/acme/limits", json={"requests_per_minute": 1000}), 403, "forbidden")
    assert alice.get("/admin/api/tenants/acme/limits").json()["requests_per_minute"] == 100
    assert alice.get("/admin/api/tenants/acme/usage").status_code == 200
    assert alice.post(f"/admin/api/tenants/acme/keys/{key_id}/revoke").status_code == 200
    own_events = alice.get("/admin/api/audit/events").json()
    assert own_events and {e["tenant_id"] for e in own_events} == {tenants["acme"]["id"]}


def test_tenant_admin_denied_platform_actions(users: dict[str, As], tenants: dict[str, dict]) -> None:
    alice = users["alice"]
    error(alice.post("/admin/api/tenants", json={"name": "evil"}), 403, "forbidden")
    error(alice.post("/admin/api/tenants/acme/suspend"), 403)
    error(alice.patch("/admin/api/tenants/acme", json={"allowed_models": []}), 403)
    error(alice.get("/admin/api/pool"), 403)
    error(alice.post("/admin/api/pool/plan", json={}), 403)


def test_auditor_reads_and_exports_audit_only(users: dict[str, As], tenants: dict[str, dict]) -> None:
    audrey = users["audrey"]
    events = audrey.get("/admin/api/audit/events", params={"limit": 500}).json()
    assert {tenants["acme"]["id"], tenants["globex"]["id"]} <= {e["tenant_id"] for e in events}
    assert audrey.get("/admin/api/audit/events", params={"tenant": "globex"}).status_code == 200
    export = audrey.post("/admin/api/audit/exports", json={"format": "jsonl", "tenant": "acme"})
    assert export.status_code == 201, export.text
    download = audrey.get(export.json()["download"])
    assert download.status_code == 200 and download.headers["content-type"] == "application/zip"
    names = zipfile.ZipFile(io.BytesIO(download.content)).namelist()
    assert {"events.jsonl", "manifest.json", "manifest.sig", "checkpoints.jsonl"} == {n.split("/")[-1] for n in names}
    for method, url in (
        ("get", "/admin/api/tenants"),
        ("get", "/admin/api/tenants/acme"),
        ("get", "/admin/api/tenants/acme/keys"),
        ("post", "/admin/api/tenants/acme/keys"),
        ("get", "/admin/api/tenants/acme/usage"),
        ("post", "/admin/api/tenants"),
        ("get", "/admin/api/pool"),
    ):
        error(getattr(audrey, method)(url, **({"json": {"name": "z"}} if method == "post" else {})), 403)
    exports = users["pat"].get("/admin/api/audit/events", params={"kind": "export"}).json()
    assert any(e["actor"] == "oidc:audrey" and e["payload"]["rows"] > 0 for e in exports)


def test_tenant_admin_export_is_scoped(users: dict[str, As], tenants: dict[str, dict]) -> None:
    alice, bob = users["alice"], users["bob"]
    export = alice.post("/admin/api/audit/exports", json={"format": "csv"})
    assert export.status_code == 201 and export.json()["tenant_id"] == tenants["acme"]["id"]
    assert alice.get(export.json()["download"]).status_code == 200
    error(bob.get(export.json()["download"]), 404)
    error(bob.get("/admin/api/audit/exports/doesnotexist"), 404)
    manifest = zipfile.ZipFile(io.BytesIO(alice.get(export.json()["download"]).content))
    meta = json.loads(next(manifest.read(n) for n in manifest.namelist() if n.endswith("manifest.json")))
    assert meta["tenant"] == tenants["acme"]["id"]


def test_users_without_roles_or_tenant_get_nothing(users: dict[str, As], tenants: dict[str, dict]) -> None:
    assert users["nobody"].get("/admin/api/me").json()["roles"] == []
    for user in ("nobody", "tina"):
        error(users[user].get("/admin/api/tenants"), 403)
        error(users[user].get("/admin/api/audit/events"), 403)
        error(users[user].get("/admin/api/tenants/acme/keys"), 403)
    assert users["carol"].get("/admin/api/tenants").status_code == 200  # platform-admin as a client role


def test_pool_status_and_capacity(users: dict[str, As]) -> None:
    pat = users["pat"]
    pool = pat.get("/admin/api/pool").json()
    assert pool["profiles"]["fast-agentic"]["speculation"] == "mtp"
    fast = next(d for d in pool["deployments"] if d["name"] == "m1@fast-agentic")
    assert fast["live"][0]["acceptance_rate"] == 0.72 and fast["live"][0]["queue_depth"] == 2
    assert pat.get("/admin/api/pool/acceptance").json().keys() == {"periods", "profiles"}
    plans = pat.post("/admin/api/pool/plan", json={"gpus": ["rtx3090"]}).json()
    by_profile = {p["profile"]: p for p in plans}
    assert by_profile["deep-context"]["kv_tokens"] > by_profile["fast-agentic"]["kv_tokens"]
    assert by_profile["fast-agentic"]["speedup"] > 1
    assert pat.get("/admin/api/pool/capacity").json() == []  # the test models have no config.json on disk


def test_openapi_documents_the_admin_api(api: httpx.Client) -> None:
    paths = api.get("/admin/api/openapi.json").json()["paths"]
    for path in (
        "/admin/api/tenants",
        "/admin/api/tenants/{tenant}/keys",
        "/admin/api/tenants/{tenant}/keys/{key}/rotate",
        "/admin/api/tenants/{tenant}/limits",
        "/admin/api/tenants/{tenant}/usage",
        "/admin/api/audit/events",
        "/admin/api/audit/exports/{export_id}",
        "/admin/api/pool",
        "/admin/api/pool/plan",
    ):
        assert path in paths
    assert not any(p.startswith("/console") for p in paths)
    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/readyz").status_code == 200
    assert "bastion_control_requests_total" in api.get("/metrics").text
