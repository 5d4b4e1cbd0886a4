"""The Ray Serve application built from the platform file: one EngineDeployment per (model, profile)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ray.serve import Application

from bastion.config import load_config
from bastion.config.schema import PlatformConfig
from bastion.engine.engine_args import engine_spec
from bastion.serve.deployments import EngineDeployment
from bastion.serve.options import deployment_options


@dataclass(frozen=True)
class EngineApp:
    """An engine deployment, bound and ready to hand to `serve.run`, with the names the gateway needs."""

    name: str
    model: str
    profile: str
    max_context: int
    max_ongoing_requests: int
    app: Application


def engine_apps(config: PlatformConfig) -> list[EngineApp]:
    """Bind one EngineDeployment per deployment in the platform file (MTP misuse fails here, before Ray)."""
    apps = []
    for dep in config.deployments:
        spec = engine_spec(config, dep)
        options = deployment_options(config, dep)
        bound = EngineDeployment.options(**options).bind(spec, config.telemetry.model_dump())
        apps.append(
            EngineApp(options["name"], dep.model, dep.profile, spec.max_model_len, dep.max_ongoing_requests, bound)
        )
    return apps


def upstream_info(engine: EngineApp) -> dict[str, Any]:
    return {
        "name": engine.name,
        "model": engine.model,
        "profile": engine.profile,
        "max_context": engine.max_context,
        "max_ongoing_requests": engine.max_ongoing_requests,
    }


def build_app(args: dict[str, Any]) -> Application:
    """Serve's application builder (`import_path` in the Serve config): reads the platform file in `args`.

    The gateway ingress gets a handle to every engine deployment; Serve starts the engines first.
    """
    from bastion.serve.ingress import GatewayIngress

    config_path = str(args["config"])
    engines = engine_apps(load_config(config_path))
    return GatewayIngress.bind(config_path, [(upstream_info(e), e.app) for e in engines])
