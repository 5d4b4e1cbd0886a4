"""Relay helpers and request validation: what is forwarded, what is stripped, what is a 400."""

from __future__ import annotations

import json

import pytest

from bastion.gateway.errors import ApiError, is_error_body
from bastion.gateway.protocol import ChatCompletionRequest, CompletionRequest, ValidationError, first_error
from bastion.gateway.relay import StreamTally, inspect_chunk, inspect_event, split_events, upstream_body, usage_of
from bastion.gateway.service import first_event_error
from bastion.records import SpeculationStats
from bastion.tenancy.limiter_plan import RateHeaders, WindowState

pytestmark = pytest.mark.unit


def event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def test_upstream_body_always_asks_for_usage_when_streaming() -> None:
    body = {"model": "m@fast-agentic", "stream": True, "stream_options": {"include_usage": False}, "x": 1}
    sent = upstream_body(body, "m", True)
    assert sent == {"model": "m", "stream": True, "stream_options": {"include_usage": True}, "x": 1}
    assert body["model"] == "m@fast-agentic"  # the client's dict is not modified
    assert "stream_options" not in upstream_body({"model": "m"}, "m", False)


def test_usage_chunk_is_read_and_stripped_unless_asked() -> None:
    usage = {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    spec = {"num_draft_tokens": 8, "num_accepted_draft_tokens": 6, "mean_acceptance_length": 2.5}
    final = event({"choices": [], "usage": usage, "metrics": {"speculative_decoding": spec}})
    for keep in (True, False):
        tally = StreamTally()
        assert inspect_event(event({"choices": [{"delta": {"content": "hi"}}]}), tally, keep) is not None
        assert (inspect_event(final, tally, keep) is not None) is keep
        assert inspect_event("data: [DONE]\n\n", tally, keep) == "data: [DONE]\n\n"
        assert (tally.prompt_tokens, tally.completion_tokens, tally.chunks, tally.done) == (4, 2, 1, True)
        assert tally.speculation == SpeculationStats(draft_tokens=8, accepted_tokens=6)
        assert tally.speculation.acceptance_rate == 0.75


def test_error_event_is_forwarded_and_noted() -> None:
    tally = StreamTally()
    line = event({"error": {"message": "boom", "code": 500}})
    assert inspect_event(line, tally, False) == line and tally.error == {"message": "boom", "code": 500}
    assert inspect_event(": keepalive\n\n", tally, False) == ": keepalive\n\n"


def test_usage_of_non_streaming_body() -> None:
    assert usage_of({"usage": {"prompt_tokens": 3, "completion_tokens": 1}}) == (3, 1, None)
    assert usage_of({}) == (None, None, None)
    assert SpeculationStats.from_response_metrics({"num_draft_tokens": True}) == SpeculationStats()
    assert SpeculationStats.from_response_metrics("nope") is None


def test_request_validation_allows_extra_openai_fields() -> None:
    chat = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": 1, "logit_bias": {}, "max_tokens": 5}
    )
    assert chat.completion_limit == 5 and chat.model_extra == {"seed": 1, "logit_bias": {}}
    chat = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5, "max_completion_tokens": 7}
    )
    assert chat.completion_limit == 7
    assert CompletionRequest.model_validate({"model": "m", "prompt": [1, 2, 3]}).completion_limit is None


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"model": "m", "messages": [{"role": "user"}], "stream": "yes"}, "stream"),
        ({"model": "m", "messages": [{"role": "user"}], "max_tokens": 1.5}, "max_tokens"),
        ({"model": "m", "messages": [{"role": "user"}], "temperature": 3}, "temperature"),
        ({"model": "m", "messages": [{"role": "user"}], "tools": [{"type": "web"}]}, "tools.0.type"),
    ],
)
def test_invalid_fields_name_the_param(body: dict, param: str) -> None:
    with pytest.raises(ValidationError) as err:
        ChatCompletionRequest.model_validate(body)
    message, found = first_error(err.value)
    assert found == param and param in message


def test_error_shape_and_rate_headers() -> None:
    body = ApiError(429, "slow down", code="requests_per_minute").body()
    assert body == {
        "error": {"message": "slow down", "type": "rate_limit_error", "param": None, "code": "requests_per_minute"}
    }
    assert is_error_body(body) and not is_error_body({"error": "x"})
    assert ApiError(503, "x").type == "service_unavailable" and ApiError(401, "x").type == "invalid_request_error"
    headers = RateHeaders(requests=WindowState(10, -1, 12.3456)).as_headers()
    assert headers == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "12.346s",
    }


def test_several_events_in_one_chunk() -> None:
    error = {"error": {"message": "engine failed", "type": "server_error", "param": None, "code": 503}}
    chunk = f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n"
    assert split_events(chunk) == [f"data: {json.dumps(error)}\n\n", "data: [DONE]\n\n"]
    tally = StreamTally()
    assert inspect_chunk(chunk, tally, False) == chunk and tally.error is not None and tally.done
    refused = first_event_error(chunk)
    assert refused is not None and refused.status == 503 and refused.message == "engine failed"
    usage = event({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
    assert inspect_chunk(usage + "data: [DONE]\n\n", StreamTally(), False) == "data: [DONE]\n\n"
    assert first_event_error(event({"choices": []})) is None
