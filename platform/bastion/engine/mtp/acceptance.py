"""`bastion bench acceptance`: what an MTP head is worth, by task type, temperature, context length and k.

One engine at a time on the machine (no speculation, then MTP with k = 1, 2, 3), the same held-out prompts
(never trained on) for each, one request at a time so tok/s measures speculation and not batching. Per cell:
acceptance rate, mean acceptance length, per-position rates (vLLM's per-request metrics), decode tok/s with and
without speculation. Long contexts are built by putting a reference document before the question, so drafts are
measured deep into the KV cache as well as on short chats.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bastion.engine.mtp.train import TASKS, load_prompts
from bastion.records import SpeculationStats

if TYPE_CHECKING:
    from bastion.engine.replica import EngineReplica

Progress = Callable[[str, int, int], None]


async def timed_chat(replica: EngineReplica, body: dict[str, Any]) -> tuple[int, float, SpeculationStats | None]:
    """Decode speed of one streamed chat request, measured the same way here and by `bench engine`:
    (completion tokens, seconds from the first to the last content token, speculation stats or None).

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


@dataclass
class AcceptanceOptions:
    ks: list[int] = field(default_factory=lambda: [1, 2, 3])
    temperatures: list[float] = field(default_factory=lambda: [0.0, 0.7, 1.0])
    contexts: list[int] = field(default_factory=lambda: [0, 1024, 4096])  # extra context tokens before the question
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    prompts_per_task: int = 2
    max_tokens: int = 96
    baseline: bool = True  # also run without speculation, for tok/s
    seed: int = 0
    dtype: str = "float32"


@dataclass
class Cell:
    """Totals of one (engine, task, temperature, context) cell."""

    tokens: int = 0
    decode_seconds: float = 0.0
    requests: int = 0
    spec: SpeculationStats = field(default_factory=SpeculationStats)

    def row(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "decode_tokens": self.tokens,
            "tok_s": round(self.tokens / self.decode_seconds, 2) if self.decode_seconds else None,
            "acceptance_rate": _r(self.spec.acceptance_rate),
            "mean_acceptance_length": _r(self.spec.mean_acceptance_length),
            "per_position": [round(x, 4) for x in self.spec.per_position_rates()],
            "drafts": self.spec.drafts,
            "draft_tokens": self.spec.draft_tokens,
            "accepted_tokens": self.spec.accepted_tokens,
            "accepted_per_position": list(self.spec.accepted_per_position),
        }


def _r(x: float | None) -> float | None:
    return round(x, 4) if x is not None else None


def context_document(prompts: list[dict], tokens: int, tokenizer: Any) -> str:
    """Reference text of about `tokens` tokens, made of the prompt set's training prompts (never held-out ones)."""
    if tokens <= 0:
        return ""
    pieces = [m["content"] for p in prompts if p["split"] == "train" for m in p["messages"]]
    text, i = "", 0
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < tokens:
        chunk = "\n".join(pieces[i % len(pieces) : i % len(pieces) + 16])
        text += f"\n\nNote {i // 16 + 1}:\n{chunk}"
        i += 16
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
    return tokenizer.decode(ids)


def messages_for(prompt: dict, document: str) -> list[dict]:
    if not document:
        return prompt["messages"]
    return [
        {"role": "user", "content": f"Here are my notes, for reference later:\n{document}"},
        {"role": "assistant", "content": "Thanks, I have read your notes. What would you like to do?"},
        *prompt["messages"],
    ]


async def _one(replica: Any, messages: list[dict], temperature: float, max_tokens: int, seed: int) -> tuple:
    """One streamed chat request: (completion tokens, decode seconds, speculation stats or None)."""
    body = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "seed": seed,
    }
    return await timed_chat(replica, body)


def replica_spec(model_dir: Path, k: int | None, max_model_len: int, dtype: str = "float32") -> Any:
    """An EngineSpec as `engine_spec` builds it, for MTP with k drafts (None: no speculation)."""
    from bastion.engine.engine_args import EngineSpec

    kwargs: dict[str, Any] = {
        "model": str(model_dir),
        "served_model_name": ["bench"],
        "dtype": dtype,
        "max_model_len": max_model_len,
        "enforce_eager": True,
        "disable_log_stats": False,
        "enable_prefix_caching": True,
    }
    if k:
        kwargs["speculative_config"] = {"method": "mtp", "num_speculative_tokens": k}
        kwargs["per_request_spec_decode_metrics"] = "summary"
    return EngineSpec(
        model="bench",
        profile=f"mtp-k{k}" if k else "no-speculation",
        path=str(model_dir),
        served_name="bench",
        max_model_len=max_model_len,
        engine_kwargs=kwargs,
        speculative=bool(k),
    )


