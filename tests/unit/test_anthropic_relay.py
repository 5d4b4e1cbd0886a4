"""The gateway's reading of Anthropic answers: usage from the stream's events and the final body, and errors
rewritten into Anthropic's shape with the gateway's headers kept."""

from __future__ import annotations

import json

from fastapi.responses import JSONResponse

from bastion.gateway.anthropic import anthropic_response, inspect_chunk
from bastion.gateway.errors import ApiError
from bastion.gateway.relay import StreamTally, usage_of


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def test_stream_usage_and_end_come_from_the_events() -> None:
    tally = StreamTally()
    start = _event("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 7}}})
    deltas = "".join(_event("content_block_delta", {"type": "content_block_delta"}) for _ in range(3))
    end = _event("message_delta", {"type": "message_delta", "usage": {"output_tokens": 3}})
    chunk = start + deltas + end + _event("message_stop", {"type": "message_stop"})
    assert inspect_chunk(chunk, tally, False) == chunk  # forwarded untouched
    assert (tally.prompt_tokens, tally.completion_tokens, tally.chunks, tally.done) == (7, 3, 3, True)
    inspect_chunk(_event("error", {"type": "error", "error": {"type": "api_error", "message": "x"}}), tally, False)
    assert tally.error == {"type": "api_error", "message": "x"}


def test_final_body_usage() -> None:
    assert usage_of({"usage": {"input_tokens": 5, "output_tokens": 2}})[:2] == (5, 2)


def test_errors_take_anthropics_shape_and_keep_headers() -> None:
    out = anthropic_response(ApiError(429, "slow down", code="rpm", headers={"retry-after": "3"}).response())
    assert isinstance(out, JSONResponse) and out.status_code == 429 and out.headers["retry-after"] == "3"
    assert json.loads(bytes(out.body)) == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "slow down"},
    }
    ok = JSONResponse({"type": "message"})
    assert anthropic_response(ok) is ok
