"""`bastion tenants ...` and `bastion keys ...`: flags → tenancy services → rich tables. cli.py registers them.

A new key's secret is printed once, at creation or rotation; listings show prefix, id, scopes, expiry and last
use, never hashes. With Redis configured, key changes are announced so gateways drop them at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from bastion.commandline import ConfigOption
from bastion.config import PlatformConfig, load_config
from bastion.config.schema import LimitsConfig

if TYPE_CHECKING:  # the services pull in SQLAlchemy and Redis: imported when a command runs, not for --help
    from bastion.tenancy.key_service import KeyService
    from bastion.tenancy.tenants import TenantService
    from bastion.tenancy.views import CreatedKey, KeyInfo

T = TypeVar("T")
tenants_app = typer.Typer(help="Tenants: create, update, list, suspend, weight.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys: create, list, rotate, revoke.", no_args_is_help=True)
_out = Console()


def _run(config_path: Path | None, work: Callable[[PlatformConfig, TenantService, KeyService], Awaitable[T]]) -> T:
    from bastion.db.session import create_engine, session_factory
    from bastion.tenancy import key_material
    from bastion.tenancy.invalidation import publisher
    from bastion.tenancy.key_service import KeyService
    from bastion.tenancy.tenants import TenantService

    config = load_config(config_path)

    async def go() -> T:
        engine = create_engine(config.database.url)
        try:
            sessions = session_factory(engine)
            pepper = key_material.load_pepper(config.auth.api_key_pepper_file, config.data_dir)
            notify = publisher(config.redis.url) if config.redis.url else None
            return await work(config, TenantService(sessions), KeyService(sessions, pepper, notify))
        finally:
            await engine.dispose()

    return asyncio.run(go())


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else "-"


# --- tenants ------------------------------------------------------------------------------------------


@tenants_app.command("create")
def tenants_create(
    name: Annotated[str, typer.Argument(help="tenant name (unique)")],
    model: Annotated[list[str] | None, typer.Option("--model", help="allowed model (repeat; none: all)")] = None,
    profile: Annotated[list[str] | None, typer.Option("--profile", help="allowed profile (repeat)")] = None,
    default_profile: Annotated[str | None, typer.Option(help="profile used when a request names none")] = None,
    rpm: Annotated[int | None, typer.Option(help="requests per minute")] = None,
    tpm: Annotated[int | None, typer.Option(help="tokens per minute")] = None,
    concurrency: Annotated[int | None, typer.Option(help="concurrent requests")] = None,
    daily_budget: Annotated[int | None, typer.Option(help="tokens per day")] = None,
    monthly_budget: Annotated[int | None, typer.Option(help="tokens per month")] = None,
    weight: Annotated[float | None, typer.Option(help="share of a full profile's fair queue, 0.1-100")] = None,
    log_content: Annotated[
        bool, typer.Option("--log-content", help="store prompts and completions, encrypted (docs/audit.md)")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Create a tenant; limits not given come from the platform file's tenant_defaults, the weight from
    `gateway.tenant_weights` (else 1). `bastion tenants weight` changes the weight later."""
    values = [rpm, tpm, concurrency, daily_budget, monthly_budget]

    async def work(platform: PlatformConfig, tenants: TenantService, _keys: KeyService):
        limits = None
        if any(v is not None for v in values):
            base = platform.tenant_defaults.limits.model_dump()
            given = dict(zip(LimitsConfig.model_fields, values, strict=True))
            limits = LimitsConfig(**{k: given[k] if given[k] is not None else base[k] for k in base})
        for p in profile or []:
            if p not in platform.profiles:
                raise typer.BadParameter(f"unknown profile {p!r}")
        return await tenants.create(
            name,
            allowed_models=model or [],
            allowed_profiles=profile or [],
            default_profile=default_profile,
            limits=limits,
            fair_share_weight=weight,
            log_content=log_content,
        )

    info = _run(config, work)
    _out.print(f"tenant [bold]{info.name}[/bold] created (id {info.id})")