async def measure_replica(
    replica: Any,
    cases: list[tuple[str, float, int, list[dict], int]],
    max_tokens: int,
    report: Callable[[], None] = lambda: None,
) -> dict[tuple[str, float, int], Cell]:
    """Run every case (task, temperature, context, messages, seed) on a started replica; totals per cell."""
    await _one(replica, [{"role": "user", "content": "Hi"}], 0.0, 4, 0)  # warm-up
    cells: dict[tuple[str, float, int], Cell] = {}
    for task, temperature, context, messages, seed in cases:
        tokens, seconds, spec = await _one(replica, messages, temperature, max_tokens, seed)
        cell = cells.setdefault((task, temperature, context), Cell())
        cell.requests += 1
        if seconds and tokens > 1:
            cell.tokens += tokens - 1
            cell.decode_seconds += seconds
        if spec is not None:
            cell.spec = cell.spec + spec
        report()
    return cells


async def serve_once(
    model_dir: Path,
    k: int | None,
    cases: list[tuple],
    max_tokens: int,
    *,
    generate: list[list[int]] | None = None,
    answer_tokens: int = 128,
    max_model_len: int = 2048,
    report: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """One engine, started once: optionally the model's own (greedy) answers to `generate` — speculation does
    not change float32 greedy output — then the measured cases. Saves an engine start per head on small machines."""
    from bastion.engine.mtp.train import generate_with_engine
    from bastion.engine.replica import EngineReplica

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    started = time.perf_counter()
    replica = await EngineReplica.create(replica_spec(model_dir, k, max_model_len))
    ready_s = time.perf_counter() - started
    try:
        outputs = None
        if generate is not None:
            outputs = await generate_with_engine(replica.engine, generate, max_tokens=answer_tokens)
        generated_s = time.perf_counter() - started - ready_s
        cells = await measure_replica(replica, cases, max_tokens, report)
        return {
            "outputs": outputs,
            "cells": cells,
            "stats": replica.stats(),
            "ready_seconds": round(ready_s, 1),
            "generate_seconds": round(generated_s, 1),
        }
    finally:
        await replica.drain(5)


def build_cases(prompts_file: Path, tokenizer: Any, opts: AcceptanceOptions) -> list[tuple]:
    prompts = load_prompts(prompts_file)
    held = [p for p in prompts if p["split"] == "heldout"]
    docs = {c: context_document(prompts, c, tokenizer) for c in opts.contexts}
    cases = []
    for task in opts.tasks:
        chosen = [p for p in held if p["task"] == task][: opts.prompts_per_task]
        for temperature in opts.temperatures:
            for context in opts.contexts:
                for j, p in enumerate(chosen):
                    cases.append((task, temperature, context, messages_for(p, docs[context]), opts.seed + j))
    return cases


def run_acceptance(
    model_dir: Path, prompts_file: Path, opts: AcceptanceOptions, progress: Progress | None = None
) -> dict[str, Any]:
    """Every engine in turn (no speculation, then k = 1..), the same cases on each; the results as rows."""
    from transformers import AutoTokenizer

    from bastion.engine.replica import EngineReplica

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cases = build_cases(prompts_file, tokenizer, opts)
    max_len = min(max(opts.contexts) + 512 + opts.max_tokens, 8192)
    engines: list[int | None] = ([None] if opts.baseline else []) + list(opts.ks)
    total, done = len(cases) * len(engines), 0
    results: dict[str, dict] = {}

    def tick() -> None:
        nonlocal done
        done += 1
        if progress:
            progress("measuring acceptance", done, total)

    async def main() -> None:
        for k in engines:
            started = time.perf_counter()
            replica = await EngineReplica.create(replica_spec(model_dir, k, max_len, opts.dtype))
            ready_s = time.perf_counter() - started
            try:
                cells = await measure_replica(replica, cases, opts.max_tokens, tick)
            finally:
                await replica.drain(5)
            results["none" if k is None else str(k)] = {"ready_seconds": round(ready_s, 1), "cells": cells}

    started = time.perf_counter()
    asyncio.run(main())
    return summarize(results, opts, str(model_dir), time.perf_counter() - started)


def summarize(results: dict[str, dict], opts: AcceptanceOptions, model: str, seconds: float) -> dict[str, Any]:
    """Rows per (k, task, temperature, context) plus aggregates per k, with speed-up over no speculation."""
    base_cells = results.get("none", {}).get("cells", {})
    rows = []
    by_k = {}
    for k, data in results.items():
        total = Cell()
        for (task, temperature, context), cell in sorted(data["cells"].items()):
            row = {"k": k, "task": task, "temperature": temperature, "context": context, **cell.row()}
            base = base_cells.get((task, temperature, context))
            if base is not None and base.decode_seconds and row["tok_s"]:
                row["speedup"] = round(row["tok_s"] / (base.tokens / base.decode_seconds), 3)
            rows.append(row)
            total.tokens += cell.tokens
            total.decode_seconds += cell.decode_seconds
            total.requests += cell.requests
            total.spec = total.spec + cell.spec
        by_k[k] = {"ready_seconds": data["ready_seconds"], **total.row()}
    return {
        "model": model,
        "options": {k: v for k, v in opts.__dict__.items()},
        "seconds": round(seconds, 1),
        "by_k": by_k,
        "rows": rows,
    }


def total_stats(summary: dict[str, Any], k: int | str) -> SpeculationStats:
    """All cells of one k summed (e.g. for a drift baseline)."""
    total = SpeculationStats()
    for r in summary["rows"]:
        if r["k"] == str(k):
            total = total + SpeculationStats(
                r["drafts"], r["draft_tokens"], r["accepted_tokens"], r["accepted_per_position"]
            )
    return total


# --- output -----------------------------------------------------------------------------------------


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None:
        return "–"
    if pct:
        return f"{100 * x:.1f}%"
    return f"{x:.2f}" if isinstance(x, float) else str(x)


def markdown(summary: dict[str, Any]) -> str:
    """The tables for docs: per k overall, then every cell."""
    lines = ["| k | acceptance | mean acc. length | per position | tok/s | ready s |", "|---|---|---|---|---|---|"]
    for k, row in summary["by_k"].items():
        pos = " / ".join(f"{p:.2f}" for p in row["per_position"]) or "–"
        lines.append(
            f"| {k} | {_fmt(row['acceptance_rate'], True)} | {_fmt(row['mean_acceptance_length'])} | {pos} | "
            f"{_fmt(row['tok_s'])} | {row['ready_seconds']} |"
        )
    lines += [
        "",
        "| k | task | T | context | acceptance | mean length | per position | tok/s | speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        pos = " / ".join(f"{p:.2f}" for p in r["per_position"]) or "–"
        lines.append(
            f"| {r['k']} | {r['task']} | {r['temperature']} | {r['context']} | {_fmt(r['acceptance_rate'], True)} | "
            f"{_fmt(r['mean_acceptance_length'])} | {pos} | {_fmt(r['tok_s'])} | {_fmt(r.get('speedup'))} |"
        )
    return "\n".join(lines) + "\n"


def _grouped(rows: list[dict], key: str, k: str) -> dict[Any, SpeculationStats]:
    out: dict[Any, SpeculationStats] = {}
    for r in rows:
        if r["k"] != k or r["draft_tokens"] == 0:
            continue
        stats = SpeculationStats(
            drafts=0, draft_tokens=r["draft_tokens"], accepted_tokens=r["accepted_tokens"], accepted_per_position=[]
        )
        out[r[key]] = out.get(r[key], SpeculationStats()) + stats
    return out


def plots(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    """acceptance-by-task.png, acceptance-by-temperature.png, acceptance-per-position.png, tok-s.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    ks = [k for k in summary["by_k"] if k != "none"]
    written = []
    for key, name, xlabel in (
        ("task", "acceptance-by-task.png", "task type"),
        ("temperature", "acceptance-by-temperature.png", "temperature"),
        ("context", "acceptance-by-context.png", "extra context tokens"),
    ):
        fig, ax = plt.subplots(figsize=(7, 3.6))
        labels: list[Any] = sorted({r[key] for r in summary["rows"]})
        width = 0.8 / max(len(ks), 1)
        for i, k in enumerate(ks):
            grouped = _grouped(summary["rows"], key, k)
            values = [100 * (grouped[x].acceptance_rate or 0) if x in grouped else 0 for x in labels]
            ax.bar([j + i * width for j in range(len(labels))], values, width, label=f"k={k}")
        ax.set_xticks([j + width * (len(ks) - 1) / 2 for j in range(len(labels))], [str(x) for x in labels])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("acceptance rate (%)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(out_dir / name)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    for k in ks:
        pos = summary["by_k"][k]["per_position"]
        ax1.plot(range(1, len(pos) + 1), [100 * p for p in pos], marker="o", label=f"k={k}")
    ax1.set_xlabel("draft position")
    ax1.set_ylabel("accepted (% of steps)")
    ax1.legend()
    names = list(summary["by_k"])
    ax2.bar(names, [summary["by_k"][k]["tok_s"] or 0 for k in names])
    ax2.set_xlabel("k (none = no speculation)")
    ax2.set_ylabel("decode tok/s")
    fig.tight_layout()
    fig.savefig(out_dir / "per-position-and-tok-s.png", dpi=110)
    plt.close(fig)
    written.append(out_dir / "per-position-and-tok-s.png")
    return written


def write_outputs(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "acceptance.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "acceptance.md").write_text(markdown(summary))
    return [out_dir / "acceptance.json", out_dir / "acceptance.md", *plots(summary, out_dir)]
