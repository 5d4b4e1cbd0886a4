"""One trace per request across processes: Serve's proxy → gateway replica → engine replica (real vLLM)."""

from __future__ import annotations

import secrets

import httpx
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_client_trace_continues_through_gateway_and_engine_replica(platform_stack, otlp_receiver) -> None:
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    response = httpx.post(
        f"{platform_stack.base_url}/chat/completions",
        json={"model": "smollm2-135m@deep-context", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        headers={"Authorization": f"Bearer {platform_stack.token}", "traceparent": f"00-{trace_id}-{parent}-01"},
        timeout=120,
    )
    assert response.status_code == 200

    spans = otlp_receiver.wait_for(trace_id, {"gateway.request", "engine.call", "engine.replica.complete"}, 30)
    root, call, replica = spans["gateway.request"], spans["engine.call"], spans["engine.replica.complete"]
    assert root.parent_id == parent  # the client's trace id and span are kept
    assert call.parent_id == root.span_id
    assert replica.parent_id == call.span_id  # crossed the Ray handle into the engine replica's process
    assert replica.service != root.service  # exported by the replica, not the gateway
    assert replica.attributes["bastion.profile"] == "deep-context"
