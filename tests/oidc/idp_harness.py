"""Test harness: the Node identity provider (server.mjs) with Keycloak's URL layout, token helpers, and a
uvicorn server thread for the control plane and the gateway.

One provider per test process (`shared_idp()`), started on first use and stopped at exit, so the integration and
browser tests share it. Its console client accepts redirect URIs on a few loopback ports reserved up front
(`console_port()` hands them out), because oidc-provider, like Keycloak, matches redirect URIs exactly.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from jwcrypto import jwk, jws, jwt

HERE = Path(__file__).resolve().parent
REALM = "bastion"
CLIENT_ID = "bastion-console"
CLIENT_SECRET = "console-client-secret-for-tests-only"
AUDIENCE = "bastion-admin"
PASSWORD = "correct horse battery staple"
USERS: dict[str, dict[str, Any]] = {
    "pat": {"roles": ["platform-admin"]},
    "carol": {"roles": [], "client_roles": {CLIENT_ID: ["platform-admin"]}},
    "alice": {"roles": ["tenant-admin"], "tenant": "acme"},
    "bob": {"roles": ["tenant-admin"], "tenant": "globex"},
    "tina": {"roles": ["tenant-admin"]},  # no tenant bound: may do nothing
    "audrey": {"roles": ["auditor"]},
    "nobody": {"roles": ["offline_access"]},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def new_key(kid: str) -> jwk.JWK:
    return jwk.JWK.generate(kty="RSA", size=2048, kid=kid, alg="RS256", use="sig")


def ensure_node_modules() -> None:
    """`npm ci` once (scripts/install-tools.sh does the same); a test fails loudly if npm cannot."""
    if (HERE / "node_modules" / "oidc-provider").is_dir():
        return
    npm = shutil.which("npm")
    assert npm, "npm is required for the test identity provider (scripts/install-tools.sh)"
    subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=HERE, check=True, capture_output=True, timeout=300)


@dataclass
class TestIdp:
    port: int
    key: jwk.JWK
    console_ports: list[int]
    process: subprocess.Popen[str]
    config_path: Path
    _next_port: int = 0
    retired: list[jwk.JWK] = field(default_factory=list)

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}/realms/{REALM}"

    def console_port(self) -> int:
        port = self.console_ports[self._next_port]
        self._next_port += 1
        return port

    def token(self, username: str, password: str = PASSWORD) -> str:
        """An access token through the registered password grant (Keycloak's direct access grant)."""
        response = httpx.post(
            f"{self.issuer}/protocol/openid-connect/token",
            data={
                "grant_type": "password",
                "username": username,
                "password": password,
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "scope": "openid profile email",
            },
            timeout=10,
        )
        response.raise_for_status()
        return response.json()["access_token"]

    def sign(self, claims: dict[str, Any], *, key: jwk.JWK | None = None, alg: str = "RS256", kid: str | None = None):
        """A token signed as the test wants (the provider's own key by default): expired, wrong issuer, forged..."""
        key = key or self.key
        header = {"alg": alg, "typ": "at+jwt", "kid": kid or key.get("kid")}
        token = jwt.JWT(header=header, claims=claims)
        token.make_signed_token(key)
        return token.serialize()

    def claims(self, username: str, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        user = USERS[username]
        claims = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": username,
            "preferred_username": username,
            "azp": CLIENT_ID,
            "iat": now,
            "exp": now + 300,
            "realm_access": {"roles": user.get("roles", [])},
        }
        if user.get("tenant"):
            claims["bastion_tenant"] = user["tenant"]
        claims.update(overrides)
        return claims

    def rotate(self, kid: str) -> jwk.JWK:
        """Swap the provider's signing key (a realm key rotation); the old key leaves the JWKS."""
        new = new_key(kid)
        response = httpx.post(
            f"http://127.0.0.1:{self.port}/__test/rotate", json={"jwk": json.loads(new.export_private())}, timeout=10
        )
        response.raise_for_status()
        self.retired.append(self.key)
        self.key = new
        return new

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start_idp(tmp_dir: Path, console_ports: int = 6) -> TestIdp:
    ensure_node_modules()
    ports = [free_port() for _ in range(console_ports)]
    key = new_key("test-key-1")
    redirects = [f"http://127.0.0.1:{p}/auth/callback" for p in ports]
    config = {
        "port": 0,
        "realm": REALM,
        "audience": AUDIENCE,
        "access_token_ttl": 300,
        "jwk": json.loads(key.export_private()),
        "clients": [
            {
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "redirect_uris": redirects,
                "post_logout_redirect_uris": [f"http://127.0.0.1:{p}/login" for p in ports],
                "grant_types": ["authorization_code", "refresh_token", "password"],
                "response_types": ["code"],
                "token_endpoint_auth_method": "client_secret_post",
            }
        ],
        "users": {name: {**user, "password": PASSWORD} for name, user in USERS.items()},
    }
    path = tmp_dir / "idp.json"
    path.write_text(json.dumps(config))
    os.chmod(path, 0o600)
    process = subprocess.Popen(
        ["node", str(HERE / "server.mjs"), str(path)],
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("READY "):
        process.kill()
        raise RuntimeError(f"test identity provider did not start: {line!r}")
    port = json.loads(line.removeprefix("READY "))["port"]
    return TestIdp(port, key, ports, process, path)


_shared: dict[str, TestIdp] = {}


def shared_idp(tmp_dir: Path) -> TestIdp:
    if "idp" not in _shared:
        _shared["idp"] = start_idp(tmp_dir)
        atexit.register(_shared["idp"].stop)
    return _shared["idp"]


def forged_hs256(idp: TestIdp, claims: dict[str, Any]) -> str:
    """HS256 keyed with the provider's public key: the classic algorithm-confusion forgery."""
    secret = jwk.JWK(kty="oct", k=jws.base64url_encode(idp.key.export_to_pem()))
    return idp.sign(claims, key=secret, alg="HS256", kid=idp.key.get("kid"))


def unsigned(idp: TestIdp, claims: dict[str, Any]) -> str:
    header = jws.base64url_encode(json.dumps({"alg": "none", "typ": "at+jwt", "kid": idp.key.get("kid")}))
    body = jws.base64url_encode(json.dumps(claims))
    return f"{header}.{body}."


class ServerThread:
    """An ASGI app under uvicorn on 127.0.0.1 in a thread (its own event loop), with lifespan."""

    def __init__(self, app: Any, port: int) -> None:
        import uvicorn

        self.port = port
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", access_log=False)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def platform_config(tmp_dir: Path, database_url: str, issuer: str | None, models: tuple[str, ...] = ("m1",)):
    """A platform file for control-plane tests: OIDC (when an issuer is given) and an audit signing key."""
    from bastion.audit.signing import keygen
    from bastion.config.schema import PlatformConfig

    keys = keygen(tmp_dir / "audit-keys")
    data: dict[str, Any] = {
        "data_dir": str(tmp_dir / "data"),
        "database": {"url": database_url},
        "models": [{"name": m, "source": "/nonexistent", "max_model_len": 8192} for m in models],
        "profiles": {
            "deep-context": {},
            "fast-agentic": {"speculative": {"method": "mtp", "num_speculative_tokens": 2}, "max_context": 2048},
        },
        "deployments": [{"model": m, "profile": p} for m in models for p in ("deep-context", "fast-agentic")],
        "audit": {"signing_key_file": str(keys["private"])},
    }
    if issuer is not None:
        data["auth"] = {"oidc_issuer": issuer, "client_id": CLIENT_ID, "audience": AUDIENCE}
    return PlatformConfig.model_validate(data)


def control_settings(config: Any, **overrides: Any):
    """Settings as `bastion control serve --insecure-cookies` on loopback would build them (plain http)."""
    from bastion.control.settings import ControlSettings

    values: dict[str, Any] = {"client_secret": CLIENT_SECRET if config.auth.oidc_issuer else None}
    values.update(overrides)
    return ControlSettings.from_config(config, env={"BASTION_CONSOLE_COOKIE_SECURE": "0"}, **values)


def migrate_db(url: str) -> None:
    """Alembic migrations in a thread of their own: they run asyncio, which cannot start on a thread where
    Playwright's sync API already drives an event loop."""
    from concurrent.futures import ThreadPoolExecutor

    from bastion.db import migrate

    with ThreadPoolExecutor(1) as pool:
        pool.submit(migrate.upgrade, url).result()


@contextlib.contextmanager
def control_and_gateway(tmp_dir: Path, database_url: str, idp: TestIdp, engine: Any) -> Iterator[tuple[str, str]]:
    """The control plane (OIDC, polling the gateway's internal pool endpoint every second) and a gateway over
    `engine` (a ScriptedEngine), both under uvicorn on one database; yields (control URL, gateway URL). They
    share data_dir, so the pool-stats token too, as on one machine."""
    from bastion.bench.doubles import TEST_PEPPER
    from bastion.control.app import create_app
    from bastion.pool.live_stats import POOL_STATS_PATH
    from bastion.serve.gateway_app import create_gateway_app

    config = platform_config(tmp_dir, database_url, idp.issuer)
    config = config.model_copy(update={"control": config.control.model_copy(update={"pool_stats_interval_s": 1.0})})
    gateway = create_gateway_app(config, engine, pepper=TEST_PEPPER, flush_interval_s=0.2, pool_stats="queues")
    with ServerThread(gateway, free_port()) as api:
        settings = control_settings(config, pool_stats_url=api.url + POOL_STATS_PATH)
        control = create_app(config, settings=settings, pepper=TEST_PEPPER)
        with ServerThread(control, idp.console_port()) as console:
            yield console.url, api.url
