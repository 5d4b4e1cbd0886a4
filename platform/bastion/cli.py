"""The `bastion` command: composes the packages; errors are one line and a non-zero exit unless --debug."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from bastion import __version__
from bastion.audit.command import audit_app
from bastion.bench.command import bench_app
from bastion.commandline import ConfigOption, out, progress_bar
from bastion.config import load_config
from bastion.config.schema import PlatformConfig
from bastion.control.command import control_app
from bastion.control.tenant_command import tenants_weight
from bastion.engine.command import engine_app
from bastion.engine.mtp.command import mtp_app
from bastion.errors import BastionError
from bastion.pool.command import plan as plan_command
from bastion.tenancy.commands import keys_app, tenants_app

app = typer.Typer(
    help="Bastion: on-premise LLM serving with tenants, quotas, audit and MTP speculation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Check the platform file.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema migrations (Alembic).", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(db_app, name="db")
app.command("plan")(plan_command)
tenants_app.command("weight")(tenants_weight)  # audited like the console: it lives in control
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")
app.add_typer(control_app, name="control")
app.add_typer(audit_app, name="audit")
app.add_typer(mtp_app, name="mtp")
app.add_typer(engine_app, name="engine")
app.add_typer(bench_app, name="bench")

_state = {"debug": False}
log = logging.getLogger("bastion.cli")


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False) -> None:
    _state["debug"] = debug


@app.command()
def version() -> None:
    """Print Bastion's version."""
    out.print(__version__)


@config_app.command("check")
def config_check(file: Annotated[Path, typer.Argument(help="platform file to validate")]) -> None:
    """Validate a platform file: prints `ok` or every error with its key path, and every known-bad speculation
    combination (engine/known_bad.py) it would run with the vLLM installed here."""
    from bastion.engine.guard_setup import check_config, config_warnings

    config = load_config(file)
    check_config(config)
    for warning in config_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    out.print("ok")


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None, revision: str = "head") -> None:
    """Migrate the database up to REVISION (default: the latest)."""
    from bastion.db import migrate

    migrate.upgrade(load_config(config).database.url, revision)
    out.print(f"database at {revision}")


@db_app.command("downgrade")
def db_downgrade(config: ConfigOption = None, revision: str = "-1") -> None:
    """Migrate the database down to REVISION (default: one step)."""
    from bastion.db import migrate

    migrate.downgrade(load_config(config).database.url, revision)
    out.print(f"database downgraded to {revision}")


@db_app.command("current")
def db_current(config: ConfigOption = None) -> None:
    """Print the database's current revision."""
    from bastion.db import migrate

    out.print(migrate.current(load_config(config).database.url))


helm_app = typer.Typer(help="Helm chart values generated from the platform file.", no_args_is_help=True)
app.add_typer(helm_app, name="helm")


@helm_app.command("values")
def helm_values_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="platform file for the cluster")],
    out_file: Annotated[Path | None, typer.Option("--out", help="write the values fragment to this file")] = None,
    update: Annotated[
        Path | None, typer.Option("--update", help="rewrite the generated block of this values file (the chart's own)")
    ] = None,
    chart: Annotated[Path, typer.Option("--chart", help="the chart the fragment is layered over")] = Path(
        "helm/bastion"
    ),
) -> None:
    """Helm values (`platform`, `serveConfig`, `workerGroups`) for a platform file; stdout without --out/--update."""
    from bastion.serve import helm_values as hv

    data = hv.read_platform_file(config)
    if update is not None:
        fragment = hv.render_fragment(hv.helm_values(data, str(config)), config.as_posix())
        update.write_text(hv.splice(update.read_text(encoding="utf-8"), fragment), encoding="utf-8")
    if out_file is not None or update is None:
        values = hv.helm_values(data, str(config), chart_defaults=hv.chart_defaults(chart))
        fragment = hv.render_fragment(values, config.as_posix())
        if out_file is not None:
            out_file.write_text(fragment, encoding="utf-8")
        else:
            sys.stdout.write(fragment)


@helm_app.command("schema")
def helm_schema_command(
    update: Annotated[Path, typer.Option("--update", help="the chart's values.schema.json to refresh")],
) -> None:
    """Refresh the platform part (`properties.platform`, `$defs`) of the chart's values.schema.json."""
    import json

    from bastion.serve import helm_values as hv

    update.write_text(hv.dump_schema(hv.values_schema(json.loads(update.read_text(encoding="utf-8")))))


models_app = typer.Typer(
    help="Local model folders: build the bundled model, write and check manifests.", no_args_is_help=True
)
app.add_typer(models_app, name="models")


@models_app.command("prepare")
def models_prepare(config: ConfigOption = None) -> None:
    """Build bundled models into the data directory (once) and verify every model folder's manifest."""
    from bastion.serve.runner import prepare_models

    progress, update = progress_bar()
    with progress:
        paths = prepare_models(load_config(config), update)
    for path in paths:
        out.print(f"ok {path}")


@models_app.command("manifest")
def models_manifest(folder: Annotated[Path, typer.Argument(help="model folder")]) -> None:
    """Write the sha256 manifest of a model folder you trust (replicas verify it at start)."""
    from bastion.engine.manifest import write_manifest

    manifest = write_manifest(folder)
    out.print(f"{len(manifest['files'])} files hashed into {folder}")


