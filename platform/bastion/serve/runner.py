"""Start the platform on this machine or an existing Ray cluster: models, schema, Ray, Serve."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from bastion.config.schema import PlatformConfig
from bastion.engine.model_store import BUNDLED, model_path, prepare_bundled, verify_manifest
from bastion.errors import BastionError

APP_NAME = "bastion"


def prepare_models(config: PlatformConfig, progress: Callable[[str, int, int], None] | None = None) -> list[Path]:
    """Build bundled models once; check every model folder against its manifest."""
    paths = []
    for model in config.models:
        if model.bundled_name in BUNDLED:
            paths.append(prepare_bundled(model.bundled_name, config.data_dir, progress=progress))
        else:
            path = model_path(model, config.data_dir)
            verify_manifest(path, model.name)
            paths.append(path)
    return paths


def start_ray(config: PlatformConfig) -> None:
    """A local Ray bound to 127.0.0.1 (embedded default), or a connection to `ray.address`."""
    if config.ray.address is None:
        # Must be set before Ray starts: every Ray process then binds and talks on loopback only.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_worker_niceness", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    ray.init(
        address=config.ray.address,
        num_cpus=config.ray.num_cpus if config.ray.address is None else None,
        include_dashboard=False,
        namespace="bastion",
    )
    serve.start(http_options={"host": config.gateway.host, "port": config.gateway.port})


def deploy(config_path: Path) -> None:
    from ray import serve

    from bastion.serve.app import build_app

    serve.run(build_app({"config": str(config_path)}), name=APP_NAME, route_prefix="/")


def wait_forever(should_stop: Callable[[], bool] = lambda: False) -> None:
    try:
        while not should_stop():
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def check_address(config: PlatformConfig) -> None:
    if config.gateway.host not in ("127.0.0.1", "localhost", "::1") and config.ray.address is None:
        raise BastionError("the embedded default listens on loopback only; set gateway.host to 127.0.0.1")


async def bootstrap_tenant(config: PlatformConfig) -> str | None:
    """On first start (no tenants yet) create tenant `default` and a key; return the key, shown once, else None."""
    from bastion.db.session import create_engine, session_factory
    from bastion.tenancy import keys
    from bastion.tenancy.bootstrap import ensure_bootstrap

    engine = create_engine(config.database.url)
    try:
        pepper = keys.load_pepper(config.auth.api_key_pepper_file, config.data_dir)
        created = await ensure_bootstrap(session_factory(engine), pepper)
        return created.token if created else None
    finally:
        await engine.dispose()
