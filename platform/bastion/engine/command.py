"""`bastion engine check`: the speculation guard on demand, for every speculating deployment of the platform file.

It starts each deployment's replica here, as Serve would (same engine arguments, same environment), lets the
guard's pre-ready round run, prints the verdict and stops the engine: a check of this build on this machine
before (or without) serving. The exit status is 1 when any deployment fails or is refused.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Annotated, Any

import typer

from bastion.commandline import ConfigOption, out
from bastion.config import load_config

engine_app = typer.Typer(help="Engine replicas: the speculation correctness guard on demand.", no_args_is_help=True)


async def check_deployment(spec: Any) -> dict[str, Any]:
    """Start the replica (its guard runs before ready), take the verdict, stop it."""
    from bastion.engine.replica import EngineReplica

    replica = await EngineReplica.create(spec)
    try:
        guard = replica.guard
        if guard is None or guard.last is None:
            return {"ok": None, "reason": "the guard did not run"}
        return guard.last.to_dict()
    finally:
        await replica.drain(5)


@engine_app.command("check")
def engine_check(
    config: ConfigOption = None,
    deployment: Annotated[
        str | None, typer.Option("--deployment", "-d", help="model@profile (default: every speculating one)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the verdicts as JSON")] = False,
) -> None:
    """Run the speculation guard (canary rounds against the golden record) and print the verdict."""
    from bastion.config import Settings
    from bastion.engine.engine_args import engine_spec
    from bastion.engine.guard import Verdict
    from bastion.errors import BastionError

    platform = load_config(config or Settings().config)
    chosen = [d for d in platform.deployments if deployment in (None, d.name)]
    if deployment is not None and not chosen:
        raise typer.BadParameter(f"no deployment {deployment} in the platform file", param_hint="--deployment")
    results: dict[str, dict[str, Any]] = {}
    for dep in chosen:
        try:
            spec = engine_spec(platform, dep)
        except BastionError as exc:
            results[dep.name] = {"ok": False, "reason": str(exc)}
            continue
        if spec.guard is None:
            if deployment is not None:
                results[dep.name] = {"ok": None, "reason": "does not speculate, or engine.guard_enabled is false"}
            continue
        os.environ.update(dep.env)
        try:
            results[dep.name] = asyncio.run(check_deployment(spec))
        except BastionError as exc:
            results[dep.name] = {"ok": False, "reason": str(exc)}
    if as_json:
        out.print_json(json.dumps(results))
    for name, result in results.items():
        if not as_json:
            line = Verdict(**result).line() if "greedy_match" in result else f"{result['reason']}"
            out.print(f"{name}: {line}", soft_wrap=True)
    if not results:
        out.print("no speculating deployment: nothing to check")
    if any(r.get("ok") is False for r in results.values()):
        raise typer.Exit(1)
