"""The official `openai` SDK, unmodified, against the running platform: Serve's HTTP proxy → gateway → vLLM."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def client(platform_stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=platform_stack.base_url, api_key=platform_stack.token, max_retries=0, timeout=120)


def test_chat_completion(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count from 1 to 5."}], max_tokens=24, temperature=0
    )
    assert response.choices[0].message.content
    assert response.usage.completion_tokens == 24
    assert response.usage.prompt_tokens > 0


def test_streaming_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=f"{MODEL}@fast-agentic",
        messages=[{"role": "user", "content": "List the numbers from 1 to 20, separated by commas."}],
        max_tokens=32,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("1, 2, 3")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 32


def test_streaming_without_usage_gets_no_usage_chunk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=f"{MODEL}@deep-context",
        messages=[{"role": "user", "content": "Say hi."}],
        max_tokens=8,
        stream=True,
    )
    chunks = list(stream)
    assert chunks and all(c.usage is None for c in chunks)


def test_completion_endpoint(client: openai.OpenAI) -> None:
    response = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=6, temperature=0)
    assert response.choices[0].text.strip()
    assert response.usage.completion_tokens == 6


def test_tools_round_trip(client: openai.OpenAI) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather in a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=48,
        temperature=0,
    )
    (call,) = first.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert "Paris" in call.function.arguments
    json.loads(call.function.arguments)  # valid JSON (a 135M model does not always fill the schema's object)

    messages += [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"city": "Paris", "celsius": 18})},
    ]
    second = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, max_tokens=24)
    assert second.choices[0].message.content


def test_errors_raise_the_sdk_exception_classes(platform_stack, client: openai.OpenAI) -> None:
    bad_key = openai.OpenAI(base_url=platform_stack.base_url, api_key="bst_nope_nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=10**6)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages="not a list")  # type: ignore[arg-type]


def test_models_and_usage(platform_stack, client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {MODEL, f"{MODEL}@fast-agentic", f"{MODEL}@deep-context"} <= ids
    usage = httpx.get(
        f"{platform_stack.base_url}/usage", headers={"Authorization": f"Bearer {platform_stack.token}"}, timeout=30
    )
    assert usage.status_code == 200
    assert usage.headers["x-request-id"]
    assert "data" in usage.json() or usage.json()


async def _audit_rows(config, request_ids: set[str]) -> dict[str, dict]:
    from sqlalchemy import select

    from bastion.db.models import AuditEvent
    from bastion.db.session import create_engine

    engine = create_engine(config.database.url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                select(AuditEvent.request_id, AuditEvent.kind, AuditEvent.payload).where(
                    AuditEvent.request_id.in_(request_ids)
                )
            )
            return {r.request_id: {"kind": r.kind, **r.payload} for r in rows}
    finally:
        await engine.dispose()


def _replica_ids(deployment: str) -> set[str]:
    """Serve names each replica actor `SERVE_REPLICA::app#deployment#replica-id`."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    return {n.rsplit("#", 1)[1] for n in names if n.startswith(f"SERVE_REPLICA::bastion#{deployment}#")}


async def test_requests_and_auth_failures_are_audited(platform_stack) -> None:
    import asyncio
    import uuid

    from bastion.audit import service

    ids = {"ok": f"e2e-{uuid.uuid4().hex}", "stream": f"e2e-{uuid.uuid4().hex}", "bad": f"e2e-{uuid.uuid4().hex}"}
    prompt = "List the numbers from 1 to 30, separated by commas."  # repetitive: n-gram drafts find matches
    body = {
        "model": f"{MODEL}@fast-agentic",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 32,
        "temperature": 0,
    }
    auth = {"Authorization": f"Bearer {platform_stack.token}"}
    async with httpx.AsyncClient(base_url=platform_stack.base_url, timeout=120) as http:
        ok = await http.post("/chat/completions", json=body, headers={**auth, "x-request-id": ids["ok"]})
        assert ok.status_code == 200
        async with http.stream(
            "POST", "/chat/completions", json={**body, "stream": True}, headers={**auth, "x-request-id": ids["stream"]}
        ) as streamed:
            assert streamed.status_code == 200
            assert "[DONE]" in "".join([chunk async for chunk in streamed.aiter_text()])
        bad = await http.post(
            "/chat/completions",
            json=body,
            headers={"Authorization": "Bearer bst_000000000000_x", "x-request-id": ids["bad"]},
        )
        assert bad.status_code == 401

    rows: dict[str, dict] = {}
    for _ in range(60):  # the writer batches off the request path
        rows = await _audit_rows(platform_stack.config, set(ids.values()))
        if len(rows) == 3:
            break
        await asyncio.sleep(0.5)
    assert rows[ids["ok"]]["kind"] == "inference" and rows[ids["ok"]]["status"] == 200
    assert rows[ids["ok"]]["profile"] == "fast-agentic"
    assert rows[ids["ok"]]["completion_tokens"] == 32
    assert rows[ids["ok"]]["speculation"]["draft_tokens"] > 0
    # The row has the request's real k and per-position acceptance (vLLM's acceptance histogram), not 0.
    k = platform_stack.config.profiles["fast-agentic"].speculative.num_speculative_tokens
    for kind in ("ok", "stream"):
        speculation = rows[ids[kind]]["speculation"]
        assert speculation["num_speculative_tokens"] == k, speculation
        assert len(speculation["acceptance_by_position"]) == k and all(
            0 <= rate <= 1 for rate in speculation["acceptance_by_position"]
        ), speculation
    assert rows[ids["stream"]]["stream"] is True and rows[ids["stream"]]["completion_tokens"] == 32
    # The decision names the Serve replica that served each request: `deployment#replica-id`, a live replica.
    fast = next(a.name for a in platform_stack.apps if a.profile == "fast-agentic")
    live = _replica_ids(fast)
    for kind in ("ok", "stream"):
        deployment, _, replica = rows[ids[kind]]["replica"].partition("#")
        assert deployment == fast and replica in live, (rows[ids[kind]]["replica"], live)
    assert rows[ids["bad"]]["kind"] == "auth_failure"
    assert "bst_000000000000_x" not in str(rows[ids["bad"]])

    report = await service.verify(platform_stack.config, actor="e2e-test")
    assert report.ok and report.events >= 3


def _loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is IPv4 loopback on a dual-stack socket
    return (mapped or ip).is_loopback


def test_every_platform_process_listens_on_loopback_only(platform_stack) -> None:
    import psutil

    ours = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status != psutil.CONN_LISTEN or conn.pid is None:
            continue
        try:
            proc = psutil.Process(conn.pid)
            cmdline = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if "ray" in cmdline or "VLLM" in proc.name() or "ray::" in proc.name():
            ours.append((proc.name(), conn.laddr.ip, conn.laddr.port))
    assert ours, "found no Ray process listening at all"
    exposed = [c for c in ours if not _loopback(c[1])]
    assert not exposed, f"listening beyond loopback: {exposed}"
