"""Start the platform on this machine or an existing Ray cluster: models, schema, Ray, Serve."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bastion.config.schema import PlatformConfig
from bastion.engine.manifest import verify_manifest
from bastion.engine.model_store import BUNDLED, model_path, prepare_bundled
from bastion.errors import BastionError
from bastion.pool import placement
from bastion.pool.catalog import gpu_classes

APP_NAME = "bastion"
log = logging.getLogger(__name__)


def prepare_models(config: PlatformConfig, progress: Callable[[str, int, int], None] | None = None) -> list[Path]:
    """Build bundled models once; check every model folder against its manifest; record the speculation
    guard's golden outputs where a speculating profile serves a model (once per model, dtype and build)."""
    paths = []
    for model in config.models:
        if model.bundled_name in BUNDLED:
            paths.append(prepare_bundled(model.bundled_name, config.data_dir, progress=progress))
        else:
            path = model_path(model, config.data_dir)
            verify_manifest(path, model.name)
            paths.append(path)
    prepare_guard(config, progress)
    return paths


def prepare_guard(config: PlatformConfig, progress: Callable[[str, int, int], None] | None = None) -> list[Path]:
    """Golden records (engine/golden.py) for every speculating deployment's model and dtype that lacks a
    current one: an engine without speculation, started here with the deployment's own engine arguments."""
    from bastion.engine.engine_args import engine_spec
    from bastion.engine.golden import ensure_golden

    done: dict[str, Path] = {}
    for dep in config.deployments:
        spec = engine_spec(config, dep)
        if spec.guard is None or spec.guard.golden in done:
            continue
        if progress:
            progress(f"guard golden record for {dep.model} ({spec.guard.dtype})", 0, 1)
        saved = {k: os.environ.get(k) for k in dep.env}
        os.environ.update(dep.env)  # the replica's environment (KV cache size, thread binding)
        try:
            ensure_golden(spec.engine_kwargs, Path(spec.path), spec.guard.dtype, Path(spec.guard.golden))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        done[spec.guard.golden] = Path(spec.guard.golden)
        if progress:
            progress(f"guard golden record for {dep.model} ({spec.guard.dtype})", 1, 1)
    return list(done.values())


def start_ray(config: PlatformConfig, *, logs: Path | None = None) -> None:
    """A local Ray bound to 127.0.0.1 (embedded default), or a connection to `ray.address`. With `logs`, workers'
    output stays in Ray's session files instead of streaming to this terminal, and a local cluster's replicas
    log vLLM to `logs/vllm.log` (serve/run_output.py)."""
    from bastion.serve import loopback

    if config.ray.address is None:
        if logs is not None:  # Ray's processes, replicas and their engine processes inherit this environment
            from bastion.serve.run_output import replica_log_env

            os.environ.update(replica_log_env(logs))
        loopback.start_local_ray(
            config.gateway.port,
            namespace="bastion",
            num_cpus=config.ray.num_cpus,
            host=config.gateway.host,
            log_to_driver=logs is None,
        )
        return
    import ray
    from ray import serve

    ray.init(address=config.ray.address, include_dashboard=False, log_to_driver=logs is None, namespace="bastion")
    serve.start(http_options={"host": config.gateway.host, "port": config.gateway.port})


PLACEMENT_TIMEOUT_S = 600.0  # a replica that is placed may still take minutes to load a large model


def placement_demands(config: PlatformConfig) -> list[placement.Demand]:
    """What each deployment asks Ray for, from the very options Serve gets (autoscaling: the initial count)."""
    from bastion.serve.options import deployment_options

    demands = []
    for dep in config.deployments:
        options = deployment_options(config, dep)
        replicas = options.get("num_replicas", options.get("autoscaling_config", {}).get("initial_replicas", 1))
        demands.append(
            placement.demand_from_actor_options(dep.name, options["ray_actor_options"], int(replicas), dep.gpu_class)
        )
    return demands


def weights_gib(config: PlatformConfig, model: str) -> float | None:
    """The model's weight files on disk in GiB, None when the folder is not on this machine (a remote cluster)."""
    path = Path(config.model(model).source)
    if not path.is_dir():
        return None
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return size / 2**30 if size else None


