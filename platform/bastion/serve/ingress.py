"""The gateway as the Ray Serve ingress: the FastAPI app from `gateway/` over handles to the engine deployments."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from bastion.audit.recorder import AuditRecorder
from bastion.audit.service import build_writer
from bastion.config import load_config
from bastion.gateway.combined_client import CombinedEngineClient
from bastion.gateway.engine_client import UpstreamInfo
from bastion.gateway.external import ExternalEngineClient
from bastion.serve.gateway_app import create_gateway_app
from bastion.serve.guard_watch import GuardWatch
from bastion.serve.prompt_count import prompt_counters
from bastion.serve.ray_engine_client import RayEngineClient
from bastion.telemetry.logging import configure_logging


@serve.deployment(name="gateway", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.5})
@serve.ingress()
class GatewayIngress:
    """Built at replica start: the config file is read in the replica, handles arrive bound by Serve."""

    async def __init__(self, config_path: str, upstreams: list[tuple[dict[str, Any], DeploymentHandle]]) -> None:
        configure_logging("INFO")
        self.config = load_config(config_path)
        known = {f.name for f in fields(UpstreamInfo)}
        self.client = RayEngineClient(
            [(UpstreamInfo(**{k: v for k, v in info.items() if k in known}), handle) for info, handle in upstreams],
            prompt_counters(self.config, [info for info, _ in upstreams]),
        )
        # External replicas (platform file `external_replicas`): routed alongside the Ray deployments.
        self.external = ExternalEngineClient(list(self.config.external_replicas))
        if self.config.external_replicas:
            self.external.start()  # health checks begin before the first request
        engine = CombinedEngineClient([self.client, self.external]) if self.config.external_replicas else self.client
        self.engine = engine
        self.audit = await build_writer(self.config).start()
        self.recorder = AuditRecorder(self.audit, self.config.profiles)
        # Replicas that fail their speculation guard: one audit event each (the engine has no audit log).
        self.guard_watch = GuardWatch(self.audit.enqueue, {info["name"]: (info, h) for info, h in upstreams})
        self.guard_watch.start()

    def __serve_build_asgi_app__(self):
        app = create_gateway_app(self.config, self.engine, recorders=[self.recorder], pool_stats="serve")
        app.state.metrics.watch_audit(self.audit)  # pool_stats: the control plane's live pool view
        return app

    async def __del__(self) -> None:
        await self.guard_watch.stop()
        await self.external.aclose()
        await self.audit.close(timeout=10)
