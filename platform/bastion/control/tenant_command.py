"""`bastion tenants weight NAME [WEIGHT] [--clear]`: a tenant's fair-share weight from the command line.

It goes through the same AdminService as the console and the admin API, as a platform admin named after the
operating-system user (`cli:<user>`), so the change is validated, recorded as an audit `admin` event
(`tenant.update`, weight before and after) and announced to the gateways alike. cli.py registers it under
`bastion tenants` (the tenancy package may not import the audit log).
"""

from __future__ import annotations

import asyncio
import getpass
from typing import Annotated

import typer

from bastion.commandline import ConfigOption
from bastion.config import load_config


def tenants_weight(
    name: Annotated[str, typer.Argument(help="tenant name or id")],
    weight: Annotated[float | None, typer.Argument(help="share of a full profile's fair queue, 0.1-100")] = None,
    clear: Annotated[bool, typer.Option("--clear", help="back to the platform file's weight (else 1)")] = False,
    config: ConfigOption = None,
) -> None:
    """Show or set a tenant's fair-share weight (audited; gateways pick it up within a second)."""
    from bastion.audit.service import build_writer
    from bastion.control.admin import AdminService
    from bastion.control.errors import ControlError
    from bastion.control.principal import PLATFORM_ADMIN, Principal
    from bastion.db.session import create_engine, session_factory
    from bastion.tenancy import key_material
    from bastion.tenancy.invalidation import publisher
    from bastion.tenancy.key_service import KeyService

    if weight is not None and clear:
        raise typer.BadParameter("give a weight or --clear, not both")
    platform = load_config(config)
    user = getpass.getuser()
    who = Principal(subject=user, username=user, roles=frozenset({PLATFORM_ADMIN}), via="cli")

    async def go() -> tuple[float | None, float]:
        engine = create_engine(platform.database.url)
        writer = build_writer(platform, engine)
        try:
            sessions = session_factory(engine)
            pepper = key_material.load_pepper(platform.auth.api_key_pepper_file, platform.data_dir)
            notify = publisher(platform.redis.url) if platform.redis.url else None
            admin = AdminService(platform, sessions, engine, KeyService(sessions, pepper, notify), writer)
            if weight is None and not clear:
                info = await admin.tenant(who, name)
            else:
                await writer.start()
                info = await admin.update_tenant(who, name, fair_share_weight=weight, clear_fair_share_weight=clear)
            return info.fair_share_weight, platform.gateway.tenant_weights.get(info.name, 1.0)
        finally:
            await writer.close(timeout=10)
            await engine.dispose()

    try:
        recorded, fallback = asyncio.run(go())
    except ControlError as exc:
        raise typer.BadParameter(exc.message) from None
    if recorded is None:
        typer.echo(f"tenant {name}: weight {fallback:g} (not set on the tenant: the platform file's, else 1)")
    else:
        typer.echo(f"tenant {name}: weight {recorded:g} (set on the tenant)")