def tp_hints(config: PlatformConfig) -> dict[str, int]:
    classes = gpu_classes(config.gpu_pool)
    entries = [(d.name, d.gpu_class, d.gpus_per_replica, weights_gib(config, d.model)) for d in config.deployments]
    return placement.tensor_parallel_hints(entries, classes)


def check_placement(config: PlatformConfig, nodes: list[dict[str, Any]] | None = None) -> placement.PlacementReport:
    """Raise PlacementError naming what is missing when the cluster cannot host every replica; warn about
    deployments whose weights need more cards than they ask for (tensor parallelism)."""
    if nodes is None:
        import ray

        nodes = ray.nodes()
    hints = tp_hints(config)
    for name, need in hints.items():
        log.warning("%s: the weights need %d cards per replica (tensor parallelism); set gpus_per_replica", name, need)
    report = placement.check(
        placement_demands(config), placement.nodes_from_ray(nodes), gpu_classes(config.gpu_pool), hints
    )
    report.raise_if_failed()
    return report


def deploy(
    config_path: Path,
    *,
    timeout_s: float = PLACEMENT_TIMEOUT_S,
    on_placed: Callable[[placement.PlacementReport], None] | None = None,
    on_healthy: Callable[[str], None] | None = None,
) -> None:
    """Check placement, deploy without blocking, then watch until RUNNING: fail loudly, never 'deploying' forever.
    `on_placed` gets the placement report, `on_healthy` each Serve deployment's name as it becomes healthy."""
    from bastion.config import load_config
    from bastion.serve.app import build_app

    config = load_config(config_path)
    report = check_placement(config)  # before building: an unplaceable pool fails before any replica is asked for
    if on_placed is not None:
        on_placed(report)
    app = build_app({"config": str(config_path)})
    deploy_app(app, config, APP_NAME, timeout_s=timeout_s, check=False, on_healthy=on_healthy)


def deploy_app(
    app: Any,
    config: PlatformConfig,
    name: str,
    *,
    route_prefix: str | None = "/",
    timeout_s: float = PLACEMENT_TIMEOUT_S,
    check: bool = True,
    on_healthy: Callable[[str], None] | None = None,
) -> None:
    """Deploy a Serve application built from `config`'s deployments, guarded by the placement check and the
    watchdog (the multi-node test runs stand-in deployments through this same path)."""
    from ray import serve

    if check:
        check_placement(config)
    # Serve's own `run` waits for RUNNING with no limit; deploy without waiting and watch instead.
    serve._run(app, _blocking=False, name=name, route_prefix=route_prefix)
    wait_until_running(name, placement_demands(config), timeout_s=timeout_s, on_healthy=on_healthy)


def wait_until_running(
    app_name: str,
    demands: list[placement.Demand],
    *,
    timeout_s: float = PLACEMENT_TIMEOUT_S,
    poll_s: float = 1.0,
    status: Callable[[], Any] | None = None,
    nodes: Callable[[], list[placement.NodeCapacity]] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    on_healthy: Callable[[str], None] | None = None,
) -> None:
    """Poll Serve until the application runs; never wait silently.

    A deployment that is not yet healthy is checked against the live nodes every poll: when no node could ever
    hold one of its replicas (a class with no node, a node that left) it fails at once with the placement
    check's message; `on_healthy` hears of each deployment once, when it is first seen healthy. A replica that
    could fit but waits (a busy cluster, a slow worker start or runtime-env
    install, a large model loading) gets until `timeout_s`; the timeout error repeats what Serve said about it
    (Serve's slow-scheduling notice names the resources it waits for)."""
    if status is None:
        from ray import serve

        status = serve.status
    if nodes is None:
        import ray

        def nodes() -> list[placement.NodeCapacity]:
            return placement.nodes_from_ray(ray.nodes())

    deadline = clock() + timeout_s
    by_name = {placement_name(d.name): d for d in demands}
    healthy: set[str] = set()
    while True:
        app = status().applications.get(app_name)
        waiting: dict[str, Any] = {}
        if app is not None:
            state = _value(app.status)
            for name, dep in app.deployments.items():
                if on_healthy is not None and name not in healthy and _value(dep.status) == "HEALTHY":
                    healthy.add(name)
                    on_healthy(name)
            if state == "RUNNING":
                return
            if state in ("DEPLOY_FAILED", "UNHEALTHY"):
                details = "; ".join(f"{n}: {d.message}" for n, d in app.deployments.items() if d.message) or app.message
                raise DeploymentFailed(f"application {app_name} failed to deploy: {details}")
            waiting = {n: d for n, d in app.deployments.items() if _value(d.status) != "HEALTHY"}
            pending = [by_name[n] for n in waiting if n in by_name]
            if pending:
                report = placement.check(pending, nodes())
                if not report.ok:
                    raise placement.PlacementError(
                        f"application {app_name} cannot be placed on this Ray cluster: {report.message()}"
                    )
        if clock() >= deadline:
            detail = [
                f"{n} ({_value(d.status)}, replicas {dict(d.replica_states or {})}"
                + (f": {d.message}" if d.message else "")
                + ")"
                for n, d in waiting.items()
            ]
            raise DeploymentTimeout(
                f"application {app_name} is not running after {timeout_s:g} s; still waiting for: "
                + ("; ".join(detail) or "the application to be created")
            )
        sleep(poll_s)


