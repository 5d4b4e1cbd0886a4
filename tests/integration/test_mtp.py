"""MTP heads with the real vLLM CPU engine: a grafted SmolLM2 served with `method: mtp`, and a short
self-distillation run that raises both the head's held-out agreement and vLLM's measured acceptance.

Three engines in the whole file, one after the other: the untrained head (which also generates the training
answers: with float32 greedy decoding speculation does not change the output), the trained head, and the head
shipped for the bundled model as `models prepare` installs it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ROOT / "deploy/mtp/prompts.jsonl"
TRAIN_PROMPTS = 32
HELDOUT_PER_TASK = 3
TRAIN_SECONDS = 60.0
BENCH = {"prompts_per_task": 2, "max_tokens": 48}


@pytest.fixture(scope="module")
def grafted(bundled_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bastion.engine.mtp.graft import graft

    return graft(bundled_model, tmp_path_factory.mktemp("mtp") / "grafted")


def _cases(folder: Path) -> list[tuple]:
    from transformers import AutoTokenizer

    from bastion.engine.mtp.acceptance import AcceptanceOptions, build_cases

    opts = AcceptanceOptions(ks=[1], temperatures=[0.0], contexts=[0], **BENCH)
    return build_cases(PROMPTS, AutoTokenizer.from_pretrained(folder), opts)


async def _serve_and_measure(folder: Path, generate: list[list[int]] | None = None) -> dict[str, Any]:
    """One MTP (k=1) replica on the folder: optionally generate answers, then measure held-out acceptance."""
    from bastion.engine.mtp.acceptance import Cell, serve_once

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    result = await serve_once(folder, 1, _cases(folder), BENCH["max_tokens"], generate=generate, answer_tokens=80)
    total = Cell()
    for cell in result["cells"].values():
        total.spec = total.spec + cell.spec
    result["total"] = total
    return result


@pytest.fixture(scope="module")
async def untrained(grafted: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from bastion.engine.mtp.train import load_prompts, make_samples, pick

    prompts = load_prompts(PROMPTS)
    chosen = pick(prompts, "train", TRAIN_PROMPTS) + pick(prompts, "heldout", 4 * HELDOUT_PER_TASK)
    samples = make_samples(AutoTokenizer.from_pretrained(grafted), chosen)
    result = await _serve_and_measure(grafted, [s.prompt_ids for s in samples])
    for sample, out, prompt in zip(samples, result["outputs"], chosen, strict=True):
        sample.output_ids = out
        sample.id = f"{prompt['split']}:{prompt['id']}"
    result["samples"] = samples
    return result


@pytest.fixture(scope="module")
def trained(grafted: Path, untrained: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> tuple:
    from bastion.engine.mtp.train import TrainOptions, train_head

    train = [s for s in untrained["samples"] if s.id.startswith("train:")]
    heldout = [s for s in untrained["samples"] if s.id.startswith("heldout:")]
    out = tmp_path_factory.mktemp("mtp-trained") / "trained"
    report = train_head(
        grafted, train, heldout, out, TrainOptions(max_seconds=TRAIN_SECONDS, max_steps=1000, threads=1)
    )
    return out, report


@pytest.fixture(scope="module")
async def trained_served(trained: tuple) -> dict[str, Any]:
    return await _serve_and_measure(trained[0])


@pytest.fixture(scope="module")
async def shipped_served(bundled_model: Path) -> dict[str, Any]:
    return await _serve_and_measure(bundled_model)  # as `models prepare` built it: the shipped head grafted


def test_the_shipped_head_is_accepted(shipped_served: dict[str, Any]) -> None:
    """Greedy acceptance of the head shipped in deploy/mtp/heads/ on held-out prompts it never trained on (the
    untrained grafted head accepts ~0.1%; the shipped one ~37% in `bench acceptance`, docs/mtp.md)."""
    spec = shipped_served["total"].spec
    assert spec.draft_tokens >= 100
    assert spec.acceptance_rate >= 0.10, spec.to_dict()


def test_vllm_serves_the_grafted_checkpoint_with_mtp(untrained: dict[str, Any]) -> None:
    engine_counters = untrained["stats"]["speculation"]
    assert engine_counters["draft_tokens"] > 0  # vLLM's own spec_decode counters moved
    assert untrained["total"].spec.draft_tokens > 0
    answers = [s.output_ids for s in untrained["samples"]]
    assert len(answers) == TRAIN_PROMPTS + 4 * HELDOUT_PER_TASK
    assert sum(len(a) for a in answers) > 20 * len(answers)


def test_training_raises_heldout_next_next_token_agreement(trained: tuple) -> None:
    out, report = trained
    assert report["train_samples"] == TRAIN_PROMPTS
    assert report["seconds"] <= TRAIN_SECONDS + 15
    assert report["heldout_top1_before"] < 0.05  # the copied last layer predicts the next token, not the next-next
    assert report["heldout_top1_after"] > report["heldout_top1_before"] + 0.08
    assert (out / "mtp-train-report.json").is_file()


def test_training_raises_vllm_measured_acceptance(untrained: dict[str, Any], trained_served: dict[str, Any]) -> None:
    before = untrained["total"].spec
    after = trained_served["total"].spec
    assert after.draft_tokens > 0
    assert after.acceptance_rate > before.acceptance_rate + 0.05, (before.to_dict(), after.to_dict())
    assert after.mean_acceptance_length > before.mean_acceptance_length
