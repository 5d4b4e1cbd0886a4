"""Recording the speculation guard's golden record: the canaries answered by the target *without* speculation.

Run by `bastion models prepare` (serve/runner.prepare_models) for every model a speculating profile serves, once
per dtype and build; a current record is left alone. It costs one engine start and a few canary rounds.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bastion.engine.canaries import (
    Golden,
    SampledBaseline,
    canaries_file,
    canary_set_sha,
    golden_is_current,
    load_canaries,
    model_fingerprint,
    render,
    vllm_version,
)
from bastion.engine.guard import run_canaries, sample_statistic, temperature_key

log = logging.getLogger(__name__)
ROUNDS = 4  # sampled rounds: their mean is the baseline, their spread shows how far an honest round moves
TEMPERATURES = (0.7, 1.0)


def canary_prompts(model_dir: Path) -> dict[str, list[int]]:
    """Every canary rendered to prompt ids with the model folder's own tokenizer and chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return {c.id: render(tokenizer, c) for c in load_canaries(canaries_file(model_dir))}


async def record_with_engine(
    engine: Any, model_dir: Path, dtype: str, *, rounds: int = ROUNDS, temperatures: tuple[float, ...] = TEMPERATURES
) -> Golden:
    """The golden record from a running engine that does not speculate."""
    canaries = load_canaries(canaries_file(model_dir))
    prompts = canary_prompts(model_dir)
    max_tokens = max(c.max_tokens for c in canaries)
    runs = [await run_canaries(engine, prompts, temperatures, max_tokens) for _ in range(rounds)]
    first = runs[0].greedy
    if any(run.greedy != first for run in runs[1:]):
        log.warning("greedy canaries differ between rounds without speculation (batch-dependent rounding)")
    sampled = {}
    for t in temperatures:
        key = temperature_key(t)
        stats = [m for r in runs if (m := sample_statistic(r.scores[key])) is not None]
        if not stats:
            raise RuntimeError(f"no sampled canary tokens at T={key} without speculation")
        tokens = sum(len(v) for r in runs for v in r.scores[key].values())
        sampled[key] = SampledBaseline(round(sum(stats) / len(stats), 4), [round(m, 4) for m in stats], tokens)
    return Golden(
        canary_sha=canary_set_sha(canaries),
        model_fingerprint=model_fingerprint(model_dir),
        dtype=dtype,
        vllm=vllm_version(),
        greedy=first,
        sampled=sampled,
        recorded_at=datetime.now(UTC).isoformat(),
    )


def no_speculation(engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    """A replica's engine arguments without speculation (same dtype, length, caching, eager mode)."""
    dropped = ("speculative_config", "per_request_spec_decode_metrics")
    kwargs = {k: v for k, v in engine_kwargs.items() if k not in dropped}
    kwargs["disable_log_stats"] = True
    return kwargs


async def record(engine_kwargs: dict[str, Any], model_dir: Path, dtype: str, out: Path) -> Golden:
    """Start an engine without speculation, record, write `out` atomically, stop the engine."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**no_speculation(engine_kwargs)))
    try:
        golden = await record_with_engine(engine, model_dir, dtype)
    finally:
        engine.shutdown()
        del engine
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    partial.write_text(golden.to_json())
    partial.rename(out)
    return golden


def ensure_golden(engine_kwargs: dict[str, Any], model_dir: Path, dtype: str, out: Path) -> bool:
    """Record the golden record unless a current one exists; True when it was recorded now."""
    if golden_is_current(out, model_dir, dtype):
        return False
    asyncio.run(record(engine_kwargs, model_dir, dtype, out))
    # The engine sits in reference cycles: collect it now, while vLLM's modules are alive. Left to interpreter
    # exit, AsyncLLM.__del__ finds them torn down and prints a TypeError traceback on the terminal.
    gc.collect()
    return True
