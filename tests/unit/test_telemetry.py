"""Telemetry units: bounded tenant labels, the metrics a record moves, merged engine expositions, JSON logs."""

from __future__ import annotations

import io
import json
import logging
from datetime import UTC, datetime

import pytest
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client.parser import text_string_to_metric_families

from bastion.records import RequestRecord, SpeculationStats
from bastion.telemetry.logging import JsonFormatter, configure_logging, request_id_var
from bastion.telemetry.metrics import OTHER, GatewayMetrics, TenantLabels, merge_expositions
from bastion.telemetry.tracing import traces_url

pytestmark = pytest.mark.unit


def record(**kwargs) -> RequestRecord:
    base = {
        **dict(request_id="r1", tenant_id="t1", key_id="k1", endpoint="chat", model="m1", profile="fast-agentic"),
        **dict(upstream="engine-m1--fast-agentic", routing_reason="default", status=200, error_code=None, stream=True),
        **dict(prompt_tokens=10, completion_tokens=5, started_at=datetime.now(UTC), latency_ms=120.0, ttft_ms=20.0),
        "speculation": SpeculationStats(drafts=4, draft_tokens=12, accepted_tokens=9),
    }
    return RequestRecord(**{**base, **kwargs})


def value(metrics: GatewayMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_tenant_labels_fold_into_other_past_the_limit() -> None:
    labels = TenantLabels(2)
    assert [labels(t) for t in ("a", "b", "c", "a", "d")] == ["a", "b", OTHER, "a", OTHER]
    assert labels(None) == "none"


def test_a_record_moves_tokens_speculation_and_latency() -> None:
    metrics = GatewayMetrics(max_tenant_labels=1)
    metrics.record(record())
    metrics.record(record(tenant_id="t2", prompt_tokens=3, completion_tokens=2))
    usage = {"profile": "fast-agentic", "model": "m1"}
    assert value(metrics, "bastion_prompt_tokens_total", tenant="t1", **usage) == 10
    assert value(metrics, "bastion_prompt_tokens_total", tenant=OTHER, **usage) == 3
    assert value(metrics, "bastion_completion_tokens_total", tenant="t1", **usage) == 5
    assert value(metrics, "bastion_speculation_draft_tokens_total", tenant="t1", **usage) == 12
    assert value(metrics, "bastion_speculation_accepted_tokens_total", tenant="t1", **usage) == 9
    assert value(metrics, "bastion_speculation_steps_total", tenant="t1", **usage) == 4
    assert value(metrics, "bastion_requests_total", endpoint="chat", status="200", **usage) == 2
    assert value(metrics, "bastion_time_to_first_token_seconds_count", **usage) == 2
    # (120 ms - 20 ms) over 4 gaps between 5 tokens = 25 ms
    assert value(metrics, "bastion_inter_token_latency_seconds_sum", **usage) == pytest.approx(0.025 + 0.1)


def test_errors_and_rejections() -> None:
    metrics = GatewayMetrics()
    metrics.record(record(status=429, error_code="tokens_per_minute", prompt_tokens=0, completion_tokens=0))
    metrics.record(record(status=401, error_code="invalid_api_key", tenant_id=None, profile=None, model="m1"))
    metrics.record(record(endpoint="usage"))  # not inference: not counted
    assert value(metrics, "bastion_rate_limit_rejections_total", tenant="t1", limit="tokens_per_minute") == 1
    labels = {"endpoint": "chat", "model": "m1"}
    assert value(metrics, "bastion_request_errors_total", profile="", status="401", code="invalid_api_key", **labels)
    assert value(metrics, "bastion_requests_total", profile="fast-agentic", status="200", **labels) is None


def test_state_gauges_read_at_scrape_time() -> None:
    metrics = GatewayMetrics()
    flights = {"up-a": 2}
    metrics.watch_in_flight(lambda: flights)

    class Audit:
        queue_depth, spool_bytes = 7, 1024

    metrics.watch_audit(Audit())
    assert value(metrics, "bastion_upstream_in_flight", upstream="up-a") == 2
    flights["up-a"] = 0
    assert value(metrics, "bastion_upstream_in_flight", upstream="up-a") == 0
    assert value(metrics, "bastion_audit_queue_depth") == 7
    assert value(metrics, "bastion_audit_spool_bytes") == 1024


def test_merge_expositions_labels_each_upstream() -> None:
    text = (
        "# HELP vllm:kv_cache_usage_perc KV\n# TYPE vllm:kv_cache_usage_perc gauge\n"
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
        "# HELP vllm:spec_decode_num_drafts_total D\n# TYPE vllm:spec_decode_num_drafts_total counter\n"
        'vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 4.0\n'
    )
    merged = merge_expositions([({"upstream": "a"}, text), ({"upstream": "b"}, text.replace("0.25", "0.5"))]).decode()
    samples = {
        (s.name, s.labels["upstream"]): s.value for f in text_string_to_metric_families(merged) for s in f.samples
    }
    assert samples[("vllm:kv_cache_usage_perc", "a")] == 0.25
    assert samples[("vllm:kv_cache_usage_perc", "b")] == 0.5
    assert samples[("vllm:spec_decode_num_drafts_total", "b")] == 4


def test_json_logs_carry_request_and_trace_ids_not_exception_text() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("bastion.test-json")
    logger.addHandler(handler)
    logger.propagate = False
    tracer = TracerProvider().get_tracer("t")
    token = request_id_var.set("req-42")
    try:
        with tracer.start_as_current_span("s") as span:
            try:
                raise ValueError("the prompt was: secret")
            except ValueError:
                logger.exception("request failed")
    finally:
        request_id_var.reset(token)
        logger.removeHandler(handler)
    line = json.loads(stream.getvalue())
    assert line["request_id"] == "req-42" and line["message"] == "request failed"
    assert line["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert line["exception"] == "ValueError" and "secret" not in stream.getvalue()


def test_configure_logging_is_idempotent() -> None:
    logger = configure_logging("debug", logger="bastion.test-configure")
    configure_logging("info", logger="bastion.test-configure")
    assert len(logger.handlers) == 1 and logger.level == logging.INFO


def test_traces_url() -> None:
    assert traces_url("http://c:4318") == "http://c:4318/v1/traces"
    assert traces_url("http://c:4318/v1/traces/") == "http://c:4318/v1/traces"
