"""Security on real PostgreSQL and Redis: the per-address limiter of refused credentials (gateway keys, admin
bearer tokens, the console's local password), CORS off, the console's security headers, and the gateway's
cross-tenant isolation on every route of its OpenAPI document. The admin API's per-route cross-tenant table is
in test_cross_tenant.py."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from apitest_support import GENEROUS, h

from bastion.bench.doubles import ScriptedEngine, Stack, gateway_stack, platform_config, upstreams_for
from bastion.config.schema import PlatformConfig
from bastion.control.app import create_app as create_control_app
from bastion.db import migrate
from bastion.errors import ConfigError
from bastion.gateway.openapi import document

pytestmark = pytest.mark.integration
CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
LIMIT = 4


def with_auth(config: PlatformConfig, **auth: object) -> PlatformConfig:
    data = config.model_dump(mode="json", exclude_unset=True)
    data["auth"] = {**data.get("auth", {}), **auth}
    return PlatformConfig.model_validate(data)


@pytest.fixture
def pg(pg_url: str) -> str:
    migrate.upgrade(pg_url)
    return pg_url


def client_at(stack: Stack, address: str, token: str | None = None) -> httpx.AsyncClient:
    """A client whose requests come from `address` (the limiter's key is the TCP peer)."""
    transport = httpx.ASGITransport(app=stack.app, client=(address, 40000))
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(transport=transport, base_url="http://gateway.test", headers=headers)


@pytest.fixture
async def stacks(tmp_path: Path, pg: str, redis_url: str) -> AsyncIterator[tuple[Stack, Stack]]:
    """Two gateway replicas over one PostgreSQL and one Redis, refusing an address after LIMIT bad keys."""
    config = with_auth(
        platform_config(str(tmp_path), pg, ["m1", "m2"], redis_url=redis_url),
        failed_auth_limit=LIMIT,
        failed_auth_window_s=60,
    )
    engines = ScriptedEngine(upstreams_for(["m1", "m2"])), ScriptedEngine(upstreams_for(["m1", "m2"]))
    async with gateway_stack(config, engines[0]) as one, gateway_stack(config, engines[1]) as two:
        yield one, two


async def new_key(stack: Stack, **tenant: object) -> tuple[str, str]:
    name = f"sec-{uuid.uuid4().hex[:8]}"
    await stack.tenants().create(name, limits=GENEROUS, **tenant)
    return name, (await stack.keys().create(name, scopes=["inference", "usage:read"])).token


async def test_gateway_throttles_an_address_after_refused_keys(
    stacks: tuple[Stack, Stack], caplog: pytest.LogCaptureFixture
) -> None:
    one, two = stacks
    _tenant, good = await new_key(one)
    bad = good[:-6] + "AAAAAA"  # the right prefix, a wrong secret
    attacker = "10.1.1.1"
    async with client_at(one, attacker) as anonymous:
        for _ in range(3):  # no credential at all is not a guess: never counted
            assert (await anonymous.get("/v1/models")).status_code == 401
    caplog.set_level(logging.WARNING)
    async with client_at(one, attacker, bad) as guesser:
        for _ in range(LIMIT):
            response = await guesser.post("/v1/chat/completions", json=CHAT)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        throttled = await guesser.post("/v1/chat/completions", json=CHAT)
    assert throttled.status_code == 429, throttled.text
    assert throttled.json()["error"]["code"] == "too_many_auth_failures"
    assert 1 <= int(throttled.headers["retry-after"]) <= 60
    async with client_at(one, attacker, good) as same_address:  # blocked even with a valid key, every route
        assert (await same_address.post("/v1/chat/completions", json=CHAT)).status_code == 429
        assert (await same_address.get("/v1/usage")).status_code == 429
    async with client_at(one, "10.2.2.2", good) as bystander:  # another address is not affected
        assert (await bystander.post("/v1/chat/completions", json=CHAT)).status_code == 200
    async with client_at(two, attacker, bad) as elsewhere:  # the count is in Redis: the other replica knows
        assert (await elsewhere.get("/v1/models")).status_code == 429
    metrics = await one.scrape()
    assert re.search(r'bastion_auth_failures_total\{outcome="refused",service="gateway"\} [1-9]', metrics), metrics
    assert re.search(r'bastion_auth_failures_total\{outcome="throttled",service="gateway"\} [1-9]', metrics)
    warnings = [r.getMessage() for r in caplog.records if "too many refused credentials" in r.getMessage()]
    assert warnings and attacker in warnings[0]
    assert not any(good.rsplit("_", 1)[1] in r.getMessage() or bad in r.getMessage() for r in caplog.records)


async def test_gateway_metrics_are_for_prometheus_only(tmp_path: Path, pg: str) -> None:
    """Metrics carry every tenant's id and usage: a tenant's key (or none) sees an unknown path there."""
    config = platform_config(str(tmp_path), pg, ["m1"])
    async with gateway_stack(config, ScriptedEngine(upstreams_for(["m1"]))) as stack:
        name, key = await new_key(stack)
        tenant_id = (await stack.tenants().get(name)).id
        assert (await stack.client.post("/v1/chat/completions", json=CHAT, headers=_bearer(key))).status_code == 200
        for headers in ({}, _bearer(key), _bearer("x" * 64), {"authorization": "Basic " + "x" * 64}):
            refused = await stack.client.get("/metrics", headers=headers)
            assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found"
        token = tmp_path / "pool_stats_token"  # the internal token by default (telemetry.metrics_token_file)
        assert len(token.read_text().strip()) >= 32 and token.stat().st_mode & 0o077 == 0
        assert f'tenant="{tenant_id}"' in await stack.scrape()


async def test_a_configured_metrics_token_file_is_the_one_prometheus_sends(tmp_path: Path, pg: str) -> None:
    token_file = tmp_path / "prometheus-token"
    token_file.write_text("p" * 40 + "\n")
    data = platform_config(str(tmp_path), pg, ["m1"]).model_dump(mode="json", exclude_unset=True)
    data["telemetry"] = {"metrics_token_file": str(token_file)}
    async with gateway_stack(PlatformConfig.model_validate(data), ScriptedEngine(upstreams_for(["m1"]))) as stack:
        assert not (tmp_path / "pool_stats_token").exists()  # the configured file replaces the internal token
        assert (await stack.client.get("/metrics", headers=_bearer("q" * 40))).status_code == 404
        assert (await stack.client.get("/metrics", headers=_bearer("p" * 40))).status_code == 200
    token_file.write_text("short")
    with pytest.raises(ConfigError, match=r"telemetry\.metrics_token_file: .* fewer than 32"):
        async with gateway_stack(PlatformConfig.model_validate(data), ScriptedEngine(upstreams_for(["m1"]))):
            pass


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def test_gateway_limiter_without_redis_is_per_process(tmp_path: Path, pg: str) -> None:
    config = with_auth(platform_config(str(tmp_path), pg, ["m1"]), failed_auth_limit=2)
    async with gateway_stack(config, ScriptedEngine(upstreams_for(["m1"]))) as stack:
        guesser = client_at(stack, "10.3.3.3", "bst_0123456789ab_" + "x" * 43)
        codes = [(await guesser.get("/v1/models")).status_code for _ in range(4)]
        await guesser.aclose()
    assert codes == [401, 401, 429, 429]


@pytest.fixture(scope="session")
def idp(tmp_path_factory: pytest.TempPathFactory) -> h.TestIdp:
    return h.shared_idp(tmp_path_factory.mktemp("idp"))


def control_client(app, address: str, token: str | None = None) -> httpx.AsyncClient:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    transport = httpx.ASGITransport(app=app, client=(address, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://control.test", headers=headers)


async def test_admin_api_throttles_an_address_after_refused_tokens(
    tmp_path: Path, pg: str, redis_url: str, idp: h.TestIdp
) -> None:
    config = h.platform_config(tmp_path, pg, idp.issuer)
    data = config.model_dump(mode="json", exclude_unset=True)
    data["redis"] = {"url": redis_url}
    data["auth"] = {**data["auth"], "failed_auth_limit": LIMIT}
    config = PlatformConfig.model_validate(data)
    app = create_control_app(config, settings=h.control_settings(config))
    forged = h.forged_hs256(idp, idp.claims("pat"))
    async with control_client(app, "10.4.4.4", forged) as guesser:
        codes = [(await guesser.get("/admin/api/me")).status_code for _ in range(LIMIT + 1)]
        assert codes == [401] * LIMIT + [429]
        throttled = await guesser.get("/admin/api/tenants")
    assert throttled.status_code == 429 and throttled.json()["error"]["code"] == "too_many_auth_failures"
    assert int(throttled.headers["retry-after"]) >= 1
    good = idp.token("pat")
    async with control_client(app, "10.4.4.4", good) as same_address:
        assert (await same_address.get("/admin/api/me")).status_code == 429
    async with control_client(app, "10.5.5.5", good) as bystander:
        assert (await bystander.get("/admin/api/me")).status_code == 200
    async with control_client(app, "10.5.5.5") as anonymous:
        metrics = (await anonymous.get("/metrics")).text
    assert 'bastion_auth_failures_total{outcome="throttled",service="control"}' in metrics


async def test_console_local_login_is_throttled_per_address(tmp_path: Path, pg: str) -> None:
    config = with_auth(h.platform_config(tmp_path, pg, None), failed_auth_limit=2)
    app = create_control_app(config, settings=h.control_settings(config), announce_local_password=False)
    async with control_client(app, "10.6.6.6") as browser:
        page = await browser.get("/login")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
        form = {"username": "admin", "password": "not-the-password", "csrf_token": csrf}
        codes = [(await browser.post("/login", data=form)).status_code for _ in range(3)]
    assert codes == [401, 401, 429]


# --- CORS and headers -----------------------------------------------------------------------------------


async def test_cors_is_off_on_the_gateway_and_the_control_plane(tmp_path: Path, pg: str) -> None:
    preflight = {"origin": "https://evil.example", "access-control-request-method": "POST"}
    config = platform_config(str(tmp_path), pg, ["m1"])
    async with gateway_stack(config, ScriptedEngine(upstreams_for(["m1"]))) as stack:
        _tenant, token = await new_key(stack)
        answers = [
            await stack.client.options("/v1/chat/completions", headers=preflight),
            await stack.client.post(
                "/v1/chat/completions",
                json=CHAT,
                headers={"origin": "https://evil.example", "authorization": f"Bearer {token}"},
            ),
        ]
    control = h.platform_config(tmp_path / "control", pg, None)
    app = create_control_app(control, settings=h.control_settings(control), announce_local_password=False)
    async with control_client(app, "10.7.7.7") as client:
        answers.append(await client.options("/admin/api/tenants", headers=preflight))
        answers.append(await client.get("/admin/api/me", headers={"origin": "https://evil.example"}))
    assert answers[1].status_code == 200
    for answer in answers:
        assert not any(k.lower().startswith("access-control-") for k in answer.headers), answer.headers


@pytest.mark.parametrize("secure", [True, False])
async def test_console_security_headers(tmp_path: Path, pg: str, secure: bool) -> None:
    config = h.platform_config(tmp_path, pg, None)
    settings = h.control_settings(config, cookie_secure=secure)
    app = create_control_app(config, settings=settings, announce_local_password=False)
    async with control_client(app, "10.8.8.8") as client:
        for path in ("/login", "/console/tenants", "/admin/api/openapi.json", "/admin/api/nowhere"):
            headers = (await client.get(path)).headers
            csp = headers["content-security-policy"]
            assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
            assert headers["x-frame-options"] == "DENY"
            assert headers["x-content-type-options"] == "nosniff"
            assert headers["referrer-policy"] == "no-referrer"
            assert headers["cache-control"] == "no-store"
            assert ("strict-transport-security" in headers) is secure, path
            if secure:
                assert headers["strict-transport-security"].startswith("max-age=")


# --- cross-tenant isolation on every gateway route ------------------------------------------------------


async def _usage_of(stack: Stack, token: str) -> httpx.Response:
    return await stack.client.get("/v1/usage", headers={"authorization": f"Bearer {token}"})


async def _models_of(stack: Stack, token: str) -> httpx.Response:
    return await stack.client.get("/v1/models", headers={"authorization": f"Bearer {token}"})


async def test_every_gateway_route_keeps_tenants_apart(tmp_path: Path, pg: str) -> None:
    """Tenant A (m1 only) and B (m2 only), both with traffic: each sees only itself on every route of the
    OpenAPI document; a route added without an entry here fails this test."""
    config = platform_config(str(tmp_path), pg, ["m1", "m2"])
    async with gateway_stack(config, ScriptedEngine(upstreams_for(["m1", "m2"]))) as stack:
        a, key_a = await new_key(stack, allowed_models=["m1"])
        b, key_b = await new_key(stack, allowed_models=["m2"])
        auth = {key_a: {"authorization": f"Bearer {key_a}"}, key_b: {"authorization": f"Bearer {key_b}"}}
        for key, model in ((key_a, "m1"), (key_b, "m2")):
            ok = await stack.client.post("/v1/chat/completions", json={**CHAT, "model": model}, headers=auth[key])
            assert ok.status_code == 200, ok.text

        async def completions(path: str) -> None:
            body = {**CHAT, "model": "m2"} if path.endswith("chat/completions") else {"model": "m2", "prompt": "x"}
            for model in ("m2", "m2@deep-context", "m2@fast-agentic"):  # B's model, any spelling
                answer = await stack.client.post(path, json={**body, "model": model}, headers=auth[key_a])
                assert answer.status_code == 403 and answer.json()["error"]["code"] == "model_not_allowed"

        async def models(_path: str) -> None:
            ids = {m["id"].split("@")[0] for m in (await _models_of(stack, key_a)).json()["data"]}
            assert ids == {"m1"}

        async def usage(_path: str) -> None:
            for key, name, model in ((key_a, a, "m1"), (key_b, b, "m2")):
                body = (await _usage_of(stack, key)).json()
                assert body["tenant"] == name and body["data"], body
                assert {row["model"] for row in body["data"]} == {model}
            assert (await stack.client.get("/v1/usage", params={"tenant": b}, headers=auth[key_a])).json()[
                "tenant"
            ] == a  # no parameter selects another tenant

        async def one_model(_path: str) -> None:
            mine = await stack.client.get("/v1/models/m1", headers=auth[key_a])
            assert mine.status_code == 200 and mine.json()["id"] == "m1", mine.text
            theirs = await stack.client.get("/v1/models/m2", headers=auth[key_a])  # same 404 as an unknown name
            assert theirs.status_code == 404 and theirs.json()["error"]["code"] == "model_not_found", theirs.text

        async def messages(path: str) -> None:
            body = {"model": "m2", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}
            answer = await stack.client.post(path, json=body, headers={"x-api-key": key_a})
            assert answer.status_code == 403 and answer.json()["type"] == "error", answer.text
            assert answer.json()["error"]["type"] == "permission_error"

        async def healthz(_path: str) -> None:
            assert (await stack.client.get("/healthz")).json() == {"status": "ok"}  # no tenant data at all

        checks = {  # usage first: A's own refused tries at m2 below are (rightly) counted in A's usage
            "/v1/usage": usage,
            "/v1/models": models,
            "/v1/models/{model}": one_model,
            "/v1/messages": messages,
            "/healthz": healthz,
            "/v1/chat/completions": completions,
            "/v1/completions": completions,
        }
        documented = set(document()["paths"])
        assert documented == set(checks), f"routes without a cross-tenant check: {documented - set(checks)}"
        served = {r.path.replace(":path}", "}") for r in stack.app.routes if getattr(r, "path", "").startswith("/v1/")}
        assert served <= documented, f"served but not documented: {served - documented}"
        for path, check in checks.items():
            await check(path)


async def test_the_guard_fails_open_when_redis_is_unreachable() -> None:
    """A dead limiter store must not turn a 401 into a 500 or lock everyone out."""
    from bastion.tenancy.auth_failure_guard import AuthFailureGuard

    guard = AuthFailureGuard("redis://127.0.0.1:1/0", 1, 60, service="gateway")
    assert [await guard.failed("10.9.9.9") for _ in range(3)] == [None, None, None]
    assert guard.retry_after("10.9.9.9") is None
