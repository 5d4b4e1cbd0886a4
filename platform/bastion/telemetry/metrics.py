"""Prometheus metrics of one gateway replica, fed by the RequestRecords the gateway already produces.

`GatewayMetrics` is a RequestRecorder: the request path is unchanged, each finished request updates counters
and histograms in this replica's own registry (several apps may share a process, so never the global one).
Gauges that describe state (in-flight per upstream, the audit writer's queue and spool) are read at scrape time.
Tenant labels are bounded: past `max_tenant_labels` distinct tenants, new ones are counted as `other`.

`merge_expositions` joins the engine replicas' own texts (vLLM's registry plus Bastion's replica gauges) into
one exposition, each sample labelled with its upstream, for the gateway's `/metrics/engines`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OTHER = "other"
NO_TENANT = "none"
_INFERENCE = frozenset({"chat", "completion", "messages"})
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1)


class AuditSource(Protocol):
    """What the gateway metrics read from the audit writer at scrape time."""

    @property
    def queue_depth(self) -> int: ...

    @property
    def spool_bytes(self) -> int: ...

    @property
    def conflicts(self) -> int: ...


class TenantLabels:
    """The first `limit` tenants keep their own label; the rest fold into `other`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, tenant_id: str | None) -> str:
        if tenant_id is None:
            return NO_TENANT
        if tenant_id in self._seen:
            return tenant_id
        with self._lock:
            if len(self._seen) < self.limit:
                self._seen.add(tenant_id)
                return tenant_id
        return OTHER


class LimiterSource(Protocol):
    """What the state collector reads from the limiter (tenancy.limiter.Limiter)."""

    redis_down: bool
    fallback_admissions: int
    redis_refusals: int


class _StateCollector(Collector):
    """Gauges read when Prometheus scrapes: in-flight requests per upstream, audit queue and spool, limiter."""

    def __init__(self) -> None:
        self.in_flight: Callable[[], Mapping[str, int]] | None = None
        self.queue_depth: Callable[[], Mapping[tuple[str, str], int]] | None = None
        self.audit: AuditSource | None = None
        self.limiter: LimiterSource | None = None

    def collect(self) -> Iterable[Metric]:
        flight = GaugeMetricFamily(
            "bastion_upstream_in_flight",
            "Requests this gateway replica has in flight, per upstream",
            labels=["upstream"],
        )
        for upstream, count in sorted((self.in_flight() if self.in_flight else {}).items()):
            flight.add_metric([upstream], count)
        yield flight
        if self.queue_depth is not None:
            depth = GaugeMetricFamily(
                "bastion_queue_depth",
                "Requests waiting in this gateway replica's fair queue for a full profile, per tenant and profile",
                labels=["tenant", "profile"],
            )
            for (tenant, profile), count in sorted(self.queue_depth().items()):
                depth.add_metric([tenant, profile], count)
            yield depth
        if self.audit is not None:
            yield GaugeMetricFamily(
                "bastion_audit_queue_depth", "Audit events accepted but not yet durable", value=self.audit.queue_depth
            )
            yield GaugeMetricFamily(
                "bastion_audit_spool_bytes",
                "Audit bytes in the local spool waiting for the database (non-zero: the database was unreachable)",
                value=self.audit.spool_bytes,
            )
            yield CounterMetricFamily(
                "bastion_audit_conflicts",
                "Audit events refused because their chain position already held another event (kept, not lost)",
                value=getattr(self.audit, "conflicts", 0),
            )
        if self.limiter is not None:
            yield GaugeMetricFamily(
                "bastion_limiter_redis_unavailable",
                "1 while Redis is unreachable and limits fall back to this replica (or refuse, per tenant)",
                value=int(self.limiter.redis_down),
            )
            yield CounterMetricFamily(
                "bastion_limiter_fallback_admissions",
                "Requests admitted by the in-process limiter because Redis was unreachable",
                value=self.limiter.fallback_admissions,
            )
            yield CounterMetricFamily(
                "bastion_limiter_redis_refusals",
                "Requests refused (503) because Redis was unreachable and the tenant's policy is refuse",
                value=self.limiter.redis_refusals,
            )


