"""`bastion control serve`: the admin API and console under uvicorn (the Helm chart's control-plane command)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

import typer

control_app = typer.Typer(help="Control plane: admin API and web console.", no_args_is_help=True)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@control_app.command("serve")
def serve(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="platform file (default: $BASTION_CONFIG)")
    ] = None,
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to bind")] = 8080,
    insecure_cookies: Annotated[
        bool, typer.Option(help="session cookie without Secure, for plain http on a loopback address only")
    ] = False,
    pool_stats_url: Annotated[
        str | None,
        typer.Option(
            help="the gateway's /internal/pool/replicas for live replica stats "
            "(default: $BASTION_POOL_STATS_URL, control.pool_stats_url, else the local gateway)"
        ),
    ] = None,
) -> None:
    """Serve the admin API (/admin/api), the console, /healthz, /readyz and /metrics.

    Live replica statistics (pool page, GET /admin/api/pool) are polled from the gateway with the token of
    control.pool_stats_token_file (default: data_dir/pool_stats_token, shared with a local gateway)."""
    import uvicorn

    from bastion.config import load_config
    from bastion.control.app import create_app
    from bastion.control.settings import ControlSettings
    from bastion.errors import ConfigError

    platform = load_config(config)
    overrides: dict[str, object] = {}
    if insecure_cookies:
        if not _loopback(host):
            raise ConfigError("--insecure-cookies is only allowed when binding a loopback address")
        overrides["cookie_secure"] = False
    if pool_stats_url:
        overrides["pool_stats_url"] = pool_stats_url
    settings = ControlSettings.from_config(platform, **overrides)
    app = create_app(platform, settings=settings)
    # No access log: the login callback's query carries the authorization code (metrics count requests instead).
    uvicorn.run(app, host=host, port=port, log_level="info", proxy_headers=True, server_header=False, access_log=False)
