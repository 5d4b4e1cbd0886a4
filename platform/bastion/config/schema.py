"""The platform file's schema: every section forbids unknown keys so a typo is an error, not silence."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bastion.config.external import ExternalReplicaConfig, check_external

DEEP_CONTEXT = "deep-context"
FAST_AGENTIC = "fast-agentic"
BUNDLED_PREFIX = "bundled:"
_NAME = r"^[a-z0-9][a-z0-9._-]{0,62}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- models and speculation -------------------------------------------------------------------


class ModelConfig(Strict):
    name: str = Field(pattern=_NAME)
    source: str = Field(description="a local folder, or bundled:NAME for a model Bastion builds itself")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_model_len: int = Field(gt=0)
    tool_parser: str | None = Field(default=None, description="vLLM tool-call parser, e.g. hermes; None: no tools")

    @property
    def bundled_name(self) -> str | None:
        return self.source[len(BUNDLED_PREFIX) :] if self.source.startswith(BUNDLED_PREFIX) else None


class SpeculationOff(Strict):
    method: Literal["off"] = "off"


class NgramSpeculation(Strict):
    method: Literal["ngram"]
    num_speculative_tokens: int = Field(ge=1, le=8)
    prompt_lookup_max: int = Field(default=4, ge=1)
    prompt_lookup_min: int = Field(default=1, ge=1)


class MtpSpeculation(Strict):
    method: Literal["mtp"]
    num_speculative_tokens: int = Field(ge=1, le=3)


class DraftModelSpeculation(Strict):
    method: Literal["draft_model"]
    model: str = Field(description="name of a model in `models`")
    num_speculative_tokens: int = Field(ge=1, le=8)


Speculation = Annotated[
    SpeculationOff | NgramSpeculation | MtpSpeculation | DraftModelSpeculation,
    Field(discriminator="method"),
]


class QueueConfig(Strict):
    """The fair queue in front of a profile (docs/gateway.md): requests wait here while every upstream of the
    profile is at max_ongoing_requests, served by weighted fair share across tenants. Per gateway replica."""

    max_length: int = Field(default=64, ge=0, le=100_000, description="waiting requests at most; 0: no queue")
    max_wait_s: float = Field(default=5.0, gt=0, le=600, description="then 429 with Retry-After")


class ProfileConfig(Strict):
    speculative: Speculation = SpeculationOff()
    queue: QueueConfig = QueueConfig()
    kv_cache_dtype: Literal["auto", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2"] = "auto"
    max_context: int | None = Field(default=None, gt=0, description="cap below the model's max_model_len")
    engine_args: dict[str, Any] = Field(default_factory=dict, description="extra vLLM engine arguments")


# --- GPU pool and deployments ----------------------------------------------------------------


class GpuClassConfig(Strict):
    vram_gb: float = Field(gt=0)
    bandwidth_gbps: float = Field(gt=0)
    resource: str = Field(description="Ray custom resource that stands for one card of this class")


class PoolNodeConfig(Strict):
    name: str
    gpu_class: str
    count: int = Field(ge=1)


class GpuPoolConfig(Strict):
    classes: dict[str, GpuClassConfig] = Field(default_factory=dict)
    nodes: list[PoolNodeConfig] = Field(default_factory=list)


class DeploymentConfig(Strict):
    """One engine deployment: a model served under a profile."""

    model: str
    profile: str
    replicas: int = Field(default=1, ge=0)
    min_replicas: int | None = Field(default=None, ge=0)
    max_replicas: int | None = Field(default=None, ge=1)
    num_cpus: float = Field(default=1.0, ge=0)
    gpu_class: str | None = None
    gpus_per_replica: int = Field(default=0, ge=0)
    max_ongoing_requests: int = Field(default=16, ge=1)
    env: dict[str, str] = Field(default_factory=dict, description="environment of the replica process")

    @property
    def name(self) -> str:
        return f"{self.model}@{self.profile}"


# --- tenants, auth, audit, telemetry, gateway --------------------------------------------------


_INT32 = 2**31 - 1  # the database columns' ranges: a larger value is a 422, not a database error
_INT64 = 2**63 - 1


class LimitsConfig(Strict):
    requests_per_minute: int | None = Field(default=None, ge=1, le=_INT32)
    tokens_per_minute: int | None = Field(default=None, ge=1, le=_INT32)
    concurrent_requests: int | None = Field(default=None, ge=1, le=_INT32)
    daily_token_budget: int | None = Field(default=None, ge=1, le=_INT64)
    monthly_token_budget: int | None = Field(default=None, ge=1, le=_INT64)


class TenantDefaultsConfig(Strict):
    limits: LimitsConfig = LimitsConfig(requests_per_minute=600, tokens_per_minute=200_000, concurrent_requests=16)
    allowed_profiles: list[str] = Field(default_factory=lambda: [DEEP_CONTEXT, FAST_AGENTIC])
    default_profile: str | None = None


class AuthConfig(Strict):
    oidc_issuer: str | None = None
    client_id: str | None = None
    audience: str | None = None
    api_key_pepper_file: Path | None = None
    failed_auth_limit: int = Field(
        default=20, ge=1, description="refused API keys/tokens/passwords per client address per window, then 429"
    )
    failed_auth_window_s: int = Field(default=60, ge=1, le=86_400)


class AuditConfig(Strict):
    retention_days: int | None = Field(default=None, ge=1)
    log_content: bool = False
    signing_key_file: Path | None = None
    content_key_file: Path | None = None
    checkpoint_interval_s: float = Field(
        default=60.0, gt=0, le=86_400, description="a signed head of every chain at least this often"
    )
    checkpoint_every: int = Field(default=10_000, ge=1, description="...or after this many events of one chain")
    trusted_key_fingerprints: list[str] = Field(
        default=[],
        description="SHA-256 fingerprints (64 hex) of the audit public keys `bastion audit verify` trusts "
        "without --public-key (the key itself comes from public_key_file or signing_key_file)",
    )
    public_key_file: Path | None = Field(default=None, description="audit public key (PEM) for verification")
    export_key_file: Path | None = Field(
        default=None, description="separate Ed25519 key that signs export manifests (default: the signing key)"
    )
    witness_dir: Path | None = Field(
        default=None, description="append-only (write-once) folder that receives a copy of every signed head"
    )
    witness_syslog: str | None = Field(
        default=None, description="syslog target for the witness: a socket path (/dev/log) or udp://host:port"
    )

    @field_validator("trusted_key_fingerprints")
    @classmethod
    def _fingerprints(cls, value: list[str]) -> list[str]:
        for item in value:
            if len(item) != 64 or any(c not in "0123456789abcdef" for c in item):
                raise ValueError(f"{item!r}: a fingerprint is 64 lowercase hex digits (bastion audit fingerprint)")
        return value

    operators: dict[str, Path] = Field(
        default_factory=dict,
        description="operator name → Ed25519 public key (PEM): audit CLI actions are recorded as the operator "
        "whose private key (--operator-key) matches; when set, an action without a pinned key is refused",
    )


class TelemetryConfig(Strict):
    otlp_endpoint: str | None = None
    service_name: str = "bastion"
    max_tenant_labels: int = Field(default=50, ge=1)
    metrics_token_file: Path | None = Field(
        default=None,
        description="bearer token Prometheus sends for the gateway's /metrics and /metrics/engines; "
        "default: the control plane's pool-stats token (control.pool_stats_token_file)",
    )
    # Live MTP/speculation acceptance against the baseline stored next to the model's weights
    # (mtp-acceptance-baseline.json, `bastion bench acceptance --write-baseline`): alert metric past the margin.
    acceptance_drift_margin: float = Field(default=0.10, gt=0, lt=1, description="drop (absolute) that alerts")
    acceptance_drift_min_draft_tokens: int = Field(default=500, ge=1, description="live drafts needed to judge")
    acceptance_drift_window_s: float = Field(default=900.0, gt=0, description="live window judged")


class EngineConfig(Strict):
    """The speculation correctness guard on every speculating replica (docs/engine.md, "Speculation guard")."""

    guard_enabled: bool = Field(default=True, description="false starts speculating replicas unchecked (logged)")
    guard_interval_s: float = Field(default=300.0, ge=1, le=86_400, description="a canary round this often")
    guard_after_sampled_requests: int = Field(default=500, ge=1, description="and after this many sampled requests")
    guard_greedy_min_match: float = Field(
        default=0.8, gt=0, le=1, description="share of golden greedy tokens a round must reproduce"
    )
    guard_tie_margin: float = Field(
        default=0.25, ge=0, le=5, description="nats: a first difference this close to a tie is a rounding flip"
    )
    guard_logprob_margin: float = Field(
        default=1.0,
        gt=0,
        le=20,
        description="nats/token the samples' target log-prob may move from the baseline (at least; the band "
        "widens to 3 standard deviations of the baseline's own rounds)",
    )
    guard_temperatures: list[float] = Field(default_factory=lambda: [0.7, 1.0], min_length=1, max_length=4)
    guard_live_min_tokens: int = Field(default=256, ge=1, description="live logprob tokens needed to judge")
    guard_live_margin: float = Field(default=2.5, gt=0, le=20, description="nats below the lowest baseline")
    allow_known_bad: list[str] = Field(
        default_factory=list, description="known-bad speculation rows (engine/known_bad.py) accepted by id"
    )

    @field_validator("guard_temperatures")
    @classmethod
    def _temperatures(cls, values: list[float]) -> list[float]:
        if any(not 0 < t <= 2 for t in values) or len(set(values)) != len(values):
            raise ValueError("guard temperatures must be distinct, above 0 and at most 2")
        return values


MIN_TENANT_WEIGHT, MAX_TENANT_WEIGHT = 0.1, 100.0  # a fair-share weight, in the platform file or a tenant's record


def weight_problem(weight: float) -> str | None:
    """Why a fair-share weight is refused (None: it is fine): finite, between the bounds."""
    if not math.isfinite(weight) or not MIN_TENANT_WEIGHT <= weight <= MAX_TENANT_WEIGHT:
        return f"a weight is between {MIN_TENANT_WEIGHT:g} and {MAX_TENANT_WEIGHT:g}, not {weight}"
    return None


class GatewayConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    # While the database is unreachable, keys seen within this many seconds keep working (0: none do);
    # revocations announced over Redis still take effect at once.
    key_cache_when_db_down_s: float = Field(default=300.0, ge=0, le=3600)
    # A tenant's share of a full profile's queue (by tenant name; others weigh 1): weight 2 starts twice as many.
    # A weight in the tenant's record (console, admin API, CLI) wins over this one.
    tenant_weights: dict[str, float] = Field(default_factory=dict)

    @field_validator("tenant_weights")
    @classmethod
    def _weights(cls, value: dict[str, float]) -> dict[str, float]:
        for name, weight in value.items():
            problem = weight_problem(weight)
            if problem is not None:
                raise ValueError(f"gateway.tenant_weights.{name}: {problem}")
        return value


class ControlConfig(Strict):
    """How the control plane reads live replica statistics from the gateway (docs/control.md)."""

    pool_stats_url: str | None = Field(
        default=None, description="the gateway's /internal/pool/replicas; default: the local gateway"
    )
    pool_stats_token_file: Path | None = Field(
        default=None, description="token shared by gateway and control plane; default: data_dir/pool_stats_token"
    )
    pool_stats_interval_s: float = Field(default=5.0, ge=1, le=300)
    pool_stats_history: int = Field(default=720, ge=10, le=100_000, description="samples kept in memory")


class DatabaseConfig(Strict):
    url: str


class RedisConfig(Strict):
    url: str | None = None
    # While Redis is unreachable: `fallback` limits in process per gateway replica (logged, metric
    # bastion_limiter_redis_unavailable), `refuse` answers 503. Per tenant (by name or id) in tenant_policies.
    when_unavailable: Literal["fallback", "refuse"] = "fallback"
    tenant_policies: dict[str, Literal["fallback", "refuse"]] = Field(default_factory=dict)


class RayConfig(Strict):
    address: str | None = Field(default=None, description="None starts a local Ray on 127.0.0.1")
    num_cpus: int | None = Field(default=None, ge=1)


# --- the platform file ---------------------------------------------------------------------------


class PlatformConfig(Strict):
    data_dir: Path
    database: DatabaseConfig
    redis: RedisConfig = RedisConfig()
    ray: RayConfig = RayConfig()
    models: list[ModelConfig]
    profiles: dict[str, ProfileConfig]
    deployments: list[DeploymentConfig]
    gpu_pool: GpuPoolConfig = GpuPoolConfig()
    tenant_defaults: TenantDefaultsConfig = TenantDefaultsConfig()
    auth: AuthConfig = AuthConfig()
    audit: AuditConfig = AuditConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    engine: EngineConfig = EngineConfig()
    gateway: GatewayConfig = GatewayConfig()
    control: ControlConfig = ControlConfig()
    external_replicas: list[ExternalReplicaConfig] = Field(
        default_factory=list, description="OpenAI-compatible servers outside Ray (docs/external-replicas.md)"
    )

    @field_validator("profiles")
    @classmethod
    def _profile_names(cls, profiles: dict[str, ProfileConfig]) -> dict[str, ProfileConfig]:
        for name in profiles:
            if not re.match(_NAME, name):
                raise ValueError(f"profile name {name!r} must match {_NAME}")
        return profiles

    @model_validator(mode="after")
    def _references(self) -> PlatformConfig:
        models = {m.name for m in self.models}
        if len(models) != len(self.models):
            raise ValueError("model names must be unique")
        for p_name, profile in self.profiles.items():
            spec = profile.speculative
            if isinstance(spec, DraftModelSpeculation) and spec.model not in models:
                raise ValueError(f"profiles.{p_name}.speculative.model: unknown model {spec.model!r}")
        seen: set[str] = set()
        for i, dep in enumerate(self.deployments):
            if dep.model not in models:
                raise ValueError(f"deployments.{i}.model: unknown model {dep.model!r}")
            if dep.profile not in self.profiles:
                raise ValueError(f"deployments.{i}.profile: unknown profile {dep.profile!r}")
            if dep.gpu_class is not None and dep.gpu_class not in self.gpu_pool.classes:
                raise ValueError(f"deployments.{i}.gpu_class: unknown GPU class {dep.gpu_class!r}")
            if dep.name in seen:
                raise ValueError(f"deployments.{i}: {dep.name} is listed twice")
            seen.add(dep.name)
        for i, node in enumerate(self.gpu_pool.nodes):
            if node.gpu_class not in self.gpu_pool.classes:
                raise ValueError(f"gpu_pool.nodes.{i}.gpu_class: unknown GPU class {node.gpu_class!r}")
        for name in self.tenant_defaults.allowed_profiles:
            if name not in self.profiles:
                raise ValueError(f"tenant_defaults.allowed_profiles: unknown profile {name!r}")
        check_external(self.external_replicas, set(self.profiles), seen)
        return self

    def model(self, name: str) -> ModelConfig:
        return next(m for m in self.models if m.name == name)