class GatewayMetrics:
    """A RequestRecorder that turns each finished request into Prometheus samples in its own registry."""

    def __init__(self, max_tenant_labels: int = 50, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.tenant = TenantLabels(max_tenant_labels)
        r = self.registry
        route = ["endpoint", "profile", "model"]
        usage = ["tenant", "profile", "model"]
        self.requests = Counter("bastion_requests", "Requests finished, by HTTP status", [*route, "status"], registry=r)
        self.errors = Counter(
            "bastion_request_errors",
            "Requests answered with an error, by status and code",
            [*route, "status", "code"],
            registry=r,
        )
        self.prompt_tokens = Counter("bastion_prompt_tokens", "Prompt tokens (tokens in) charged", usage, registry=r)
        self.completion_tokens = Counter(
            "bastion_completion_tokens", "Completion tokens (tokens out) generated", usage, registry=r
        )
        self.latency = Histogram(
            "bastion_request_duration_seconds",
            "End-to-end latency at the gateway",
            route,
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.ttft = Histogram(
            "bastion_time_to_first_token_seconds",
            "Time to the first streamed chunk",
            ["profile", "model"],
            registry=r,
            buckets=_TTFT_BUCKETS,
        )
        self.itl = Histogram(
            "bastion_inter_token_latency_seconds",
            "Mean time between tokens of a streamed request",
            ["profile", "model"],
            registry=r,
            buckets=_ITL_BUCKETS,
        )
        self.spec_steps = Counter(
            "bastion_speculation_steps", "Speculative verification steps (drafts)", usage, registry=r
        )
        self.spec_drafted = Counter("bastion_speculation_draft_tokens", "Draft tokens proposed", usage, registry=r)
        self.spec_accepted = Counter("bastion_speculation_accepted_tokens", "Draft tokens accepted", usage, registry=r)
        self.rejections = Counter(
            "bastion_rate_limit_rejections",
            "Requests refused by a limit or budget (429)",
            ["tenant", "limit"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "bastion_queue_wait_seconds",
            "Time a request waited in a full profile's fair queue (this gateway replica), per tenant and profile",
            ["tenant", "profile"],
            registry=r,
            buckets=_TTFT_BUCKETS,
        )
        self.state = _StateCollector()
        r.register(self.state)
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        """The labelled child, remembered: `labels()` validates and locks on every call, ~10 µs on the request
        path; label values are bounded (tenants fold into `other`), so the dictionary is too."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # --- wiring ------------------------------------------------------------------------------------------

    def watch_in_flight(self, source: Callable[[], Mapping[str, int]]) -> None:
        self.state.in_flight = source

    def watch_queues(self, depth: Callable[[], Mapping[tuple[str, str], int]]) -> None:
        def folded() -> dict[tuple[str, str], int]:
            out: dict[tuple[str, str], int] = {}
            for (tenant, profile), n in depth().items():
                key = (self.tenant(tenant), profile)
                out[key] = out.get(key, 0) + n
            return out

        self.state.queue_depth = folded

    def observe_queue_wait(self, tenant_id: str, profile: str, seconds: float) -> None:
        """One request's time in a profile's fair queue (whether it got a slot or gave up)."""
        self._child(self.queue_wait, self.tenant(tenant_id), profile).observe(seconds)

    def watch_audit(self, writer: AuditSource) -> None:
        self.state.audit = writer

    def watch_limiter(self, limiter: LimiterSource) -> None:
        self.state.limiter = limiter

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # --- the recorder ------------------------------------------------------------------------------------

    def record(self, record: Any) -> None:
        """Take a RequestRecord (records.py); never raises into the request."""
        if record.endpoint not in _INFERENCE:
            return
        profile, model = record.profile or "", record.model or ""
        status = str(record.status)
        child = self._child
        child(self.requests, record.endpoint, profile, model, status).inc()
        child(self.latency, record.endpoint, profile, model).observe(record.latency_ms / 1000)
        tenant = self.tenant(record.tenant_id)
        if record.status >= 400:
            child(self.errors, record.endpoint, profile, model, status, record.error_code or "").inc()
            if record.status == 429:
                child(self.rejections, tenant, record.error_code or "unknown").inc()
        if record.prompt_tokens:
            child(self.prompt_tokens, tenant, profile, model).inc(record.prompt_tokens)
        if record.completion_tokens:
            child(self.completion_tokens, tenant, profile, model).inc(record.completion_tokens)
        if record.stream and record.ttft_ms is not None and record.status < 400:
            child(self.ttft, profile, model).observe(record.ttft_ms / 1000)
            if record.completion_tokens > 1:
                gap = (record.latency_ms - record.ttft_ms) / 1000 / (record.completion_tokens - 1)
                child(self.itl, profile, model).observe(max(gap, 0.0))
        spec = record.speculation
        if spec is not None and (spec.drafts or spec.draft_tokens):
            child(self.spec_steps, tenant, profile, model).inc(spec.drafts)
            child(self.spec_drafted, tenant, profile, model).inc(spec.draft_tokens)
            child(self.spec_accepted, tenant, profile, model).inc(spec.accepted_tokens)


def merge_expositions(parts: Iterable[tuple[Mapping[str, str], str]]) -> bytes:
    """Join Prometheus texts into one, adding each part's labels (e.g. `upstream`) to every one of its samples."""
    families: dict[str, Metric] = {}
    for extra, text in parts:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for s in family.samples:
                merged.add_sample(s.name, {**s.labels, **extra}, s.value, s.timestamp, s.exemplar)

    class _Frozen(Collector):
        def collect(self) -> Iterable[Metric]:
            return families.values()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Frozen())
    return generate_latest(registry)