@tenants_app.command("update")
def tenants_update(
    name: Annotated[str, typer.Argument(help="tenant name or id")],
    log_content: Annotated[
        bool | None,
        typer.Option(
            "--log-content/--no-log-content",
            help="store the tenant's prompts and completions, encrypted, in the audit log (or stop)",
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Change a tenant's settings (today: content logging; erase what was stored with `bastion audit erase`)."""
    if log_content is None:
        raise typer.BadParameter("nothing to change: give --log-content or --no-log-content")
    info = _run(config, lambda _c, tenants, _k: tenants.update(name, log_content=log_content))
    _out.print(f"tenant {info.name}: content logging {'on' if info.log_content else 'off'}")


@tenants_app.command("list")
def tenants_list(config: ConfigOption = None) -> None:
    """Tenants with their status, models, profiles and fair-share weight ("file": the platform file's, else 1)."""
    rows = _run(config, lambda _c, tenants, _k: tenants.list())
    table = Table(
        "name", "id", "status", "models", "profiles", "default profile", "weight", "content logging", "created"
    )
    for t in rows:
        table.add_row(
            t.name,
            t.id,
            t.status,
            ", ".join(t.allowed_models) or "(all)",
            ", ".join(t.allowed_profiles) or "(defaults)",
            t.default_profile or "-",
            f"{t.fair_share_weight:g}" if t.fair_share_weight is not None else "(file)",
            "on" if t.log_content else "off",
            _when(t.created_at),
        )
    _out.print(table)


@tenants_app.command("suspend")
def tenants_suspend(
    name: Annotated[str, typer.Argument(help="tenant name or id")],
    resume: Annotated[bool, typer.Option("--resume", help="make the tenant active again")] = False,
    config: ConfigOption = None,
) -> None:
    """Suspend a tenant (its keys get 403 within a second), or resume it with --resume."""
    info = _run(config, lambda _c, tenants, _k: tenants.resume(name) if resume else tenants.suspend(name))
    _out.print(f"tenant {info.name} is {info.status}")


# --- keys ---------------------------------------------------------------------------------------------------


def _show_secret(created: CreatedKey) -> None:
    _out.print(f"key id {created.info.id}, prefix {created.info.prefix}, scopes {', '.join(created.info.scopes)}")
    _out.print("[bold yellow]The secret is shown only now; store it safely:[/bold yellow]")
    print(created.token)


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Argument(help="tenant name or id")],
    name: Annotated[str, typer.Option(help="a label for people")] = "",
    scope: Annotated[list[str] | None, typer.Option("--scope", help="inference, usage:read (repeat)")] = None,
    expires_in_days: Annotated[float | None, typer.Option(help="expiry, in days from now")] = None,
    config: ConfigOption = None,
) -> None:
    """Create an API key and print its secret once."""
    expires = datetime.now(UTC) + timedelta(days=expires_in_days) if expires_in_days is not None else None
    created = _run(
        config,
        lambda _c, _t, keys: keys.create(tenant, name=name, scopes=scope or ["inference"], expires_at=expires),
    )
    _show_secret(created)


@keys_app.command("list")
def keys_list(
    tenant: Annotated[str | None, typer.Option(help="only this tenant's keys")] = None,
    config: ConfigOption = None,
) -> None:
    """Keys: prefix, id, scopes, state, expiry, last use (never secrets or hashes)."""
    rows: list[KeyInfo] = _run(config, lambda _c, _t, keys: keys.list(tenant))
    now = datetime.now(UTC)
    table = Table("prefix", "id", "tenant", "name", "scopes", "state", "expires", "last used", "replaced by")
    for k in rows:
        table.add_row(
            k.prefix,
            k.id,
            k.tenant_id,
            k.name or "-",
            ", ".join(k.scopes),
            k.state(now),
            _when(k.expires_at),
            _when(k.last_used_at),
            k.replaced_by or "-",
        )
    _out.print(table)


@keys_app.command("rotate")
def keys_rotate(
    key: Annotated[str, typer.Argument(help="key id or prefix")],
    grace_hours: Annotated[float, typer.Option(help="how long the old key keeps working")] = 24.0,
    config: ConfigOption = None,
) -> None:
    """Replace a key: the new secret is printed once; the old key expires after the grace period."""
    created = _run(config, lambda _c, _t, keys: keys.rotate(key, grace=timedelta(hours=grace_hours)))
    _show_secret(created)
    _out.print(f"the old key keeps working for {grace_hours:g} h")


@keys_app.command("revoke")
def keys_revoke(
    key: Annotated[str, typer.Argument(help="key id or prefix")],
    config: ConfigOption = None,
) -> None:
    """Revoke a key: every gateway refuses it within a second."""
    info = _run(config, lambda _c, _t, keys: keys.revoke(key))
    _out.print(f"key {info.prefix} revoked at {_when(info.revoked_at)}")
