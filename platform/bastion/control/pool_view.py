"""The pool and profiles dashboard's data: deployments from the platform file, live replica stats from a
provider (pool/live_poller.py polls the gateway's internal endpoint: the control plane runs outside Ray),
acceptance per profile from usage counters, and context capacity from the planner.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from bastion.config import PlatformConfig
from bastion.pool.architecture import Architecture, architecture_from_hf, load_hf_config
from bastion.pool.catalog import PoolError, gpu_classes
from bastion.pool.catalog import select as select_gpus
from bastion.pool.live_stats import ReplicaStatsProvider
from bastion.pool.planner import MtpHead, PlanInputs, Speculation, plan
from bastion.routing.health import probe_all

log = logging.getLogger(__name__)
DEFAULT_GPUS = ("rtx3090", "rtx4090", "rtx5090", "h100")


async def pool_status(
    config: PlatformConfig, provider: ReplicaStatsProvider, tenant_names: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The platform file's profiles and deployments with each deployment's live replicas (`live` says whether
    any came back) and, where the provider knows them, Serve's status of the deployment and the polled gateway
    replica's fair queues per tenant and profile (`queues`; `tenant_names`: id → name for them)."""
    error = None
    try:
        live = await provider()
    except Exception as exc:  # a dashboard must render when Ray is unreachable
        log.warning("replica stats unavailable: %s", type(exc).__name__)
        live, error = [], "live replica statistics are unavailable (the gateway did not answer)"
    status_of = getattr(provider, "deployment_status", None)
    status: dict[str, dict[str, Any]] = status_of() if callable(status_of) else {}
    queues_of = getattr(provider, "queues", None)
    names = tenant_names or {}
    queues = [
        {**q, "tenant": names.get(str(q.get("tenant_id")), q.get("tenant_id"))}
        for q in (queues_of() if callable(queues_of) and error is None else [])
    ]
    by_deployment: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for stats in live:
        by_deployment[stats.deployment].append(asdict(stats))
    profiles = {}
    for name, profile in config.profiles.items():
        spec = profile.speculative
        profiles[name] = {
            "speculation": spec.method,
            "num_speculative_tokens": getattr(spec, "num_speculative_tokens", None),
            "kv_cache_dtype": profile.kv_cache_dtype,
            "max_context": profile.max_context,
        }
    deployments = [
        {
            "name": d.name,
            "model": d.model,
            "profile": d.profile,
            "replicas": d.replicas,
            "min_replicas": d.min_replicas,
            "max_replicas": d.max_replicas,
            "gpu_class": d.gpu_class,
            "gpus_per_replica": d.gpus_per_replica,
            "max_ongoing_requests": d.max_ongoing_requests,
            "status": status.get(d.name, {}).get("status"),
            "replica_states": status.get(d.name, {}).get("replica_states"),
            "live": by_deployment.get(d.name, []),
        }
        for d in config.deployments
    ]
    nodes = [{"name": n.name, "gpu_class": n.gpu_class, "count": n.count} for n in config.gpu_pool.nodes]
    external = await probe_all(config.external_replicas)  # servers outside Ray: probed now, state as routing sees it
    return {
        "profiles": profiles,
        "deployments": deployments,
        "nodes": nodes,
        "live": bool(live),
        "error": error,
        "external": external,
        "queues": queues,
    }


def live_history(provider: ReplicaStatsProvider) -> dict[str, Any] | None:
    """Recent tok/s and acceptance per profile, one point per poll, where the provider keeps a history."""
    history = getattr(provider, "history", None)
    return history() if callable(history) else None


class PlanRequest(BaseModel):
    """A model shape and quantization to plan; the defaults are ARCHITECTURE.md's 27B hybrid on 24 GB cards.
    Every number is bounded and finite: an infinite size would overflow the planner (a 500, found by schemathesis)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)  # strict: `true` is not 1.0
    params_b: float = Field(default=27.0, gt=0, le=2000)
    layers: int = Field(default=64, ge=1, le=1000)
    full_attention_layers: int = Field(default=16, ge=1, le=1000)
    kv_heads: int = Field(default=4, ge=1, le=1024)
    head_dim: int = Field(default=256, ge=1, le=4096)
    linear_state_mib: float = Field(default=64.0, ge=0, le=1_000_000)
    bits_per_weight: float = Field(default=5.69, gt=0, le=32)
    fast_bits_per_weight: float | None = Field(default=5.47, gt=0, le=32)
    kv_dtype: str = "q4_0"
    mtp_size_gb: float = Field(default=1.9, ge=0, le=10_000)
    alpha: float | None = Field(default=None, ge=0, le=1, description="constant acceptance; null: the planner's rates")
    concurrency: int = Field(default=1, ge=1, le=4096)
    gpus: list[str] = Field(default_factory=list, description="GPU class keys; empty: the pool's classes")


def _plans(config: PlatformConfig, arch: Architecture, req: PlanRequest) -> list[dict[str, Any]]:
    classes = gpu_classes(config.gpu_pool)
    keys = req.gpus or sorted({n.gpu_class for n in config.gpu_pool.nodes}) or list(DEFAULT_GPUS)
    inputs = PlanInputs(
        arch=arch,
        bits_per_weight=req.bits_per_weight,
        fast_bits_per_weight=req.fast_bits_per_weight,
        kv_dtype=req.kv_dtype,
        mtp=MtpHead(size_gb=req.mtp_size_gb, layers=arch.mtp_layers),
        concurrency=req.concurrency,
        speculation=Speculation(alpha=req.alpha),
    )
    return [{**asdict(p), "decode_tok_s": p.decode_tok_s} for p in plan(inputs, select_gpus(classes, keys))]


def plan_for(config: PlatformConfig, req: PlanRequest) -> list[dict[str, Any]]:
    """Raises PoolError (a 4xx for the API) for inputs the planner refuses."""
    arch = Architecture(
        params_b=req.params_b,
        layers=req.layers,
        full_attention_layers=req.full_attention_layers,
        kv_heads=req.kv_heads,
        head_dim=req.head_dim,
        linear_state_bytes=round(req.linear_state_mib * 2**20),
    )
    return _plans(config, arch, req)


def configured_capacity(config: PlatformConfig) -> list[dict[str, Any]]:
    """Plans for the platform's own models where their config.json is on disk (bundled models once prepared)."""
    out = []
    for model in config.models:
        folder = Path(model.source)
        if model.bundled_name is not None:
            folder = config.data_dir / "models" / model.bundled_name
        cfg = folder / "config.json"
        if not cfg.is_file():
            continue
        try:
            arch = architecture_from_hf(load_hf_config(cfg), source=str(cfg))
            for row in _plans(
                config, arch, PlanRequest(bits_per_weight=16, fast_bits_per_weight=None, kv_dtype="bf16")
            ):
                out.append({"model": model.name, **row})
        except PoolError as exc:
            log.info("no capacity plan for %s: %s", model.name, exc)
    return out
