"""The gateway's local prompt count: which requests it answers itself and which it leaves to the engine, and the
client's fallback to the engine's count (the tokenizer's own agreement with vLLM is checked against a real engine
in tests/integration/test_engine_replicas.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bastion.serve.prompt_count import TokenizerCounter, plain_chat


def test_only_plain_text_chats_are_counted_locally() -> None:
    user = {"role": "user", "content": "hi"}
    assert plain_chat({"messages": [user]}) == [user]
    assert plain_chat({"messages": [{"role": "system", "content": "s"}, user]}) is not None
    assert plain_chat({"messages": [user], "tools": [{"type": "function"}]}) is None
    assert plain_chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}) is None
    assert plain_chat({"messages": [{"role": "tool", "content": "1", "tool_call_id": "a"}]}) is None
    assert plain_chat({"messages": [{"role": "user", "content": "x", "name": "bob"}]}) is None
    assert plain_chat({"messages": [user], "add_generation_prompt": False}) is None
    assert plain_chat({"messages": [user], "chat_template": "{{ x }}"}) is None
    assert plain_chat({"messages": []}) is None and plain_chat({"messages": "x"}) is None


def test_a_missing_model_folder_leaves_the_count_to_the_engine(tmp_path: Path) -> None:
    async def run() -> None:
        counter = TokenizerCounter(tmp_path / "absent")
        counter.start()
        assert (
            counter._loading is None and counter.count("chat", {"messages": [{"role": "user", "content": "x"}]}) is None
        )
        broken = TokenizerCounter(tmp_path)  # a folder without tokenizer files
        broken.start()
        assert broken._loading is not None
        await broken._loading
        assert broken.tokenizer is None and broken.count("completion", {"prompt": "x"}) is None

    asyncio.run(run())


def test_the_ray_client_falls_back_to_the_engine_count() -> None:
    from bastion.gateway.engine_client import UpstreamInfo
    from bastion.serve.ray_engine_client import RayEngineClient

    calls = []

    class Method:
        async def remote(self, endpoint, body):
            calls.append(endpoint)
            return 42

    class Handle:
        count_prompt_tokens = Method()

        def options(self, **_):
            return self

    info = UpstreamInfo("e", "m", "p", 100, 1)
    answers = iter([7, None])
    client = RayEngineClient([(info, Handle())], {"e": lambda endpoint, body: next(answers)})
    assert asyncio.run(client.count_prompt_tokens("e", "chat", {})) == 7 and calls == []
    assert asyncio.run(client.count_prompt_tokens("e", "chat", {})) == 42 and calls == ["chat"]


def test_the_scripted_engines_counter_has_the_counters_signature() -> None:
    """A counter is called (endpoint, body): one that takes other arguments fails, and every count would silently
    go back to the engine."""
    from bastion.bench.doubles import count_words
    from bastion.bench.scripted import scripted_prompt_count
    from bastion.gateway.engine_client import UpstreamInfo
    from bastion.serve.ray_engine_client import RayEngineClient

    class NoHandleCalls:
        def options(self, **_):
            return self

    body = {"messages": [{"role": "user", "content": "a b c"}]}
    client = RayEngineClient([(UpstreamInfo("e", "m", "p", 100, 1), NoHandleCalls())], {"e": scripted_prompt_count})
    assert asyncio.run(client.count_prompt_tokens("e", "chat", body)) == count_words(body)
