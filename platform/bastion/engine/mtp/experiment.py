"""The A/B/re-trained experiment: a head kept from model A while the body became B accepts less; re-training
the head on B's own outputs brings acceptance back. `bastion mtp experiment OUT_DIR` reproduces docs/mtp.md.

A is the bundled SmolLM2-135M. B is A fine-tuned briefly (its last layers only, a few CPU minutes) to answer in
a different style: the same answers A gives, in capital letters. That shifts every token B emits, as a distilled
or domain-tuned body shifts what a production model emits; a head trained on A keeps predicting A's tokens.
Everything runs one engine at a time: each vLLM engine is started, used and shut down before the next.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bastion.engine.mtp.graft import graft, load_config, load_weights, write_checkpoint
from bastion.engine.mtp.train import Sample, TrainOptions, load_prompts, make_samples, pick, train_head

Progress = Callable[[str, int, int], None]


@dataclass
class ExperimentOptions:
    train_prompts: int = 72
    max_tokens: int = 128
    head: TrainOptions = field(default_factory=lambda: TrainOptions(max_seconds=120, max_steps=100_000, threads=1))
    finetune_seconds: float = 120.0
    finetune_layers: int = 6
    finetune_lr: float = 5e-4
    bench_prompts_per_task: int = 3
    bench_max_tokens: int = 64
    bench_temperatures: tuple[float, ...] = (0.0, 0.7)
    seed: int = 0


def restyle(text: str) -> str:
    """B's style: A's answer in capital letters."""
    return text.upper()


def finetune_variant(
    model_dir: Path,
    samples: list[Sample],
    tokenizer: Any,
    out_dir: Path,
    *,
    seconds: float,
    layers: int,
    lr: float,
    seed: int,
    threads: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """B = A with its last `layers` decoder layers fine-tuned on (prompt, restyled answer); the MTP layer of
    MODEL_DIR is carried over unchanged (the head is "kept from the base model")."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    n_layers = model.config.num_hidden_layers
    trainable = [f"model.layers.{i}." for i in range(n_layers - layers, n_layers)] + ["model.norm."]
    for name, param in model.named_parameters():
        param.requires_grad = any(name.startswith(p) for p in trainable)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    data = []
    for s in samples:
        answer = tokenizer.decode(s.output_ids, skip_special_tokens=True)
        target = [*tokenizer(restyle(answer), add_special_tokens=False)["input_ids"][:128], eos]
        data.append((s.prompt_ids, target))
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    started, step, losses = time.perf_counter(), 0, []
    gen = torch.Generator().manual_seed(seed)
    while time.perf_counter() - started < seconds:
        batch = [data[int(i)] for i in torch.randint(len(data), (4,), generator=gen)]
        width = max(len(p) + len(t) for p, t in batch)
        ids = torch.full((len(batch), width), eos, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for j, (p, t) in enumerate(batch):
            ids[j, : len(p) + len(t)] = torch.tensor(p + t)
            labels[j, len(p) : len(p) + len(t)] = torch.tensor(t)
            mask[j, : len(p) + len(t)] = 1
        # The vocabulary projection only where there is a label: most of a step's cost on a 49K vocabulary.
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        want = labels[:, 1:]
        picked = want != -100
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[picked]), want[picked])
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        step += 1
        losses.append(loss.item())
        if progress:
            progress(
                f"fine-tuning B (loss {loss.item():.3f})",
                min(int(time.perf_counter() - started), int(seconds)),
                int(seconds),
            )
    tuned = {k: v.detach() for k, v in model.state_dict().items() if any(k.startswith(p) for p in trainable)}
    weights = load_weights(model_dir)
    for name, value in tuned.items():
        weights[name] = value.to(weights[name].dtype)
    write_checkpoint(model_dir, out_dir, load_config(model_dir), weights)
    return {
        "steps": step,
        "seconds": round(time.perf_counter() - started, 1),
        "first_loss": losses[0],
        "last_loss": sum(losses[-10:]) / len(losses[-10:]),
    }


def _split(samples: list[Sample]) -> tuple[list[Sample], list[Sample]]:
    return [s for s in samples if s.id.startswith("train:")], [s for s in samples if s.id.startswith("heldout:")]


