"""Decode speed of one streamed chat request, measured the same way by every engine benchmark."""

from __future__ import annotations

import json
import time
from typing import Any

from bastion.engine.replica import EngineReplica
from bastion.engine.speculation import SpeculationStats


async def timed_chat(replica: EngineReplica, body: dict[str, Any]) -> tuple[int, float, SpeculationStats | None]:
    """(completion tokens, seconds from the first to the last content token, speculation stats or None).

    Prefill is excluded: the clock starts at the first token. Usage is always requested, so the final chunk
    carries the token count and the request's speculation figures.
    """
    body = {**body, "stream_options": {"include_usage": True}}
    first = last = None
    final: dict[str, Any] = {}
    async for text in replica.stream("chat", body):
        now = time.perf_counter()
        for block in text.split("\n\n"):
            if not block.startswith("data: {"):
                continue
            event = json.loads(block[6:])
            if "error" in event:
                raise RuntimeError(f"engine error: {event['error'].get('message')}")
            if event.get("choices") and event["choices"][0]["delta"].get("content"):
                first = first or now
                last = now
            if event.get("usage"):
                final = event
    tokens = final["usage"]["completion_tokens"]
    spec = SpeculationStats.from_response_metrics((final.get("metrics") or {}).get("speculative_decoding"))
    return tokens, (last - first) if first and last else 0.0, spec
