"""Deployment options from the platform file: the one mapping that `bastion serve`, the Serve config export and
the Helm chart's `serveConfigV2` all use, so they cannot drift."""

from __future__ import annotations

import re
from typing import Any

from bastion.config.schema import DeploymentConfig, PlatformConfig

APP_NAME = "bastion"
APP_IMPORT_PATH = "bastion.serve.app:build_app"
GRACEFUL_SHUTDOWN_S = 30.0
HEALTH_CHECK_PERIOD_S = 5.0
# Replica choice within a deployment (session affinity, then power of two choices): an import path string, so
# the Serve config export and the Helm chart's serveConfigV2 carry it as text and only Serve imports Ray's router.
REQUEST_ROUTER_CLASS = "bastion.serve.router:SessionAffinityRouter"
# How often Serve collects each engine replica's `record_routing_stats` (the console's live pool view).
ROUTING_STATS_PERIOD_S = 5.0


def request_router_config() -> dict[str, Any]:
    """The `request_router_config` deployment option (plain data; Serve resolves the class on deploy)."""
    return {"request_router_class": REQUEST_ROUTER_CLASS, "request_routing_stats_period_s": ROUTING_STATS_PERIOD_S}


def deployment_name(model: str, profile: str) -> str:
    """A Serve deployment name for a model under a profile (Serve names keep to [A-Za-z0-9_-])."""
    return "engine-" + re.sub(r"[^A-Za-z0-9_-]", "_", f"{model}--{profile}")


def ray_actor_options(config: PlatformConfig, dep: DeploymentConfig) -> dict[str, Any]:
    options: dict[str, Any] = {"num_cpus": dep.num_cpus}
    if dep.gpu_class is not None:
        gpu = config.gpu_pool.classes[dep.gpu_class]
        count = max(dep.gpus_per_replica, 1)
        options["num_gpus"] = count
        options["resources"] = {gpu.resource: count}
    env = {"RAY_worker_niceness": "0", **dep.env}
    options["runtime_env"] = {"env_vars": env}
    return options


def deployment_options(config: PlatformConfig, dep: DeploymentConfig) -> dict[str, Any]:
    """Keyword arguments for `Deployment.options(...)`, also the `deployments[]` entry of a Serve config."""
    options: dict[str, Any] = {
        "name": deployment_name(dep.model, dep.profile),
        "max_ongoing_requests": dep.max_ongoing_requests,
        "ray_actor_options": ray_actor_options(config, dep),
        "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_S,
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "request_router_config": request_router_config(),
    }
    if dep.min_replicas is not None or dep.max_replicas is not None:
        low = dep.min_replicas if dep.min_replicas is not None else dep.replicas
        options["autoscaling_config"] = {
            "min_replicas": low,
            "initial_replicas": max(low, min(dep.replicas, dep.max_replicas or dep.replicas)),
            "max_replicas": dep.max_replicas if dep.max_replicas is not None else max(dep.replicas, low),
            "target_ongoing_requests": max(1, dep.max_ongoing_requests // 2),
        }
    else:
        options["num_replicas"] = dep.replicas
    return options


def serve_config(config: PlatformConfig, config_path: str, *, host: str = "127.0.0.1", port: int | None = None) -> dict:
    """The Ray Serve config (the `serve deploy` YAML, KubeRay's `serveConfigV2`) for this platform file.

    The application builder reads the same platform file at `config_path`; the deployment entries repeat
    its options so an operator sees (and Serve applies) exactly what Bastion would.
    """
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port or config.gateway.port},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": APP_IMPORT_PATH,
                "args": {"config": config_path},
                "deployments": [deployment_options(config, dep) for dep in config.deployments],
            }
        ],
    }
