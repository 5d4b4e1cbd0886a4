"""Bearer JWT checks for the admin API: signature against the realm's JWKS, issuer, audience, expiry, algorithm.

The JWKS is fetched through python-keycloak (Keycloak's URL layout), cached, and fetched again when a token names
a `kid` the cache lacks (a rotated realm key), at most once per `refresh_interval_s` so random kids cannot make
Bastion hammer Keycloak. Only asymmetric algorithms are accepted: `none` and HS* (whose "key" would be public
JWKS material) are refused before any key is looked up.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from jwcrypto import jwk, jws, jwt
from jwcrypto.common import JWException
from keycloak import KeycloakOpenID

from bastion.control.errors import ControlError, unauthorized
from bastion.errors import ConfigError

log = logging.getLogger(__name__)
ALLOWED_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")


def split_issuer(issuer: str) -> tuple[str, str]:
    """`https://kc/realms/NAME` → (`https://kc/`, `NAME`): python-keycloak builds every URL from these two."""
    base, sep, realm = issuer.rstrip("/").rpartition("/realms/")
    if not sep or not realm or "/" in realm:
        raise ConfigError(f"auth.oidc_issuer must look like https://HOST/realms/NAME, got {issuer!r}")
    return base + "/", realm


def _header(token: str) -> dict[str, Any]:
    parts = token.split(".")
    if len(parts) != 3:
        raise unauthorized("malformed token")
    try:
        raw = base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4))
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise unauthorized("malformed token") from None
    if not isinstance(header, dict):
        raise unauthorized("malformed token")
    return header


class TokenVerifier:
    def __init__(
        self,
        issuer: str,
        audience: str,
        *,
        client_id: str | None = None,
        keycloak: KeycloakOpenID | None = None,
        algorithms: tuple[str, ...] = ALLOWED_ALGORITHMS,
        leeway_s: int = 30,
        refresh_interval_s: float = 10.0,
    ) -> None:
        if not audience:
            raise ConfigError("auth.audience (or auth.client_id) is required to check access tokens")
        bad = [a for a in algorithms if a not in ALLOWED_ALGORITHMS]
        if bad:
            raise ConfigError(f"token algorithms {bad} are not allowed (asymmetric algorithms only)")
        self.issuer = issuer.rstrip("/")
        self.audience = audience
        server_url, realm = split_issuer(self.issuer)
        self._keycloak = keycloak or KeycloakOpenID(server_url, realm, client_id or audience, timeout=10)
        self.algorithms = algorithms
        self.leeway_s = leeway_s
        self.refresh_interval_s = refresh_interval_s
        self._keys: dict[str, jwk.JWK] = {}
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()
        self.fetches = 0

    async def refresh(self, *, force: bool = False) -> None:
        async with self._lock:
            if not force and time.monotonic() - self._fetched_at < self.refresh_interval_s:
                return
            try:
                certs = await self._keycloak.a_certs()
            except Exception as exc:
                log.warning("JWKS fetch from %s failed: %s", self.issuer, type(exc).__name__)
                raise ControlError(503, "idp_unavailable", "the identity provider's keys are unavailable") from None
            keys: dict[str, jwk.JWK] = {}
            for item in certs.get("keys", []):
                if item.get("use", "sig") != "sig" or "kid" not in item:
                    continue
                try:
                    keys[item["kid"]] = jwk.JWK(**item)
                except JWException:
                    continue
            self._keys = keys
            self._fetched_at = time.monotonic()
            self.fetches += 1

    async def _key_for(self, kid: str | None) -> jwk.JWK:
        if kid is None:
            raise unauthorized("token has no key id")
        if kid not in self._keys:
            await self.refresh()  # a rotated key: fetch once (rate-limited) before refusing
        key = self._keys.get(kid)
        if key is None:
            raise unauthorized("token signed with an unknown key")
        return key

    async def verify(self, token: str, *, audience: str | None = None) -> Mapping[str, Any]:
        """The token's claims, or ControlError(401) saying which check failed (never echoing the token).
        `audience` overrides the API audience (the console checks its ID token against the client id)."""
        header = _header(token)
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise unauthorized("token algorithm not allowed")
        key = await self._key_for(header.get("kid"))
        try:
            checked = jwt.JWT(
                algs=list(self.algorithms),
                check_claims={"iss": self.issuer, "aud": audience or self.audience, "exp": None},
                expected_type="JWS",
                strict_serialization=True,
            )
            checked.leeway = self.leeway_s
            checked.deserialize(token, key)
        except jwt.JWTExpired:
            raise unauthorized("token expired") from None
        except jwt.JWTNotYetValid:
            raise unauthorized("token not yet valid") from None
        except jwt.JWTMissingClaim:
            raise unauthorized("token lacks a required claim") from None
        except jwt.JWTInvalidClaimValue as exc:
            text = str(exc)
            what = "issuer" if "'iss'" in text else "audience" if "'aud'" in text else "claim"
            raise unauthorized(f"token has the wrong {what}") from None
        except (jws.InvalidJWSSignature, jws.InvalidJWSObject):
            raise unauthorized("token signature invalid") from None
        except (JWException, ValueError, TypeError):
            raise unauthorized("token invalid") from None
        claims = json.loads(checked.claims)
        if not isinstance(claims, dict):
            raise unauthorized("token invalid")
        if audience is None and claims.get("typ") == "ID":  # a Keycloak ID token is not an access token
            raise unauthorized("an ID token is not an access token")
        nbf = claims.get("nbf")
        if isinstance(nbf, int | float) and nbf > time.time() + self.leeway_s:
            raise unauthorized("token not yet valid")
        return claims
