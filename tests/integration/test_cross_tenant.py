"""Cross-tenant access on every admin API operation of the OpenAPI document (PostgreSQL, tokens from the OIDC
test provider): alice, tenant-admin of acme, aims each operation at globex's tenant, keys and exports. Each
answer must be the same as for a tenant that does not exist (nothing is disclosed), never a success, and
globex must be unchanged afterwards. An operation missing from the table below fails the test, so a new
endpoint cannot ship without deciding its cross-tenant answer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx
import pytest
from apitest_support import fresh_pg, h

from bastion.control.app import create_app

pytestmark = pytest.mark.integration
TENANT_SCOPED = "{tenant}"
# Operations without a {tenant} in the path: what alice gets when she asks about globex through them.
GLOBAL_ROUTES: dict[tuple[str, str], tuple[int, dict | None, dict | None]] = {
    # (method, path): (status, query, body)
    ("GET", "/admin/api/me"): (200, None, None),
    ("GET", "/admin/api/tenants"): (200, None, None),
    ("POST", "/admin/api/tenants"): (403, None, {"name": "evil"}),
    ("GET", "/admin/api/audit/events"): (404, {"tenant": "globex"}, None),
    ("POST", "/admin/api/audit/exports"): (404, None, {"tenant": "globex"}),
    ("GET", "/admin/api/audit/exports/{export_id}"): (404, None, None),
    ("GET", "/admin/api/pool"): (403, None, None),
    ("GET", "/admin/api/pool/acceptance"): (403, None, None),
    ("GET", "/admin/api/pool/capacity"): (403, None, None),
    ("GET", "/admin/api/pool/live"): (403, None, None),
    ("POST", "/admin/api/pool/plan"): (403, None, {}),
}
BODIES = {
    ("PATCH", "/admin/api/tenants/{tenant}"): {"allowed_models": []},
    ("PUT", "/admin/api/tenants/{tenant}/limits"): {"requests_per_minute": 10},
    ("PUT", "/admin/api/tenants/{tenant}/keys/{key}/limits"): {"requests_per_minute": 10},
    ("POST", "/admin/api/tenants/{tenant}/keys"): {"name": "stolen"},
    ("POST", "/admin/api/tenants/{tenant}/keys/{key}/rotate"): {"grace_seconds": 0},
}


@dataclass
class World:
    app: object
    alice: str
    pat: str
    globex_key: str
    acme_id: str
    export_id: str


def client(world: World, token: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=world.app)  # type: ignore[arg-type]
    headers = {"authorization": f"Bearer {token}"}
    return httpx.AsyncClient(transport=transport, base_url="http://control.test", headers=headers, timeout=30)


@pytest.fixture(scope="session")
def idp(tmp_path_factory: pytest.TempPathFactory) -> h.TestIdp:
    return h.shared_idp(tmp_path_factory.mktemp("idp"))


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with fresh_pg() as url:  # a database of its own: the session's one has an acme and a globex already
        yield url


@pytest.fixture(scope="module")
async def world(idp: h.TestIdp, database: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    config = h.platform_config(tmp_path_factory.mktemp("cross-tenant"), database, idp.issuer)
    app = create_app(config, settings=h.control_settings(config))
    async with app.router.lifespan_context(app):
        pat = idp.token("pat")
        w = World(app, idp.token("alice"), pat, "", "", "")
        async with client(w, pat) as admin:
            made = {}
            for name in ("acme", "globex"):
                response = await admin.post("/admin/api/tenants", json={"name": name})
                assert response.status_code == 201, response.text
                made[name] = response.json()
            key = await admin.post("/admin/api/tenants/globex/keys", json={"name": "b"})
            export = await admin.post("/admin/api/audit/exports", json={"tenant": "globex"})
            assert key.status_code == 201 and export.status_code == 201, export.text
        w.globex_key, w.acme_id, w.export_id = key.json()["key"]["id"], made["acme"]["id"], export.json()["id"]
        yield w


def _operations(app) -> list[tuple[str, str]]:
    paths = app.openapi()["paths"]
    return sorted((method.upper(), path) for path, item in paths.items() for method in item if method != "parameters")


def _url(path: str, tenant: str, world: World) -> str:
    return path.replace("{tenant}", tenant).replace("{key}", world.globex_key).replace("{export_id}", world.export_id)


async def test_the_table_covers_every_operation(world: World) -> None:
    operations = _operations(world.app)
    uncovered = [op for op in operations if TENANT_SCOPED not in op[1] and op not in GLOBAL_ROUTES]
    assert not uncovered, f"admin operations without a cross-tenant expectation: {uncovered}"
    assert sum(TENANT_SCOPED in op[1] for op in operations) >= 12


async def _snapshot(pat: httpx.AsyncClient) -> list:
    return [(await pat.get(f"/admin/api/tenants/globex{part}")).json() for part in ("", "/keys", "/limits")]


async def test_tenant_admin_reaches_nothing_of_another_tenant(world: World) -> None:
    async with client(world, world.alice) as alice, client(world, world.pat) as pat:
        before = (
            (await pat.get("/admin/api/tenants/globex/keys")).json(),
            (await pat.get("/admin/api/tenants/globex")).json(),
        )
        tried = 0
        for method, path in _operations(world.app):
            if TENANT_SCOPED not in path:
                continue
            body = BODIES.get((method, path))
            answers = []
            for tenant in ("globex", "no-such-tenant"):
                answers.append(await alice.request(method, _url(path, tenant, world), json=body))
            theirs, nobodys = answers
            assert theirs.status_code in (403, 404), (method, path, theirs.status_code, theirs.text)
            assert (theirs.status_code, theirs.json()) == (nobodys.status_code, nobodys.json()), (method, path)
            if "{key}" in path:  # globex's key under alice's own tenant name
                under_acme = await alice.request(method, _url(path, "acme", world), json=body)
                assert under_acme.status_code in (403, 404), (method, path, under_acme.text)
            tried += 1
        after = (
            (await pat.get("/admin/api/tenants/globex/keys")).json(),
            (await pat.get("/admin/api/tenants/globex")).json(),
        )
    assert tried >= 12
    assert before == after, "globex changed"


async def test_routes_without_a_tenant_in_the_path_are_scoped(world: World) -> None:
    async with client(world, world.alice) as alice:
        for (method, path), (status, query, body) in GLOBAL_ROUTES.items():
            answer = await alice.request(method, _url(path, "globex", world), params=query, json=body)
            assert answer.status_code == status, (method, path, answer.text)
        assert [t["name"] for t in (await alice.get("/admin/api/tenants")).json()] == ["acme"]
        assert (await alice.get("/admin/api/me")).json()["tenant"] == "acme"
        events = (await alice.get("/admin/api/audit/events", params={"limit": 500})).json()
        assert {e["tenant_id"] for e in events} <= {world.acme_id}
