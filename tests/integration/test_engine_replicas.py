"""EngineReplica deployments with the real vLLM CPU engine inside a real Ray cluster."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bastion.records import SpeculationStats

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPTS = [
    "List the numbers from 1 to 30, separated by commas.",
    "Repeat the word 'apple' ten times, separated by spaces.",
    "Write the alphabet in capital letters, separated by commas.",
]


def _chat(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": 48, "temperature": 0, **extra}


def _events(sse: str) -> list[dict[str, Any]]:
    events = []
    for block in sse.split("\n\n"):
        block = block.strip()
        if block.startswith("data: ") and block != "data: [DONE]":
            events.append(json.loads(block[len("data: ") :]))
    return events


async def _stream(handle, endpoint: str, body: dict[str, Any]) -> str:
    text = ""
    async for chunk in handle.options(stream=True).stream.remote(endpoint, body):
        text += chunk
    return text


async def test_chat_and_completion_non_streaming(engine_handles: dict) -> None:
    for handle in engine_handles.values():
        status, chat, replica = await handle.complete.remote("chat", _chat(PROMPTS[0]))
        assert status == 200 and replica  # each answer names the Serve replica that gave it
        assert chat["object"] == "chat.completion"
        assert chat["choices"][0]["message"]["content"].startswith("1, 2, 3")
        assert chat["usage"]["completion_tokens"] == 48

        status, completion, _ = await handle.complete.remote("completion", {"prompt": "1, 2, 3,", "max_tokens": 8})
        assert status == 200
        assert completion["object"] == "text_completion"
        assert completion["usage"]["completion_tokens"] == 8
        assert completion["choices"][0]["text"].strip()


async def test_chat_and_completion_streaming(engine_handles: dict) -> None:
    handle = engine_handles["fast-agentic"]
    sse = await _stream(handle, "chat", _chat(PROMPTS[0], stream_options={"include_usage": True}))
    assert sse.rstrip().endswith("data: [DONE]")
    events = _events(sse)
    content = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert content.startswith("1, 2, 3")
    assert events[-1]["usage"]["completion_tokens"] == 48
    assert events[-1]["metrics"]["speculative_decoding"]["num_draft_tokens"] > 0

    sse = await _stream(handle, "completion", {"prompt": "1, 2, 3,", "max_tokens": 8})
    events = _events(sse)
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]).strip()


async def test_invalid_request_is_an_openai_400(engine_handles: dict) -> None:
    status, body, _ = await engine_handles["deep-context"].complete.remote("chat", {"messages": "not a list"})
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert "messages" in body["error"]["message"]

    sse = await _stream(engine_handles["deep-context"], "chat", {"messages": 5})
    assert _events(sse)[0]["error"]["code"] == 400


async def test_prompt_token_count_matches_usage(engine_handles: dict) -> None:
    handle = engine_handles["deep-context"]
    body = _chat(PROMPTS[1], max_tokens=4)
    counted = await handle.count_prompt_tokens.remote("chat", body)
    _, response, _ = await handle.complete.remote("chat", body)
    assert counted == response["usage"]["prompt_tokens"] > 5


async def test_gateway_counts_prompt_tokens_as_the_engine_does(engine_handles: dict, bundled_model) -> None:
    """The gateway replica's local count (serve/prompt_count.py) equals the engine's /tokenize count wherever it
    answers; where it cannot be sure (tools, content parts) it leaves the count to the engine."""
    from bastion.serve.prompt_count import TokenizerCounter

    counter = TokenizerCounter(bundled_model)
    counter.start()
    assert counter._loading is not None
    await counter._loading
    handle = engine_handles["deep-context"]
    system = {"role": "system", "content": "You are terse."}
    bodies = [
        ("chat", _chat(PROMPTS[0])),
        ("chat", {"messages": [system, {"role": "user", "content": "Hi"}]}),
        ("chat", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b c"}]}),
        ("chat", {"messages": [{"role": "user", "content": "Ünïcödé 表 🙂 \n\n  spaces  "}]}),
        ("completion", {"prompt": "1, 2, 3,"}),
    ]
    for endpoint, body in bodies:
        assert counter.count(endpoint, body) == await handle.count_prompt_tokens.remote(endpoint, body), body
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    assert counter.count("chat", {**_chat("x"), "tools": [tool]}) is None
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}
    assert counter.count("chat", parts) is None
    assert counter.count("completion", {"prompt": [1, 2, 3]}) is None  # token ids: the engine judges them, as before


async def test_speculation_stats_reconcile_with_vllm_counters(engine_handles: dict) -> None:
    fast, deep = engine_handles["fast-agentic"], engine_handles["deep-context"]
    before = SpeculationStats(**_counters(await fast.stats.remote()))
    per_request = SpeculationStats()
    for prompt in PROMPTS:
        _, response, _ = await fast.complete.remote("chat", _chat(prompt))
        per_request = per_request + SpeculationStats.from_response_metrics(response["metrics"]["speculative_decoding"])
        sse = await _stream(fast, "chat", _chat(prompt, stream_options={"include_usage": True}))
        final = _events(sse)[-1]
        per_request = per_request + SpeculationStats.from_response_metrics(final["metrics"]["speculative_decoding"])
    after = SpeculationStats(**_counters(await fast.stats.remote()))
    delta = after - before

    assert per_request.draft_tokens > 0
    assert per_request.accepted_tokens > 0
    assert (delta.drafts, delta.draft_tokens, delta.accepted_tokens) == (
        per_request.drafts,
        per_request.draft_tokens,
        per_request.accepted_tokens,
    )
    assert delta.accepted_per_position == per_request.accepted_per_position

    _, response, _ = await deep.complete.remote("chat", _chat(PROMPTS[0]))
    assert "speculative_decoding" not in (response.get("metrics") or {})
    deep_stats = await deep.stats.remote()
    assert deep_stats["speculation"]["draft_tokens"] == 0


async def test_float32_greedy_output_same_with_and_without_speculation(engine_handles: dict) -> None:
    for prompt in PROMPTS[:2]:
        body = _chat(prompt, max_tokens=96)
        _, fast, _ = await engine_handles["fast-agentic"].complete.remote("chat", body)
        _, deep, _ = await engine_handles["deep-context"].complete.remote("chat", body)
        assert fast["metrics"]["speculative_decoding"]["num_accepted_draft_tokens"] > 0
        assert fast["choices"][0]["message"]["content"] == deep["choices"][0]["message"]["content"]


async def test_health_check_passes_on_live_replicas(engine_handles: dict) -> None:
    for handle in engine_handles.values():
        assert await handle.check_health.remote() is None


def _counters(stats: dict[str, Any]) -> dict[str, Any]:
    s = stats["speculation"]
    return {k: s[k] for k in ("drafts", "draft_tokens", "accepted_tokens", "accepted_per_position")}


async def test_the_speculating_replica_passed_its_guard_before_ready(engine_handles: dict) -> None:
    fast = await engine_handles["fast-agentic"].stats.remote()
    assert fast["routable"] is True
    # Ready only after the start check passed (test_speculation_guard.py shows a failing one keeps it out); by now
    # later rounds may have run (every guard_interval_s, after guard_after_sampled_requests sampled requests, or on
    # a live alarm; the session's earlier tests send sampled requests): every one passed.
    guard = fast["guard"]
    assert guard["state"] == "ok" and guard["failures"] == 0 and guard["checks"] >= 1, guard
    assert guard["trigger"] in ("start", "interval", "requests", "live"), guard
    assert guard["greedy_match"] >= 0.8
    metrics = await engine_handles["fast-agentic"].metrics.remote()
    assert 'bastion_speculation_guard_ok{model="smollm2-135m",profile="fast-agentic"} 1' in metrics
    deep = await engine_handles["deep-context"].stats.remote()
    assert deep["guard"] is None and deep["routable"] is True  # no speculation, no guard