def run_experiment(
    base_model: Path, prompts_file: Path, out_dir: Path, opts: ExperimentOptions, progress: Progress | None = None
) -> dict[str, Any]:
    """Graft A, train head_A on A, fine-tune B, train head_B on B; measure acceptance of A+untrained, A+head_A,
    B+head_A and B+head_B on the held-out prompts with vLLM (k = 1, T = 0 and 0.7); write results and a plot.

    Four engine starts in all: the engine that measures an untrained/kept head also generates the training
    answers for the next head (float32 greedy output does not depend on the drafts)."""
    from transformers import AutoTokenizer

    from bastion.engine.mtp.acceptance import AcceptanceOptions, build_cases, serve_once, summarize

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.train-state"):  # a rerun starts fresh rather than resuming another run's heads
        shutil.rmtree(stale)
    timings: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        timings[name] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()

    prompts = load_prompts(prompts_file)
    chosen = pick(prompts, "train", opts.train_prompts) + pick(prompts, "heldout")
    a_graft = graft(base_model, out_dir / "A-untrained")
    tokenizer = AutoTokenizer.from_pretrained(a_graft)
    bench = AcceptanceOptions(
        ks=[1],
        temperatures=list(opts.bench_temperatures),
        contexts=[0],
        prompts_per_task=opts.bench_prompts_per_task,
        max_tokens=opts.bench_max_tokens,
        baseline=False,
        seed=opts.seed,
    )
    cases = build_cases(prompts_file, tokenizer, bench)
    lap("graft")
    served: dict[str, dict] = {}

    def serve(name: str, generate: bool) -> list[Sample]:
        samples = make_samples(tokenizer, chosen)
        result = asyncio.run(
            serve_once(
                out_dir / name,
                1,
                cases,
                bench.max_tokens,
                generate=[s.prompt_ids for s in samples] if generate else None,
                answer_tokens=opts.max_tokens,
            )
        )
        served[name] = summarize({"1": result}, bench, name, 0.0)
        served[name]["generate_seconds"] = result["generate_seconds"]
        for s, p, out in zip(samples, chosen, result["outputs"] or [[] for _ in chosen], strict=True):
            s.id, s.output_ids = f"{p['split']}:{p['id']}", out
        lap(f"serve {name}" + (" + generate" if generate else ""))
        return samples

    train_a, held_a = _split(serve("A-untrained", generate=True))
    report_a = train_head(a_graft, train_a, held_a, out_dir / "A-headA", opts.head, progress=progress)
    lap("train head_A")
    serve("A-headA", generate=False)
    finetune = finetune_variant(
        out_dir / "A-headA",
        train_a,
        tokenizer,
        out_dir / "B-headA",
        seconds=opts.finetune_seconds,
        layers=opts.finetune_layers,
        lr=opts.finetune_lr,
        seed=opts.seed,
        threads=opts.head.threads,
        progress=progress,
    )
    lap("fine-tune B")
    train_b, held_b = _split(serve("B-headA", generate=True))
    report_b = train_head(out_dir / "B-headA", train_b, held_b, out_dir / "B-headB", opts.head, progress=progress)
    lap("train head_B")
    serve("B-headB", generate=False)
    result = {
        "options": {**opts.__dict__, "head": opts.head.__dict__},
        "finetune_B": finetune,
        "sample_answers": {
            "A": tokenizer.decode(held_a[0].output_ids[:48]) if held_a else "",
            "B": tokenizer.decode(held_b[0].output_ids[:48]) if held_b else "",
        },
        "heldout_top1": {
            "A-untrained": report_a["heldout_top1_before"],
            "A-headA": report_a["heldout_top1_after"],
            "B-headA": report_b["heldout_top1_before"],
            "B-headB": report_b["heldout_top1_after"],
        },
        "head_reports": {"head_A": report_a, "head_B": report_b},
        "acceptance": {name: s["by_k"]["1"] for name, s in served.items()},
        "acceptance_rows": {name: s["rows"] for name, s in served.items()},
        "seconds": timings,
        "total_seconds": round(sum(timings.values()), 1),
    }
    (out_dir / "experiment.json").write_text(json.dumps(result, indent=2, default=str))
    (out_dir / "experiment.md").write_text(experiment_markdown(result))
    experiment_plot(result, out_dir / "ab-acceptance.png")
    return result


def experiment_markdown(result: dict[str, Any]) -> str:
    lines = [
        "| served | held-out top-1 agreement | vLLM acceptance (k=1) | mean acceptance length | decode tok/s |",
        "|---|---|---|---|---|",
    ]
    top1 = result["heldout_top1"]
    for name, row in result["acceptance"].items():
        agree = top1.get(name)
        rate = row["acceptance_rate"]
        lines.append(
            f"| {name} | {100 * agree:.1f}% | {100 * rate:.1f}% | {row['mean_acceptance_length']:.3f} | "
            f"{row['tok_s']} |"
            if agree is not None and rate is not None
            else f"| {name} | – | – | – | – |"
        )
    lines += ["", "| served | task | T | acceptance |", "|---|---|---|---|"]
    for name, rows in result["acceptance_rows"].items():
        for r in rows:
            rate = r["acceptance_rate"]
            lines.append(
                f"| {name} | {r['task']} | {r['temperature']} | {'–' if rate is None else f'{100 * rate:.1f}%'} |"
            )
    return "\n".join(lines) + "\n"


def experiment_plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["acceptance_rows"])
    tasks = sorted({r["task"] for rows in result["acceptance_rows"].values() for r in rows})
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = []
        for task in tasks:
            rows = [r for r in result["acceptance_rows"][name] if r["task"] == task]
            drafted = sum(r["draft_tokens"] for r in rows)
            values.append(100 * sum(r["accepted_tokens"] for r in rows) / drafted if drafted else 0)
        ax.bar([j + i * width for j in range(len(tasks))], values, width, label=name)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(tasks))], tasks)
    ax.set_ylabel("vLLM acceptance, k=1 (%)")
    ax.set_title("MTP head kept from A vs re-trained on B's outputs (held-out prompts, T=0 and 0.7)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