def replica_stats(deployment: str, timeout_s: float = 5.0) -> dict[str, Any] | None:
    """The stats one replica of a Serve deployment reports (`EngineDeployment.stats`: load, speculation, the
    speculation guard's verdict where it runs); None when none answers in time."""
    from ray import serve

    try:
        result = serve.get_deployment_handle(deployment, APP_NAME).stats.remote().result(timeout_s=timeout_s)
    except Exception as exc:  # a progress line must not stop the start: the verdict then reads n/a
        log.warning("no stats from %s: %s", deployment, type(exc).__name__)
        return None
    return result if isinstance(result, dict) else None


def _value(status: Any) -> str:
    return str(getattr(status, "value", status))


class DeploymentFailed(BastionError):
    """Serve gave up on a deployment (its constructor failed, or it became unhealthy while starting)."""


class DeploymentTimeout(BastionError):
    """The application did not reach RUNNING in time."""


def placement_name(dep_name: str) -> str:
    """The Serve deployment name for a `model@profile` demand name."""
    from bastion.serve.options import deployment_name

    model, _, profile = dep_name.partition("@")
    return deployment_name(model, profile)


class _Terminated(Exception):
    """SIGTERM arrived (a process manager or `kill`): stop as gracefully as on Ctrl-C."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated


def wait_forever(should_stop: Callable[[], bool] = lambda: False, ready: Callable[[], None] | None = None) -> None:
    """Serve until Ctrl-C or SIGTERM, then shut down gracefully: Serve stops taking new requests, each replica
    gets its graceful-shutdown period for the requests in flight (streams finish), then Ray stops — no process
    is left behind (a SIGTERM's default action would kill this driver and orphan the local Ray). `ready` runs
    once SIGTERM is handled: what it prints tells a process manager (or a test) it may stop the platform."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        if ready is not None:
            ready()
        while not should_stop():
            time.sleep(1)
    except (KeyboardInterrupt, _Terminated):
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the shutdown short
        import ray
        from ray import serve

        try:
            # Applications first, while the HTTP proxy still relays: their routes go (new requests are refused)
            # and each replica finishes its in-flight requests within its graceful-shutdown period. Shutting
            # Serve down at once would stop the proxy too, cutting every open stream.
            for name in list(serve.status().applications):
                serve.delete(name)
            serve.shutdown()
            ray.shutdown()
        finally:
            signal.signal(signal.SIGTERM, previous)


def check_address(config: PlatformConfig) -> None:
    if config.gateway.host not in ("127.0.0.1", "localhost", "::1") and config.ray.address is None:
        raise BastionError("the embedded default listens on loopback only; set gateway.host to 127.0.0.1")


async def bootstrap_tenant(config: PlatformConfig) -> str | None:
    """On first start (no tenants yet) create tenant `default` and a key; return the key, shown once, else None."""
    from bastion.db.session import create_engine, session_factory
    from bastion.tenancy import key_material
    from bastion.tenancy.bootstrap import ensure_bootstrap

    engine = create_engine(config.database.url)
    try:
        pepper = key_material.load_pepper(config.auth.api_key_pepper_file, config.data_dir)
        created = await ensure_bootstrap(session_factory(engine), pepper)
        return created.token if created else None
    finally:
        await engine.dispose()
