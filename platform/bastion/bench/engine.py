"""`bastion bench engine`: single-stream decode speed of each profile on the same prompts, and fast/deep.

Each engine runs alone on the machine (one after the other), so the ratio measures speculation, not contention.
Decode tok/s = (completion tokens − 1) / (time of the last token − time of the first token), streamed.
"""

from __future__ import annotations

import asyncio
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bastion.config.schema import PlatformConfig
from bastion.engine.engine_args import engine_spec
from bastion.engine.mtp.acceptance import timed_chat
from bastion.engine.replica import EngineReplica
from bastion.records import SpeculationStats

PROMPTS = [
    "List the numbers from 1 to 40, separated by commas.",
    "Write a Python function that returns the squares of a list of integers, with a docstring.",
    "Explain in three sentences why the sky is blue.",
    'Repeat this JSON object three times: {"name": "Ada", "role": "engineer", "active": true}',
    "Write the days of the week, one per line, then the months of the year, one per line.",
    "Summarize the rules of tic-tac-toe.",
]


@dataclass
class ProfileResult:
    profile: str
    temperature: float
    tokens: int = 0
    decode_seconds: float = 0.0
    speculation: SpeculationStats = field(default_factory=SpeculationStats)
    rates: list[float] = field(default_factory=list)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.decode_seconds if self.decode_seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "temperature": self.temperature,
            "decode_tokens": self.tokens,
            "decode_tok_s": round(self.tok_s, 2),
            "median_request_tok_s": round(statistics.median(self.rates), 2) if self.rates else None,
            "acceptance_rate": self.speculation.acceptance_rate,
            "mean_acceptance_length": self.speculation.mean_acceptance_length,
        }


async def _one(replica: EngineReplica, prompt: str, temperature: float, max_tokens: int, seed: int) -> tuple:
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "seed": seed,
        "ignore_eos": True,
    }
    return await timed_chat(replica, body)


async def _run_profile(
    config: PlatformConfig, profile: str, temperatures: list[float], max_tokens: int, rounds: int, report: Callable
) -> list[ProfileResult]:
    dep = next(d for d in config.deployments if d.profile == profile)
    # The deployment's environment (KV cache size, ...) as Ray would set it; but each engine runs alone here,
    # so both get the same cores (`auto`) and the ratio compares speculation, not core pinning.
    os.environ.update({**dep.env, "VLLM_CPU_OMP_THREADS_BIND": "auto"})
    replica = await EngineReplica.create(engine_spec(config, dep))
    try:
        await _one(replica, PROMPTS[0], 0.0, 8, 0)  # warm-up
        results = []
        for temperature in temperatures:
            result = ProfileResult(profile, temperature)
            for r in range(rounds):
                for i, prompt in enumerate(PROMPTS):
                    tokens, seconds, spec = await _one(replica, prompt, temperature, max_tokens, seed=1000 * r + i)
                    result.tokens += tokens - 1
                    result.decode_seconds += seconds
                    if seconds:
                        result.rates.append((tokens - 1) / seconds)
                    if spec is not None:
                        result.speculation = result.speculation + spec
                    report(profile, temperature)
            results.append(result)
        return results
    finally:
        await replica.drain(5)


def run_engine_bench(
    config: PlatformConfig,
    *,
    temperatures: list[float] | None = None,
    max_tokens: int = 128,
    rounds: int = 1,
    report: Callable[[str, float], None] = lambda *_: None,
) -> dict[str, Any]:
    """Deep first, then fast, with the same prompts and seeds; returns results and fast/deep ratios."""
    temperatures = temperatures if temperatures is not None else [0.0, 0.7]
    profiles = {d.profile for d in config.deployments}
    missing = {"deep-context", "fast-agentic"} - profiles
    if missing:
        from bastion.errors import ConfigError

        raise ConfigError(f"bench engine needs deployments for both profiles; missing: {', '.join(sorted(missing))}")

    async def main() -> dict[str, Any]:
        deep = await _run_profile(config, "deep-context", temperatures, max_tokens, rounds, report)
        fast = await _run_profile(config, "fast-agentic", temperatures, max_tokens, rounds, report)
        ratios = {
            str(f.temperature): round(f.tok_s / d.tok_s, 3) if d.tok_s else None
            for f, d in zip(fast, deep, strict=True)
        }
        return {"results": [r.to_dict() for r in deep + fast], "fast_over_deep": ratios}

    return asyncio.run(main())
