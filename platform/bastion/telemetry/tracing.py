"""Gateway-side tracing: one trace per request, W3C `traceparent` in and out, OTLP/HTTP export.

Off by default: `GatewayTracing.from_config` returns None without `telemetry.otlp_endpoint`, and the gateway
then only checks `is None` on the request path. Each app gets its own TracerProvider (never the global one), so
several gateways in one process do not share exporters.

Spans of a request: `gateway.request` (server) → `authenticate`, `count_tokens`, `route`, `limits`,
`engine.call` (client; its context travels to the replica in the body under `TRACE_KEY`) and `audit.hand_off`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from bastion.config.schema import TelemetryConfig

# The private body key the replica strips before vLLM sees the request (engine/tracing.py uses the same name).
TRACE_KEY = "_bastion_trace"
_PROPAGATOR = TraceContextTextMapPropagator()


def traces_url(endpoint: str) -> str:
    """`http://collector:4318` → `http://collector:4318/v1/traces`; a full traces URL is kept."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else f"{endpoint}/v1/traces"


def otlp_provider(endpoint: str, service_name: str, exporter: SpanExporter | None = None) -> TracerProvider:
    """A TracerProvider that batches spans to an OTLP/HTTP (protobuf) endpoint."""
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=traces_url(endpoint), timeout=5)
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
    return provider


class RequestTrace:
    """The spans of one request at the gateway; the root ends in `finish`."""

    __slots__ = ("_engine", "_tracer", "root")

    def __init__(self, tracer: trace.Tracer, root: Span) -> None:
        self._tracer = tracer
        self.root = root
        self._engine: Span | None = None

    @property
    def trace_id(self) -> str:
        return format(self.root.get_span_context().trace_id, "032x")

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[Span]:
        """A child span of the request (exceptions are recorded by the SDK and re-raised)."""
        parent = trace.set_span_in_context(self.root)
        with self._tracer.start_as_current_span(name, context=parent) as span:
            yield span

    def engine_body(self, upstream: str, body: dict[str, Any]) -> dict[str, Any]:
        """Open the `engine.call` span; the body to send, carrying its context for the replica."""
        parent = trace.set_span_in_context(self.root)
        self._engine = self._tracer.start_span(
            "engine.call", context=parent, kind=SpanKind.CLIENT, attributes={"bastion.upstream": upstream}
        )
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(self._engine))
        return {**body, TRACE_KEY: carrier}

    def engine_done(self, status: int | None = None) -> None:
        if self._engine is None:
            return
        if status is not None:
            self._engine.set_attribute("http.response.status_code", status)
            if status >= 500:
                self._engine.set_status(Status(StatusCode.ERROR))
        self._engine.end()
        self._engine = None

    def finish(self, record: Any) -> None:
        """End every open span with the request's outcome (a RequestRecord: no content, no secrets)."""
        self.engine_done(record.status if self._engine is not None else None)
        root = self.root
        attributes = {
            "http.response.status_code": record.status,
            "bastion.tenant_id": record.tenant_id or "",
            "bastion.model": record.model or "",
            "bastion.profile": record.profile or "",
            "bastion.routing_reason": record.routing_reason or "",
            "bastion.stream": record.stream,
            "bastion.prompt_tokens": record.prompt_tokens,
            "bastion.completion_tokens": record.completion_tokens,
        }
        if record.error_code:
            attributes["error.type"] = record.error_code
        if record.speculation is not None:
            attributes["bastion.speculation.draft_tokens"] = record.speculation.draft_tokens
            attributes["bastion.speculation.accepted_tokens"] = record.speculation.accepted_tokens
        root.set_attributes(attributes)
        if record.status >= 500:
            root.set_status(Status(StatusCode.ERROR))
        root.end()


class GatewayTracing:
    """The tracer of one gateway app."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("bastion.gateway")

    @classmethod
    def from_config(cls, config: TelemetryConfig, exporter: SpanExporter | None = None) -> GatewayTracing | None:
        if not config.otlp_endpoint:
            return None
        return cls(otlp_provider(config.otlp_endpoint, config.service_name, exporter))

    def begin(self, headers: Mapping[str, str], endpoint: str, request_id: str) -> RequestTrace:
        """The root span, continuing the client's W3C trace context when it sent a valid one."""
        parent = _PROPAGATOR.extract(headers) if "traceparent" in headers else otel_context.Context()
        root = self.tracer.start_span(
            "gateway.request",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"bastion.request_id": request_id, "bastion.endpoint": endpoint},
        )
        return RequestTrace(self.tracer, root)

    def force_flush(self, timeout_ms: int = 5000) -> bool:
        return self.provider.force_flush(timeout_ms)

    def shutdown(self) -> None:
        self.provider.shutdown()


@contextlib.contextmanager
def activated(span: Span) -> Iterator[None]:
    """Make `span` current (so log records carry its trace id) for the block."""
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield
    finally:
        otel_context.detach(token)
