"""Control-plane pieces without a network: roles from claims, tenant binding, the session cookie codec, CSRF,
issuer parsing, production refusals, the local admin's stored hash, and the content security policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from bastion.control.app import _csp
from bastion.control.local_admin import FILE_NAME, check_local_admin, ensure_local_admin
from bastion.control.principal import principal_from_claims, roles_from_claims
from bastion.control.session import CookieCodec, csrf_ok, key_from_file, key_from_secret
from bastion.control.settings import ControlSettings
from bastion.control.tokens import TokenVerifier, split_issuer
from bastion.errors import ConfigError

pytestmark = pytest.mark.unit


def test_roles_from_realm_and_client_roles_only_known_ones() -> None:
    claims = {
        "realm_access": {"roles": ["offline_access", "auditor", 7]},
        "resource_access": {"bastion-console": {"roles": ["tenant-admin"]}, "other": {"roles": ["platform-admin"]}},
    }
    assert roles_from_claims(claims, "bastion-console") == {"auditor", "tenant-admin"}
    assert roles_from_claims(claims, None) == {"auditor"}
    assert roles_from_claims({"realm_access": "platform-admin"}, "x") == frozenset()


def test_tenant_binding_claim() -> None:
    one = principal_from_claims(
        {"sub": "s", "realm_access": {"roles": ["tenant-admin"]}, "bastion_tenant": "acme"}, None
    )
    assert one.is_tenant_admin and one.tenant == "acme" and one.actor == "oidc:s"
    listed = principal_from_claims(
        {"sub": "s", "realm_access": {"roles": ["tenant-admin"]}, "bastion_tenant": ["a"]}, None
    )
    assert listed.tenant == "a"
    two = principal_from_claims(
        {"sub": "s", "realm_access": {"roles": ["tenant-admin"]}, "bastion_tenant": ["a", "b"]}, None
    )
    assert two.tenant is None and not two.is_tenant_admin  # ambiguous: bound to nothing
    unbound = principal_from_claims({"sub": "s", "realm_access": {"roles": ["tenant-admin"]}}, None)
    assert not unbound.is_tenant_admin


def test_cookie_codec_refuses_tampering_other_names_other_keys_and_expiry() -> None:
    codec = CookieCodec(key_from_secret("a client secret"))
    sealed = codec.seal("bastion_session", {"user": "pat"}, 60)
    assert codec.open("bastion_session", sealed)["user"] == "pat"
    assert "pat" not in sealed  # encrypted, not just signed
    assert codec.open("bastion_login", sealed) is None  # bound to its cookie name
    assert CookieCodec(key_from_secret("another secret")).open("bastion_session", sealed) is None
    flipped = sealed[:-2] + ("A" if sealed[-2] != "A" else "B") + sealed[-1]
    assert codec.open("bastion_session", flipped) is None
    assert codec.open("bastion_session", codec.seal("bastion_session", {}, -1)) is None
    assert codec.open("bastion_session", "garbage!!") is None and codec.open("bastion_session", None) is None


def test_session_key_file_is_private_and_stable(tmp_path: Path) -> None:
    first = key_from_file(tmp_path)
    assert first == key_from_file(tmp_path) and len(first) == 32
    assert (tmp_path / "console_session_key").stat().st_mode & 0o077 == 0


def test_csrf_ok() -> None:
    assert csrf_ok({"csrf": "abc"}, "abc")
    assert not csrf_ok({"csrf": "abc"}, "abd") and not csrf_ok({"csrf": "abc"}, None) and not csrf_ok(None, "x")
    assert not csrf_ok({}, "")


def test_split_issuer() -> None:
    assert split_issuer("https://kc.example/auth/realms/bastion/") == ("https://kc.example/auth/", "bastion")
    for bad in ("https://kc.example/", "https://kc.example/realms/", "https://kc/realms/a/b"):
        with pytest.raises(ConfigError):
            split_issuer(bad)


def test_verifier_refuses_symmetric_algorithm_configuration() -> None:
    with pytest.raises(ConfigError):
        TokenVerifier("https://kc/realms/r", "aud", algorithms=("RS256", "HS256"))
    with pytest.raises(ConfigError):
        TokenVerifier("https://kc/realms/r", "")


def test_production_refusals(tmp_path: Path) -> None:
    ControlSettings(data_dir=tmp_path).check()  # development without an issuer: the local admin
    with pytest.raises(ConfigError, match="local admin"):
        ControlSettings(data_dir=tmp_path, production=True).check()
    with pytest.raises(ConfigError, match="COOKIE_SECURE"):
        ControlSettings(
            data_dir=tmp_path, issuer="https://kc/realms/r", client_id="c", production=True, cookie_secure=False
        ).check()
    with pytest.raises(ConfigError, match="client_id"):
        ControlSettings(data_dir=tmp_path, issuer="https://kc/realms/r").check()
    settings = ControlSettings(data_dir=tmp_path, issuer="https://kc/realms/r", client_id="c", client_secret="s3")
    assert "s3" not in repr(settings)


def test_local_admin_password_is_stored_hashed(tmp_path: Path) -> None:
    password = ensure_local_admin(tmp_path)
    assert password and ensure_local_admin(tmp_path) is None
    assert password not in (tmp_path / FILE_NAME).read_text()
    assert check_local_admin(tmp_path, "admin", password)
    assert not check_local_admin(tmp_path, "admin", password + "x")
    assert not check_local_admin(tmp_path, "root", password)
    assert not check_local_admin(tmp_path / "elsewhere", "admin", password)


def test_insecure_cookies_only_on_loopback() -> None:
    from bastion.control.command import _loopback

    assert _loopback("127.0.0.1") and _loopback("::1") and _loopback("localhost")
    assert not _loopback("0.0.0.0") and not _loopback("10.0.0.5") and not _loopback("console.example")  # noqa: S104


def test_content_security_policy_is_strict() -> None:
    csp = _csp(ControlSettings(data_dir=Path("."), issuer="https://kc.example:8443/realms/r", client_id="c"))
    assert "script-src 'self';" in csp and "style-src 'self';" in csp
    assert "frame-ancestors 'none'" in csp and "unsafe" not in csp
    assert "form-action 'self' https://kc.example:8443;" in csp
