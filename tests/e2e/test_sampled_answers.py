"""Sampled answers on fast-agentic (MTP) are as likely under the target model as deep-context's (no speculation),
checked where users are: the official `openai` SDK through Serve's proxy and the gateway, at the OpenAI default
temperature (1). Each answer is scored by the target model itself: deep-context re-reads prompt + answer in one
prefill (`echo` with `logprobs`), which takes no speculative path. vLLM CPU's broken rejection sampler (vllm#55005,
fixed by Bastion's plugin) gave answers scoring -7 to -10 nats per token here, honest ones about -1 to -2.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import openai
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "smollm2-135m"
PROMPTS = [
    "Write a JSON list of three customers with a name and a city.",
    "Write a Python function that returns the square of a number.",
    "Why is the sky blue? Answer in two sentences.",
    "List three colors.",
]
SAMPLES_PER_PROMPT = 3
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def client(platform_stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=platform_stack.base_url, api_key=platform_stack.token, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(bundled_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_model)


def answers(client: openai.OpenAI, profile: str) -> list[tuple[str, str]]:
    """(prompt, answer) pairs sampled at the default temperature, seeded so a rerun asks the same."""
    out = []
    for i, prompt in enumerate(PROMPTS):
        for j in range(SAMPLES_PER_PROMPT):
            response = client.chat.completions.create(
                model=f"{MODEL}@{profile}",
                messages=[{"role": "user", "content": prompt}],
                max_tokens=MAX_TOKENS,
                seed=100 * i + j,
            )
            text = response.choices[0].message.content or ""
            assert response.choices[0].finish_reason in ("stop", "length")
            out.append((prompt, text))
    return out


def target_score(client: openai.OpenAI, tokenizer, prompt: str, answer: str) -> float | None:
    """Mean log-probability per token of `answer` under the target model (deep-context, one prefill)."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    scored = client.completions.create(
        model=f"{MODEL}@deep-context", prompt=rendered + answer, max_tokens=1, echo=True, logprobs=0, temperature=0
    )
    lp = scored.choices[0].logprobs
    assert lp is not None and lp.text_offset is not None and lp.token_logprobs is not None
    # the answer's tokens: those that start at or after the rendered prompt, up to the one generated token
    values = [v for off, v in zip(lp.text_offset, lp.token_logprobs, strict=True) if off >= len(rendered)][:-1]
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def test_sampled_answers_on_fast_agentic_score_like_no_speculation(client: openai.OpenAI, tokenizer) -> None:
    scores: dict[str, list[float]] = {}
    for profile in ("fast-agentic", "deep-context"):
        pairs = answers(client, profile)
        assert sum(bool(a.strip()) for _, a in pairs) >= len(pairs) - 1, pairs
        scores[profile] = [s for p, a in pairs if (s := target_score(client, tokenizer, p, a)) is not None]
        assert len(scores[profile]) >= len(pairs) - 1
    fast, deep = statistics.median(scores["fast-agentic"]), statistics.median(scores["deep-context"])
    # Honest samples at T = 1 score about -1 to -2.5 nats/token here; the unfixed build's about -7 to -10.
    assert fast > -4.0, scores
    assert fast >= deep - 1.0, scores
