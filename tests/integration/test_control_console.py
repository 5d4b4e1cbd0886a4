"""The console over HTTP: the authorization-code + PKCE login through the provider's login page, the session
cookie's attributes, CSRF on forms and on cookie-authenticated API calls, security headers, roles on pages,
and the embedded default's local admin (password printed once, stored hashed, refused in production)."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "oidc"))
import idp_harness as h

from bastion.control.app import create_app
from bastion.control.local_admin import FILE_NAME
from bastion.control.settings import ControlSettings
from bastion.db import migrate
from bastion.errors import ConfigError

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def idp(tmp_path_factory: pytest.TempPathFactory) -> h.TestIdp:
    return h.shared_idp(tmp_path_factory.mktemp("idp"))


@pytest.fixture(scope="module")
def console(idp: h.TestIdp, tmp_path_factory: pytest.TempPathFactory) -> Iterator[h.ServerThread]:
    tmp = tmp_path_factory.mktemp("control-console")
    url = f"sqlite+aiosqlite:///{tmp / 'bastion.db'}"
    migrate.upgrade(url)
    config = h.platform_config(tmp, url, idp.issuer)
    app = create_app(config, settings=h.control_settings(config))
    with h.ServerThread(app, idp.console_port()) as server:
        yield server


def walk(client: httpx.Client, response: httpx.Response) -> tuple[httpx.Response, list[httpx.Response]]:
    """Follow redirects by hand, keeping every hop (to look at each Set-Cookie)."""
    hops = [response]
    while response.is_redirect:
        response = client.get(urljoin(str(response.url), response.headers["location"]))
        hops.append(response)
    return response, hops


def sign_in(console: h.ServerThread, user: str, password: str = h.PASSWORD) -> tuple[httpx.Client, list]:
    client = httpx.Client(base_url=console.url, timeout=15)
    page, _ = walk(client, client.get("/login"))
    assert page.status_code == 200 and "Sign in to bastion" in page.text, page.text
    action = re.search(r'<form method="post" action="([^"]+)"', page.text).group(1)
    posted = client.post(urljoin(str(page.url), action), data={"username": user, "password": password})
    final, hops = walk(client, posted)
    return client, [final, *hops]


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def test_login_with_pkce_sets_a_safe_session_cookie(console: h.ServerThread, idp: h.TestIdp) -> None:
    client = httpx.Client(base_url=console.url, timeout=15)
    start = client.get("/login")
    assert start.status_code == 303
    auth = urlsplit(start.headers["location"])
    assert f"{auth.scheme}://{auth.netloc}{auth.path}" == f"{idp.issuer}/protocol/openid-connect/auth"
    query = parse_qs(auth.query)
    assert query["code_challenge_method"] == ["S256"] and len(query["code_challenge"][0]) == 43
    assert query["redirect_uri"] == [f"{console.url}/auth/callback"] and query["state"] and query["nonce"]
    assert "httponly" in start.headers["set-cookie"].lower()

    client, hops = sign_in(console, "pat")
    final = hops[0]
    assert final.status_code == 200 and str(final.url).endswith("/console/tenants"), final.text
    assert "pat (platform-admin)" in final.text
    cookie = next(r.headers["set-cookie"] for r in hops if "bastion_session=" in r.headers.get("set-cookie", ""))
    attributes = {part.strip().lower() for part in cookie.split(";")}
    assert "httponly" in attributes and "samesite=lax" in attributes and "path=/" in attributes
    assert "secure" not in attributes  # plain http on loopback: BASTION_CONSOLE_COOKIE_SECURE=0 in this app
    assert client.get("/console/pool").status_code == 200


def test_wrong_password_at_the_provider_gives_no_session(console: h.ServerThread) -> None:
    client, hops = sign_in(console, "pat", password="nope")
    assert "Invalid username or password." in hops[0].text
    assert "bastion_session" not in client.cookies
    assert client.get("/console/tenants", follow_redirects=False).headers["location"] == "/login"


def test_callback_without_matching_state_is_refused(console: h.ServerThread) -> None:
    client = httpx.Client(base_url=console.url, timeout=15)
    client.get("/login")
    response = client.get("/auth/callback", params={"code": "x", "state": "forged"})
    assert response.status_code == 400 and "unknown or expired" in response.text
    assert "bastion_session" not in client.cookies


def test_security_headers(console: h.ServerThread) -> None:
    client, _hops = sign_in(console, "pat")
    for path in ("/console/tenants", "/console/audit", "/admin/api/openapi.json", "/login"):
        headers = client.get(path, follow_redirects=False).headers
        csp = headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"
    page = client.get("/console/tenants").text
    assert "<script>" not in page and " on" + "click=" not in page
    for label_for in re.findall(r'<label for="([^"]+)"', page):
        assert f'id="{label_for}"' in page  # every label names a real field


def test_forms_need_the_csrf_token(console: h.ServerThread) -> None:
    client, _hops = sign_in(console, "pat")
    denied = client.post("/console/tenants", data={"name": "csrf-victim"})
    assert denied.status_code == 403
    token = csrf_of(client.get("/console/tenants").text)
    made = client.post("/console/tenants", data={"name": "csrf-ok", "csrf_token": token})
    assert made.status_code == 303
    assert "csrf-ok" in client.get("/console/tenants").text and "csrf-victim" not in client.get("/console/tenants").text
    # The API with the session cookie: reads work, writes need the X-CSRF-Token header.
    assert client.get("/admin/api/tenants").status_code == 200
    assert client.post("/admin/api/tenants", json={"name": "cookie-only"}).status_code == 403
    ok = client.post("/admin/api/tenants", json={"name": "cookie-csrf"}, headers={"X-CSRF-Token": token})
    assert ok.status_code == 201


def test_content_logging_is_switched_in_the_console(console: h.ServerThread) -> None:
    client, _hops = sign_in(console, "pat")
    token = csrf_of(client.get("/console/tenants").text)
    made = client.post("/console/tenants", data={"name": "console-log", "csrf_token": token, "log_content": "on"})
    assert made.status_code == 303
    assert client.get("/admin/api/tenants/console-log").json()["log_content"] is True
    assert "Stop logging content of console-log" in client.get("/console/tenants").text
    assert client.post("/console/tenants/console-log/content-logging/off", data={}).status_code == 403  # CSRF
    off = client.post("/console/tenants/console-log/content-logging/off", data={"csrf_token": token})
    assert off.status_code == 303 and client.get("/admin/api/tenants/console-log").json()["log_content"] is False
    assert (
        client.post("/console/tenants/console-log/content-logging/maybe", data={"csrf_token": token}).status_code == 404
    )


def test_tampered_session_cookie_is_ignored(console: h.ServerThread) -> None:
    client, _ = sign_in(console, "pat")
    value = client.cookies["bastion_session"]
    client.cookies.set("bastion_session", value[:-4] + ("AAAA" if not value.endswith("AAAA") else "BBBB"))
    assert client.get("/console/tenants", follow_redirects=False).headers["location"] == "/login"
    assert client.get("/admin/api/me").status_code == 401


def test_roles_on_pages(console: h.ServerThread) -> None:
    pat, _ = sign_in(console, "pat")
    token = csrf_of(pat.get("/console/tenants").text)
    for name in ("acme", "globex"):
        pat.post("/console/tenants", data={"name": name, "csrf_token": token})
    alice, hops = sign_in(console, "alice")
    assert "acme" in hops[0].text and "globex" not in hops[0].text
    assert alice.get("/console/tenants/globex/keys").status_code == 404
    assert alice.get("/console/tenants/acme/keys").status_code == 200
    assert alice.get("/console/pool").status_code == 403
    audrey, hops = sign_in(console, "audrey")
    assert str(hops[0].url).endswith("/console/audit")
    assert audrey.get("/console/tenants").status_code == 403
    assert audrey.get("/console/audit", params={"tenant": "globex"}).status_code == 200


def test_tenant_admin_sets_per_key_limits_within_the_caps(console: h.ServerThread) -> None:
    pat, hops = sign_in(console, "pat")
    token = csrf_of(hops[0].text)
    pat.post("/admin/api/tenants", json={"name": "acme"}, headers={"X-CSRF-Token": token})  # 409 if it exists
    caps = {"requests_per_minute": 100, "tokens_per_minute": 10_000}
    set_caps = pat.put("/admin/api/tenants/acme/limits", json=caps, headers={"X-CSRF-Token": token})
    assert set_caps.status_code == 200, set_caps.text
    alice, hops = sign_in(console, "alice")
    token = csrf_of(hops[0].text)
    made = alice.post("/console/tenants/acme/keys", data={"name": "limited", "csrf_token": token})
    assert made.status_code == 201
    key = next(k for k in alice.get("/admin/api/tenants/acme/keys").json() if k["name"] == "limited")
    page = alice.get("/console/tenants/acme/keys").text
    action = f"/console/tenants/acme/keys/{key['id']}/limits"
    assert f'action="{action}"' in page and f'for="kl-{key["prefix"]}-requests_per_minute"' in page
    assert "Requests per minute (cap 100)" in page

    form = {"requests_per_minute": "50", "tokens_per_minute": "", "daily_token_budget": "2000", "csrf_token": token}
    saved = alice.post(action, data=form)
    assert saved.status_code == 303 and saved.headers["location"] == "/console/tenants/acme/keys"
    limits = alice.get(f"/admin/api/tenants/acme/keys/{key['id']}/limits").json()
    assert limits["requests_per_minute"] == 50 and limits["daily_token_budget"] == 2000
    assert limits["tokens_per_minute"] is None  # empty field: the tenant's limit applies
    page = alice.get("/console/tenants/acme/keys").text
    assert re.search(rf'id="kl-{key["prefix"]}-requests_per_minute"[^>]*value="50"', page)

    over = alice.post(action, data={**form, "tokens_per_minute": "20000"})
    assert over.status_code == 422 and "above the tenant&#39;s caps: tokens_per_minute" in over.text
    assert alice.post(action, data={**form, "requests_per_minute": "fifty"}).status_code == 422
    assert alice.post(action, data={k: v for k, v in form.items() if k != "csrf_token"}).status_code == 403
    assert alice.get(f"/admin/api/tenants/acme/keys/{key['id']}/limits").json()["requests_per_minute"] == 50
    bob, hops = sign_in(console, "bob")
    assert bob.post(action, data={**form, "csrf_token": csrf_of(hops[0].text)}).status_code == 404
    # The platform admin is not bound by the caps.
    above = pat.post(
        action, data={**form, "tokens_per_minute": "20000", "csrf_token": csrf_of(pat.get("/console/tenants").text)}
    )
    assert above.status_code == 303
    assert pat.get(f"/admin/api/tenants/acme/keys/{key['id']}/limits").json()["tokens_per_minute"] == 20_000


def test_logout_ends_the_session_at_the_provider(console: h.ServerThread, idp: h.TestIdp) -> None:
    client, hops = sign_in(console, "pat")
    out = client.post("/logout", data={"csrf_token": csrf_of(hops[0].text)})
    assert out.status_code == 303
    assert out.headers["location"].startswith(f"{idp.issuer}/protocol/openid-connect/logout?client_id=")
    assert "bastion_session" not in client.cookies
    assert client.get("/console/tenants", follow_redirects=False).headers["location"] == "/login"


def test_local_admin_login(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'bastion.db'}"
    migrate.upgrade(url)
    config = h.platform_config(tmp_path, url, issuer=None)
    with pytest.raises(ConfigError, match="production"):
        ControlSettings.from_config(config, env={"BASTION_ENV": "production"})
    with pytest.raises(ConfigError, match="production"):
        create_app(config, settings=ControlSettings(data_dir=config.data_dir, production=True))
    app = create_app(config, settings=h.control_settings(config))
    password = re.search(r"password (\S+) \(shown only once\)", capsys.readouterr().out).group(1)
    stored = (config.data_dir / FILE_NAME).read_text()
    assert password not in stored and json.loads(stored)["hash"]
    assert (config.data_dir / FILE_NAME).stat().st_mode & 0o077 == 0
    create_app(config, settings=h.control_settings(config))
    assert "shown only once" not in capsys.readouterr().out  # printed once, at first start only
    with h.ServerThread(app, h.free_port()) as server, httpx.Client(base_url=server.url, timeout=15) as client:
        page = client.get("/login")
        assert page.status_code == 200 and "local administrator" in page.text
        wrong = client.post("/login", data={"username": "admin", "password": "guess", "csrf_token": csrf_of(page.text)})
        assert wrong.status_code == 401 and "bastion_session" not in client.cookies
        no_csrf = client.post("/login", data={"username": "admin", "password": password})
        assert no_csrf.status_code == 303 and "bastion_session" not in client.cookies
        page = client.get("/login")
        ok = client.post("/login", data={"username": "admin", "password": password, "csrf_token": csrf_of(page.text)})
        assert ok.status_code == 303 and ok.headers["location"] == "/console/tenants"
        assert client.get("/admin/api/me").json() == {
            "username": "admin",
            "roles": ["platform-admin"],
            "tenant": None,
            "via": "local",
        }
        bearer = client.get("/admin/api/me", headers={"Authorization": "Bearer x.y.z"})
        assert bearer.status_code == 401  # no issuer: bearer tokens cannot be checked, so none is accepted


def test_cli_serves_health_readiness_metrics_and_console(tmp_path: Path) -> None:
    """`bastion control serve` as the Helm chart runs it (here: embedded default, plain http on loopback)."""
    import subprocess
    import time

    bastion = str(Path(sys.executable).parent / "bastion")
    url = f"sqlite+aiosqlite:///{tmp_path / 'bastion.db'}"
    migrate.upgrade(url)
    config_file = tmp_path / "platform.yaml"
    config_file.write_text(
        json.dumps(
            {
                "data_dir": str(tmp_path / "data"),
                "database": {"url": url},
                "models": [{"name": "m1", "source": "/nonexistent", "max_model_len": 2048}],
                "profiles": {"deep-context": {}, "fast-agentic": {}},
                "deployments": [{"model": "m1", "profile": "deep-context"}],
            }
        )
    )
    port = h.free_port()
    args = [bastion, "control", "serve", "--config", str(config_file), "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(
        [*args, "--insecure-cookies"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, "control plane did not start"
            time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").json() == {"status": "ready"}
        assert "bastion_control_logins_total" in httpx.get(f"http://127.0.0.1:{port}/metrics").text
        login = httpx.get(f"http://127.0.0.1:{port}/login")
        assert login.status_code == 200 and "Secure" not in login.headers["set-cookie"]
    finally:
        process.terminate()
        output = process.communicate(timeout=15)[0]
    assert output.count("shown only once") == 1
    assert "GET /login" not in output  # no access log: callback URLs carry authorization codes
