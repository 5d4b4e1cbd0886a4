"""Per-kind speculation statistics (never invented), upstream errors in OpenAI's shape without internals, and the
prompt-size estimate for servers without a tokenizer endpoint."""

from __future__ import annotations

import json

import pytest

from bastion.gateway.external_protocol import (
    estimate_tokens,
    map_error,
    scrub,
    speculation_of,
    with_speculation,
)
from bastion.gateway.relay import usage_of

pytestmark = pytest.mark.unit
VLLM = {"metrics": {"speculative_decoding": {"num_draft_tokens": 9, "num_accepted_draft_tokens": 6}}}
LLAMA = {"timings": {"prompt_n": 12, "predicted_n": 20, "draft_n": 16, "draft_n_accepted": 12}}


def test_vllm_metrics_pass_through() -> None:
    assert speculation_of(VLLM, "vllm") == VLLM["metrics"]["speculative_decoding"]
    assert speculation_of(VLLM, "auto") == VLLM["metrics"]["speculative_decoding"]


def test_llama_cpp_timings_become_vllm_shape_and_reach_usage() -> None:
    spec = speculation_of(LLAMA, "llama_cpp")
    assert spec == {"num_draft_tokens": 16, "num_accepted_draft_tokens": 12, "draft_acceptance_rate": 0.75}
    body = with_speculation({"usage": {"prompt_tokens": 12, "completion_tokens": 20}, **LLAMA}, spec)
    prompt, completion, stats = usage_of(body)
    assert (prompt, completion) == (12, 20)
    assert stats is not None and stats.draft_tokens == 16 and stats.accepted_tokens == 12
    assert stats.acceptance_rate == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("body", "source"),
    [
        ({"timings": {"prompt_n": 3, "predicted_n": 5}}, "llama_cpp"),  # no speculation on that request
        ({"usage": {"prompt_tokens": 1}}, "auto"),
        (LLAMA, "vllm"),  # a vLLM upstream does not read llama-server fields
        (LLAMA, "ollama"),  # Ollama reports no drafts: unknown, whatever the body holds
        (VLLM, "none"),
        ({"timings": {"draft_n": "16", "draft_n_accepted": 1}}, "llama_cpp"),
    ],
)
def test_absent_statistics_are_unknown_never_zero(body: dict, source: str) -> None:
    assert speculation_of(body, source) is None
    assert with_speculation(body, None) is body


def test_zero_drafts_reported_is_zero_not_unknown() -> None:
    spec = speculation_of({"timings": {"draft_n": 0, "draft_n_accepted": 0}}, "llama_cpp")
    assert spec == {"num_draft_tokens": 0, "num_accepted_draft_tokens": 0, "draft_acceptance_rate": None}


def test_bad_request_keeps_a_scrubbed_reason() -> None:
    raw = json.dumps(
        {"error": {"message": "context too long for http://10.0.0.7:8080/v1 (key sk-abcdef1234567890)", "code": 400}}
    )
    status, body = map_error(400, raw, secrets=("sk-abcdef1234567890",))
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    message = body["error"]["message"]
    assert "context too long" in message
    assert "10.0.0.7" not in message and "sk-abcdef" not in message


@pytest.mark.parametrize(
    ("status", "raw", "expected"),
    [
        (500, 'Traceback (most recent call last):\n  File "/srv/app.py", line 3', 502),
        (401, '{"error": {"message": "invalid api key sk-live-0123456789"}}', 502),
        (404, '{"error": {"message": "model qwen3:27b not found at http://gpu-box:11434"}}', 502),
        (408, "", 504),
        (418, "<html>teapot</html>", 502),
    ],
)
def test_other_errors_are_generic(status: int, raw: str, expected: int) -> None:
    got, body = map_error(status, raw)
    assert got == expected
    text = json.dumps(body)
    for leak in ("Traceback", "/srv/app.py", "sk-live", "gpu-box", "11434", "teapot", "qwen3"):
        assert leak not in text
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_400_with_a_stack_trace_is_generic() -> None:
    raw = json.dumps({"error": {"message": 'Traceback (most recent call last):\n  File "x.py"'}})
    _, body = map_error(400, raw)
    assert body["error"]["message"] == "The upstream rejected the request"


def test_scrub_drops_bearer_tokens_and_known_secrets() -> None:
    out = scrub("auth Bearer abc.def.ghi failed; secret=hunter2hunter2", ("hunter2hunter2",))
    assert out is not None and "abc.def" not in out and "hunter2" not in out


def test_estimate_is_an_upper_bound_for_plain_text() -> None:
    body = {"messages": [{"role": "user", "content": "word " * 300}]}
    # SmolLM2's tokenizer needs ~301 tokens for this text: the estimate must not undercount it
    assert estimate_tokens("chat", body) >= 301
    assert estimate_tokens("completion", {"prompt": "word " * 300}) >= 300
