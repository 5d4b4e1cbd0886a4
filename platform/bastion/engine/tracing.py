"""Replica-side tracing: a span around the engine call, continuing the gateway's trace.

The gateway sends its `engine.call` span context in the body under `TRACE_KEY` (a W3C `traceparent` carrier);
`split_trace` removes it before vLLM validates the body. Without a configured ReplicaTracing (the default) the
replica only checks `is None`. The engine knows nothing of `telemetry/`: this module uses OpenTelemetry directly.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACE_KEY = "_bastion_trace"
_PROPAGATOR = TraceContextTextMapPropagator()


def split_trace(body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str] | None]:
    """The body without the private trace key, and the carrier (None when the gateway sent none)."""
    if TRACE_KEY not in body:
        return body, None
    body = dict(body)
    carrier = body.pop(TRACE_KEY)
    return body, carrier if isinstance(carrier, dict) else None


class ReplicaTracing:
    """The tracer of one engine replica process."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("bastion.engine")

    @classmethod
    def create(
        cls, endpoint: str | None, service_name: str = "bastion-engine", exporter: SpanExporter | None = None
    ) -> ReplicaTracing | None:
        """From an OTLP/HTTP endpoint (base or full /v1/traces URL); None when there is neither one nor an exporter.

        Without an explicit endpoint the standard `OTEL_EXPORTER_OTLP_ENDPOINT` of the replica's environment
        (`deployments[].env` in the platform file) is used.
        """
        endpoint = endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if exporter is None:
            if not endpoint:
                return None
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            url = endpoint.rstrip("/")
            exporter = OTLPSpanExporter(endpoint=url if url.endswith("/v1/traces") else f"{url}/v1/traces", timeout=5)
        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
        return cls(provider)

    @contextlib.contextmanager
    def span(self, name: str, carrier: dict[str, str], attributes: dict[str, Any]) -> Iterator[Span]:
        """A server span, child of the gateway's engine call."""
        span = self.tracer.start_span(
            name, context=_PROPAGATOR.extract(carrier), kind=SpanKind.SERVER, attributes=attributes
        )
        try:  # not made current: a stream's generator may resume in another context
            yield span
        except Exception as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            span.end()

    def force_flush(self, timeout_ms: int = 5000) -> bool:
        return self.provider.force_flush(timeout_ms)

    def shutdown(self) -> None:
        self.provider.shutdown()


def request_timings(span: Span, metrics: Any) -> None:
    """vLLM's per-request timings (`metrics` of the response) as span attributes: queue, prefill, decode."""
    if not isinstance(metrics, dict):
        return
    for key, attr in (
        ("queue_time_ms", "vllm.queue_ms"),
        ("time_to_first_token_ms", "vllm.prefill_ms"),
        ("generation_time_ms", "vllm.decode_ms"),
        ("mean_itl_ms", "vllm.mean_itl_ms"),
    ):
        value = metrics.get(key)
        if isinstance(value, int | float):
            span.set_attribute(attr, float(value))
