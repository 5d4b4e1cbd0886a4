"""Console login by authorization code with PKCE (S256) through python-keycloak, and RP-initiated logout.

The state, nonce and code verifier live in a short-lived encrypted cookie between the redirect and the callback;
the code is exchanged server-side with the client secret; both the access token (audience, roles) and the ID
token (audience = client, nonce) are checked with the same cached JWKS as the admin API's bearer tokens.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from typing import Any
from urllib.parse import quote, urlencode

from keycloak import KeycloakOpenID
from keycloak.exceptions import KeycloakError

from bastion.control.errors import ControlError, unauthorized
from bastion.control.principal import Principal, principal_from_claims
from bastion.control.settings import ControlSettings
from bastion.control.tokens import TokenVerifier, split_issuer


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(64)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
    return verifier, challenge


class OidcLogin:
    def __init__(self, settings: ControlSettings, verifier: TokenVerifier) -> None:
        assert settings.issuer is not None and settings.client_id is not None
        server_url, realm = split_issuer(settings.issuer)
        self.settings = settings
        self.verifier = verifier
        self.keycloak = KeycloakOpenID(server_url, realm, settings.client_id, settings.client_secret, timeout=10)

    async def start(self, redirect_uri: str) -> tuple[str, dict[str, Any]]:
        """The provider's authorization URL and what the callback must find again (kept in the login cookie)."""
        verifier, challenge = pkce_pair()
        state, nonce = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        try:
            url = await self.keycloak.a_auth_url(
                redirect_uri=quote(redirect_uri, safe=""),
                scope=quote("openid profile email", safe=""),
                state=state,
                nonce=nonce,
                code_challenge=challenge,
                code_challenge_method="S256",
            )
        except (KeycloakError, OSError) as exc:
            raise ControlError(503, "idp_unavailable", "the identity provider is unavailable") from exc
        return url, {"state": state, "nonce": nonce, "verifier": verifier, "redirect_uri": redirect_uri}

    async def finish(self, code: str, login: dict[str, Any]) -> Principal:
        try:
            tokens = await self.keycloak.a_token(
                grant_type="authorization_code",
                code=code,
                redirect_uri=login["redirect_uri"],
                code_verifier=login["verifier"],
            )
        except (KeycloakError, OSError):
            raise unauthorized("the identity provider refused the login") from None
        access = await self.verifier.verify(str(tokens.get("access_token", "")))
        id_token = tokens.get("id_token")
        if id_token:
            id_claims = await self.verifier.verify(str(id_token), audience=self.settings.client_id)
            if id_claims.get("nonce") != login["nonce"]:
                raise unauthorized("login response does not match this login")
        return principal_from_claims(access, self.settings.client_id)

    def logout_url(self, post_logout_redirect_uri: str) -> str:
        query = urlencode({"client_id": self.settings.client_id, "post_logout_redirect_uri": post_logout_redirect_uri})
        return f"{self.settings.issuer}/protocol/openid-connect/logout?{query}"
