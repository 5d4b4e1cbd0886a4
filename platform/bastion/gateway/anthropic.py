"""Anthropic's Messages API (`/v1/messages`) on the gateway: the same key, scope, tenant, limits, routing, usage,
audit and tracing path as chat (`GatewayService.inference` with endpoint "messages"); the engine replica answers
through vLLM's own Anthropic serving layer (`AnthropicServingMessages`), so requests and answers, streamed events
included, are vLLM's conversion, not Bastion's.

What is Anthropic's here: the key may come as `x-api-key` (Claude Code and the SDK send it) as well as a bearer
token; every error, the gateway's own included, has Anthropic's shape `{"type": "error", "error": {type, message}}`;
usage is read from `message_start`/`message_delta` events and the final body's `input_tokens`/`output_tokens`.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from bastion.gateway.relay import StreamTally, split_events

# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors).
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def error_body(status: int, message: str) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def with_api_key_as_bearer(request: Request) -> None:
    """`x-api-key: KEY` counts as `authorization: Bearer KEY` when no authorization header was sent."""
    headers = request.scope["headers"]
    if any(k == b"authorization" for k, _ in headers):
        return
    key = next((v for k, v in headers if k == b"x-api-key"), None)
    if key is not None:
        request.scope["headers"] = [*headers, (b"authorization", b"Bearer " + key)]


def anthropic_response(response: Response) -> Response:
    """An error answer (the gateway's OpenAI-shaped ones, or the engine's) in Anthropic's shape, headers kept."""
    if response.status_code < 400 or not isinstance(response, JSONResponse):
        return response
    try:
        data = json.loads(bytes(response.body))
    except ValueError:
        data = {}
    error = data.get("error") if isinstance(data, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
    body = error_body(response.status_code, str(message or "The request failed"))
    return JSONResponse(body, status_code=response.status_code, headers=headers)


def inspect_event(event: str, tally: StreamTally) -> None:
    """Account for one Anthropic SSE event (`event: NAME\\ndata: {...}`): usage, errors, the end."""
    data_line = next((line for line in event.splitlines() if line.startswith("data:")), None)
    if data_line is None:
        return
    try:
        data = json.loads(data_line[5:])
    except ValueError:
        return
    if not isinstance(data, dict):
        return
    kind = data.get("type")
    if kind == "content_block_delta":
        tally.chunks += 1
    elif kind == "message_start":
        usage = (data.get("message") or {}).get("usage") or {}
        if isinstance(usage.get("input_tokens"), int):
            tally.prompt_tokens = usage["input_tokens"]
    elif kind == "message_delta":
        usage = data.get("usage") or {}
        if isinstance(usage.get("output_tokens"), int):
            tally.completion_tokens = usage["output_tokens"]
        if isinstance(usage.get("input_tokens"), int) and usage["input_tokens"] > 0:
            tally.prompt_tokens = usage["input_tokens"]
    elif kind == "message_stop":
        tally.done = True
    elif kind == "error" or isinstance(data.get("error"), dict):
        tally.error = data.get("error") if isinstance(data.get("error"), dict) else {"message": "stream error"}


def inspect_chunk(chunk: str, tally: StreamTally, _keep_usage_chunk: bool) -> str | None:
    """Every event is forwarded as it came (Anthropic's stream has no optional usage chunk to drop)."""
    for event in split_events(chunk):
        inspect_event(event, tally)
    return chunk
