"""Relaying the engine's answer: usage and speculation statistics from the final body or usage chunk, and the
SSE stream passed through chunk by chunk (only chunks that can carry usage or an error are parsed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from bastion.records import SpeculationStats


@dataclass
class StreamTally:
    """What the gateway learns from a stream while relaying it."""

    chunks: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    speculation: SpeculationStats | None = None
    error: dict[str, Any] | None = None
    done: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    texts: dict[int, list[str]] | None = None  # per choice, the streamed text: kept only for content logging

    def completion(self) -> list[str]:
        return ["".join(self.texts[i]) for i in sorted(self.texts)] if self.texts else []


def usage_of(body: dict[str, Any]) -> tuple[int | None, int | None, SpeculationStats | None]:
    usage = body.get("usage")
    prompt = completion = None
    if isinstance(usage, dict):
        prompt = usage.get("prompt_tokens") if isinstance(usage.get("prompt_tokens"), int) else None
        completion = usage.get("completion_tokens") if isinstance(usage.get("completion_tokens"), int) else None
        if prompt is None and completion is None:  # Anthropic's Messages body
            prompt = usage.get("input_tokens") if isinstance(usage.get("input_tokens"), int) else None
            completion = usage.get("output_tokens") if isinstance(usage.get("output_tokens"), int) else None
    metrics = body.get("metrics")
    spec = (
        SpeculationStats.from_response_metrics(metrics.get("speculative_decoding"))
        if isinstance(metrics, dict)
        else None
    )
    return prompt, completion, spec


def inspect_event(event: str, tally: StreamTally, keep_usage_chunk: bool) -> str | None:
    """Account for one SSE event; return it to forward, or None to drop it (the usage chunk nobody asked for)."""
    if not event.startswith("data:"):
        return event
    payload = event[5:].strip()
    if payload == "[DONE]":
        tally.done = True
        return event
    tally.chunks += 1
    if tally.texts is not None:
        _collect(payload, tally.texts)
    if '"usage"' not in payload and '"error"' not in payload:
        return event
    try:
        data = json.loads(payload)
    except ValueError:
        return event
    if not isinstance(data, dict):
        return event
    if isinstance(data.get("error"), dict):
        tally.error = data["error"]
        return event
    if isinstance(data.get("usage"), dict):
        tally.chunks -= 1
        tally.prompt_tokens, tally.completion_tokens, tally.speculation = usage_of(data)
        if not keep_usage_chunk and not data.get("choices"):
            return None
    return event


def _collect(payload: str, texts: dict[int, list[str]]) -> None:
    """The text a chunk adds to each choice (chat `delta.content`, completions `text`)."""
    try:
        data = json.loads(payload)
    except ValueError:
        return
    choices = data.get("choices") if isinstance(data, dict) else None
    for choice in choices if isinstance(choices, list) else []:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        piece = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        if isinstance(piece, str) and piece:
            index = choice.get("index") if isinstance(choice.get("index"), int) else 0
            texts.setdefault(index, []).append(piece)


def answer_texts(body: dict[str, Any]) -> list[Any]:
    """Each choice's output of a complete answer: the chat message (content, tool calls) or the text."""
    choices = body.get("choices")
    out = []
    for choice in choices if isinstance(choices, list) else []:
        if isinstance(choice, dict):
            out.append(choice.get("message") if "message" in choice else choice.get("text"))
    return out


def split_events(chunk: str) -> list[str]:
    """An engine may hand over several SSE events in one string; each is `...\n\n`."""
    if chunk.count("\n\n") <= 1:
        return [chunk]
    return [part + "\n\n" for part in chunk.split("\n\n") if part.strip()]


def inspect_chunk(chunk: str, tally: StreamTally, keep_usage_chunk: bool) -> str | None:
    """inspect_event for each event in the chunk; what is left to forward, or None."""
    events = split_events(chunk)
    if len(events) == 1:
        return inspect_event(chunk, tally, keep_usage_chunk)
    kept = [out for e in events if (out := inspect_event(e, tally, keep_usage_chunk)) is not None]
    return "".join(kept) or None


def upstream_body(body: dict[str, Any], model: str, stream: bool) -> dict[str, Any]:
    """The client's JSON with the served model name; streams always ask for usage (the gateway needs it)."""
    out = dict(body)
    out["model"] = model
    if stream:
        options = dict(body.get("stream_options") or {})
        options["include_usage"] = True
        out["stream_options"] = options
    return out
