"""Control-plane settings: the platform file's `auth` section plus what only the process environment holds.

Environment: `BASTION_OIDC_CLIENT_SECRET_FILE` (the console client's secret, a file so it never sits in the
platform file or a process listing), `BASTION_CONSOLE_URL` (the console's external base URL, for the OIDC
redirect URI; default: the request's own URL), `BASTION_CONSOLE_COOKIE_SECURE=0` (plain-http development and
tests only; refused with BASTION_ENV=production), `BASTION_OIDC_CLIENT_ID` / `BASTION_OIDC_AUDIENCE` (override
`auth.client_id` / `auth.audience`: the Helm chart sets them from values), `BASTION_POOL_STATS_URL` (overrides
`control.pool_stats_url`, the gateway's internal endpoint of live replica statistics; the chart points it at the
gateway Service).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bastion.config import PlatformConfig
from bastion.errors import ConfigError
from bastion.pool.live_stats import default_url

SECRET_FILE_ENV = "BASTION_OIDC_CLIENT_SECRET_FILE"  # noqa: S105 - the name of a variable, not a secret


@dataclass(frozen=True)
class ControlSettings:
    data_dir: Path
    issuer: str | None = None
    client_id: str | None = None
    audience: str | None = None
    client_secret: str | None = None
    public_url: str | None = None
    cookie_secure: bool = True
    session_ttl_s: int = 3600
    jwks_refresh_interval_s: float = 10.0  # the least time between two JWKS fetches caused by unknown kids
    production: bool = False
    pool_stats_url: str | None = None  # None: no live replica statistics

    def __repr__(self) -> str:  # the client secret must not reach a log line or a traceback
        return f"ControlSettings(issuer={self.issuer!r}, client_id={self.client_id!r}, production={self.production})"

    @property
    def oidc(self) -> bool:
        return self.issuer is not None

    @classmethod
    def from_config(cls, config: PlatformConfig, env: Mapping[str, str] | None = None, **overrides: object):
        env = os.environ if env is None else env
        production = env.get("BASTION_ENV", "development") == "production"
        auth = config.auth
        secret = None
        secret_file = env.get(SECRET_FILE_ENV)
        if secret_file:
            try:
                secret = Path(secret_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"{SECRET_FILE_ENV}: cannot read {secret_file} ({exc.strerror})") from None
        secure = env.get("BASTION_CONSOLE_COOKIE_SECURE", "1").lower() not in ("0", "false", "no")
        client_id = env.get("BASTION_OIDC_CLIENT_ID") or auth.client_id
        values: dict[str, object] = {
            "data_dir": config.data_dir,
            "issuer": auth.oidc_issuer.rstrip("/") if auth.oidc_issuer else None,
            "client_id": client_id,
            "audience": env.get("BASTION_OIDC_AUDIENCE") or auth.audience or client_id,
            "client_secret": secret,
            "public_url": env.get("BASTION_CONSOLE_URL") or None,
            "cookie_secure": secure,
            "production": production,
            "pool_stats_url": env.get("BASTION_POOL_STATS_URL") or config.control.pool_stats_url or default_url(config),
        }
        values.update(overrides)
        settings = cls(**values)  # type: ignore[arg-type]
        settings.check()
        return settings

    def check(self) -> None:
        if self.production and not self.oidc:
            raise ConfigError("BASTION_ENV=production needs auth.oidc_issuer: the local admin login is for development")
        if self.production and not self.cookie_secure:
            raise ConfigError("BASTION_CONSOLE_COOKIE_SECURE=0 is refused with BASTION_ENV=production")
        if self.oidc and not self.client_id:
            raise ConfigError("auth.client_id is required with auth.oidc_issuer")