@models_app.command("verify")
def models_verify(folder: Annotated[Path, typer.Argument(help="model folder")]) -> None:
    """Check a model folder against its manifest."""
    from bastion.engine.manifest import verify_manifest

    verify_manifest(folder)
    out.print("ok")


@app.command("serve")
def serve_command(
    config: ConfigOption = None,
    export_serve_config: Annotated[
        bool, typer.Option("--export-serve-config", help="print the equivalent Ray Serve config YAML and exit")
    ] = False,
) -> None:
    """Run the Ray Serve application of the platform file (gateway + one engine deployment per profile)."""
    from bastion.config import Settings

    path = config or Settings().config
    platform = load_config(path)
    if export_serve_config:
        import yaml

        from bastion.serve.options import serve_config

        sys.stdout.write(yaml.safe_dump(serve_config(platform, str(path)), sort_keys=False))
        return
    from bastion.serve import runner
    from bastion.telemetry.logging import configure_logging

    configure_logging("DEBUG" if _state["debug"] else "INFO")
    runner.check_address(platform)
    runner.prepare_models(platform)
    runner.start_ray(platform)
    runner.deploy(path)
    out.print(f"Bastion is serving on http://{platform.gateway.host}:{platform.gateway.port}/v1 (Ctrl-C stops)")
    runner.wait_forever()


@app.command("run")
def run_command(
    config: ConfigOption = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="stream Ray's, Serve's and vLLM's logs here instead of to files")
    ] = False,
) -> None:
    """Everything `make run` does: prepare models, migrate the database, create the first tenant, serve.
    Prints a few lines of progress and a summary; the logs go to <data_dir>/logs (serve/run_output.py)."""
    from contextlib import nullcontext

    from bastion.config import Settings
    from bastion.serve import run_output, runner
    from bastion.telemetry.logging import configure_logging

    path = config or Settings().config
    platform = load_config(path)
    runner.check_address(platform)
    logs = run_output.log_dir(platform)
    hint = "streamed here (--verbose)" if verbose else f"in {logs} (--verbose streams them)"
    out.print(f"Bastion {__version__}: {path}; logs {hint}", soft_wrap=True)
    with nullcontext() if verbose else run_output.terminal_only_for(out, logs / run_output.DRIVER_LOG):
        configure_logging("DEBUG" if _state["debug"] else "INFO")
        _run(platform, path, None if verbose else logs)


def _run(platform: PlatformConfig, path: Path, logs: Path | None) -> None:
    """`bastion run`'s steps, one line each; `logs` None: Ray streams every worker's output to this terminal."""
    import asyncio

    from bastion.db import migrate
    from bastion.serve import run_output, runner
    from bastion.serve.options import deployment_name

    progress, update = progress_bar(transient=True)
    with progress:
        runner.prepare_models(platform, update)
    out.print(f"[green]✓[/] models ready: {', '.join(m.name for m in platform.models)}")
    migrate.upgrade(platform.database.url)
    token = asyncio.run(runner.bootstrap_tenant(platform))
    out.print("[green]✓[/] database migrated" + (", tenant 'default' created" if token else ""))
    with out.status("starting Ray"):
        runner.start_ray(platform, logs=logs)
    if logs is not None and (link := run_output.link_ray_logs(logs)) is not None:
        log.debug("Ray's session logs: %s", link.resolve())
    where = platform.ray.address or f"127.0.0.1, {platform.ray.num_cpus} CPUs"
    out.print(f"[green]✓[/] Ray started ({where})")
    engines = {deployment_name(d.model, d.profile): d for d in platform.deployments}
    width = max((len(d.name) for d in platform.deployments), default=0)

    def placed(report: Any) -> None:
        out.print(f"[green]✓[/] placement: {run_output.placement_text(report.assignment)}")

    def ready(name: str) -> None:
        dep = engines.get(name)
        if dep is None:  # the gateway ingress: the summary says it serves
            return
        guard = run_output.guard_text(runner.replica_stats(name))
        spec = run_output.speculation_text(platform, dep)
        line = f"[green]✓[/] {dep.name:<{width}}  ready × {dep.replicas}  speculation {spec:<10}  guard: {guard}"
        out.print(line, soft_wrap=True)

    with out.status("starting replicas (a model loads in a minute or more)"):
        runner.deploy(path, on_placed=placed, on_healthy=ready)
    runner.wait_forever(ready=lambda: _summary(platform, token))
    out.print("Bastion stopped.")


def _summary(platform: PlatformConfig, token: str | None) -> None:
    base = f"http://{platform.gateway.host}:{platform.gateway.port}/v1"
    out.print(f"\n[bold]Bastion is serving on {base}[/] (Ctrl-C stops)")
    if token:
        out.print(f"API key of tenant 'default' (shown once, stored hashed): {token}", soft_wrap=True)
    else:
        out.print("API key: the one shown at first start; another: bastion keys create default")
    models = ", ".join(m.name for m in platform.models)
    out.print(f"Profiles: {', '.join(platform.profiles)} (models: {models})")
    out.print("Console: bastion control serve")
    out.print(
        f"Try: curl -s {base}/chat/completions -H 'Authorization: Bearer $KEY' -H 'Content-Type: application/json' "
        f'-d \'{{"model": "{platform.models[0].name}", "messages": [{{"role": "user", "content": "Hello"}}]}}\'',
        soft_wrap=True,
    )


def main() -> None:
    """Entry point: turn Bastion's errors into one line on stderr and exit 1."""
    try:
        app()
    except BastionError as exc:
        if _state["debug"]:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
