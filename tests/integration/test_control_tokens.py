"""Bearer tokens at the admin API against a real OpenID Connect provider with Keycloak's URL layout: good tokens
pass; forged, expired, not-yet-valid, wrong-issuer, wrong-audience, `alg: none` and HS256 tokens are refused
with the JSON error format; a rotated realm signing key is picked up from the JWKS."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "oidc"))
import idp_harness as h

from bastion.control.app import create_app
from bastion.db import migrate

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def idp(tmp_path_factory: pytest.TempPathFactory) -> h.TestIdp:
    return h.shared_idp(tmp_path_factory.mktemp("idp"))


@pytest.fixture(scope="module")
def api(idp: h.TestIdp, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    tmp = tmp_path_factory.mktemp("control-tokens")
    url = f"sqlite+aiosqlite:///{tmp / 'bastion.db'}"
    migrate.upgrade(url)
    config = h.platform_config(tmp, url, idp.issuer)
    app = create_app(config, settings=h.control_settings(config, jwks_refresh_interval_s=0.5))
    with h.ServerThread(app, h.free_port()) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        client.app = app  # type: ignore[attr-defined]
        yield client


def me(api: httpx.Client, token: str) -> httpx.Response:
    return api.get("/admin/api/me", headers={"Authorization": f"Bearer {token}"})


def refused(response: httpx.Response, reason: str) -> None:
    assert response.status_code == 401, response.text
    body = response.json()
    assert body["error"]["code"] == "unauthorized"
    assert reason in body["error"]["message"]
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_provider_token_is_accepted_with_roles(api: httpx.Client, idp: h.TestIdp) -> None:
    response = me(api, idp.token("alice"))
    assert response.status_code == 200, response.text
    assert response.json() == {"username": "alice", "roles": ["tenant-admin"], "tenant": "acme", "via": "oidc"}
    client_role = me(api, idp.token("carol")).json()
    assert client_role["roles"] == ["platform-admin"]  # from resource_access.<client>.roles


def test_provider_refuses_wrong_password(idp: h.TestIdp) -> None:
    with pytest.raises(httpx.HTTPStatusError):
        idp.token("alice", password="wrong")


def test_missing_and_malformed_tokens(api: httpx.Client) -> None:
    refused(api.get("/admin/api/tenants"), "authentication required")
    refused(api.get("/admin/api/tenants", headers={"Authorization": "Basic YTpi"}), "Bearer")
    refused(me(api, "not-a-jwt"), "malformed")


def test_forged_signature_is_refused(api: httpx.Client, idp: h.TestIdp) -> None:
    attacker = h.new_key(idp.key.get("kid"))  # same kid, different key
    refused(me(api, idp.sign(idp.claims("pat"), key=attacker)), "signature")
    good = idp.sign(idp.claims("pat"))
    assert me(api, good).status_code == 200
    header, _body, sig = good.split(".")
    tampered = idp.sign(idp.claims("alice")).split(".")[1]
    refused(me(api, f"{header}.{tampered}.{sig}"), "signature")


def test_expired_and_not_yet_valid_tokens_are_refused(api: httpx.Client, idp: h.TestIdp) -> None:
    now = int(time.time())
    refused(me(api, idp.sign(idp.claims("pat", iat=now - 900, exp=now - 120))), "expired")
    refused(me(api, idp.sign(idp.claims("pat", nbf=now + 600, exp=now + 900))), "not yet valid")
    claims = idp.claims("pat")
    del claims["exp"]
    refused(me(api, idp.sign(claims)), "required claim")


def test_wrong_issuer_and_audience_are_refused(api: httpx.Client, idp: h.TestIdp) -> None:
    other_realm = idp.issuer.replace("/realms/bastion", "/realms/other")
    refused(me(api, idp.sign(idp.claims("pat", iss=other_realm))), "issuer")
    refused(me(api, idp.sign(idp.claims("pat", aud="account"))), "audience")
    assert me(api, idp.sign(idp.claims("pat", aud=["account", h.AUDIENCE]))).status_code == 200


def test_alg_none_and_hmac_tokens_are_refused(api: httpx.Client, idp: h.TestIdp) -> None:
    refused(me(api, h.unsigned(idp, idp.claims("pat"))), "algorithm")
    refused(me(api, h.forged_hs256(idp, idp.claims("pat"))), "algorithm")


def test_unknown_kid_is_refused(api: httpx.Client, idp: h.TestIdp) -> None:
    stranger = h.new_key("never-published")
    refused(me(api, idp.sign(idp.claims("pat"), key=stranger)), "unknown key")


def test_rotated_signing_key_is_picked_up(api: httpx.Client, idp: h.TestIdp) -> None:
    verifier = api.app.state.control.verifier  # type: ignore[attr-defined]
    before = idp.token("pat")
    assert me(api, before).status_code == 200
    fetches = verifier.fetches
    time.sleep(0.6)  # past the refetch rate limit (0.5 s in this app)
    new = idp.rotate(f"test-key-{int(time.time() * 1000)}")
    after = idp.token("pat")
    assert after.split(".")[0] != before.split(".")[0]  # the header names the new kid
    assert me(api, after).status_code == 200, "the new key was not fetched on its unknown kid"
    assert verifier.fetches == fetches + 1
    assert me(api, after).status_code == 200 and verifier.fetches == fetches + 1  # cached now
    time.sleep(0.6)
    # A token signed with the retired key: its kid left the JWKS, so it is refused.
    refused(me(api, idp.sign(idp.claims("pat"), key=idp.retired[-1])), "unknown key")
    assert new.get("kid") in verifier._keys
