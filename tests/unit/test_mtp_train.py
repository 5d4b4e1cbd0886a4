"""MTP training on a tiny random Llama: deterministic for a seed, resumable to the same weights, CLI wiring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def grafted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bastion.engine.mtp.graft import graft

    src = tmp_path_factory.mktemp("tiny")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(src)
    return graft(src, tmp_path_factory.mktemp("g") / "grafted")


def _samples() -> list:
    from bastion.engine.mtp.train import Sample

    gen = torch.Generator().manual_seed(1)
    return [
        Sample(f"s{i}", "code", torch.randint(64, (6,), generator=gen).tolist(), torch.randint(64, (20,)).tolist())
        for i in range(6)
    ]


def _train(grafted: Path, steps: int, state: Path | None) -> dict:
    from bastion.engine.mtp.graft import load_config, load_weights
    from bastion.engine.mtp.train import Frozen, TrainOptions, load_layer, target_features, train_layer

    torch.manual_seed(0)
    features = target_features(grafted, _samples())
    frozen = Frozen(load_weights(grafted), load_config(grafted), "cpu")
    layer = load_layer(grafted)
    opts = TrainOptions(max_steps=steps, max_seconds=60, batch_size=2, ce_rows=16, save_every=2, seed=3)
    train_layer(layer, features, frozen, opts, state)
    return layer.state_dict()


def test_training_is_deterministic_and_resumable(grafted: Path, tmp_path: Path) -> None:
    straight = _train(grafted, 6, None)
    again = _train(grafted, 6, None)
    assert all(torch.equal(straight[k], again[k]) for k in straight)

    state = tmp_path / "state.pt"
    _train(grafted, 3, state)  # "interrupted" after 3 steps
    assert torch.load(state, weights_only=True)["step"] == 3
    resumed = _train(grafted, 6, state)
    assert all(torch.allclose(straight[k], resumed[k], atol=1e-6) for k in straight)
    assert not all(torch.equal(straight[k], _train(grafted, 3, None)[k]) for k in straight)


def test_train_head_writes_checkpoint_report_and_improves_agreement(grafted: Path, tmp_path: Path) -> None:
    from bastion.engine.manifest import verify_manifest
    from bastion.engine.mtp.train import REPORT, TrainOptions, train_head

    samples = _samples()
    opts = TrainOptions(max_steps=60, max_seconds=60, batch_size=3, ce_rows=64, lr=3e-3, seed=0)
    report = train_head(grafted, samples, samples[:2], tmp_path / "trained", opts)
    verify_manifest(tmp_path / "trained")
    saved = json.loads((tmp_path / "trained" / REPORT).read_text())
    assert saved["steps"] == report["steps"] == 60
    assert report["heldout_top1_after"] > report["heldout_top1_before"]


def test_cli_graft(grafted: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from bastion.cli import app

    result = CliRunner().invoke(app, ["mtp", "graft", str(grafted), str(tmp_path / "again")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "again" / "config.json").read_text())["num_nextn_predict_layers"] == 1


def test_sampled_answers_are_seeded_passes_over_training_prompts_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--samples-per-prompt adds sampled passes (distinct seeds) over the training prompts, never the held-out
    ones; the generation is cached with its options, and other options regenerate."""
    from bastion.engine.mtp import train as t

    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {"id": f"{split}{i}", "task": "code", "split": split, "messages": [{"role": "user", "content": "x"}]}
        for split, n in (("train", 3), ("heldout", 2))
        for i in range(n)
    ]
    prompts.write_text("\n".join(json.dumps(r) for r in rows))
    calls: list[list[tuple]] = []

    def fake_runs(_model: Path, runs: list, *, max_tokens: int) -> list:
        calls.append([([p["id"] for p in ps], temp, seed) for ps, temp, seed in runs])
        return [[t.Sample(p["id"], p["task"], [1], [2] * max_tokens) for p in ps] for ps, _t, _s in runs]

    seen: dict = {}

    def fake_head(_m: Path, train: list, heldout: list, _o: Path, _opts: object, **kw: object) -> dict:
        seen.update(train=[s.id for s in train], heldout=[s.id for s in heldout], report=kw["extra_report"])
        return {}

    monkeypatch.setattr(t, "generate_runs", fake_runs)
    monkeypatch.setattr(t, "train_head", fake_head)
    opts = t.TrainOptions(seed=5)
    t.run_train(tmp_path, prompts, tmp_path / "out", opts, max_tokens=4, samples_per_prompt=2, temperature=0.7)
    assert calls == [
        [
            (["train0", "train1", "train2", "heldout0", "heldout1"], 0.0, 5),
            (["train0", "train1", "train2"], 0.7, 1005),
            (["train0", "train1", "train2"], 0.7, 2005),
        ]
    ]
    assert seen["heldout"] == ["heldout:heldout0", "heldout:heldout1"]
    assert len(seen["train"]) == 9 and "train:train1#s2" in seen["train"]
    assert seen["report"]["answer_tokens"] == 9 * 4
    t.run_train(tmp_path, prompts, tmp_path / "out", opts, max_tokens=4, samples_per_prompt=2, temperature=0.7)
    assert len(calls) == 1  # resumed: the cached answers are reused
    t.run_train(tmp_path, prompts, tmp_path / "out", opts, max_tokens=4, samples_per_prompt=1, temperature=0.7)
    assert len(calls) == 2 and len(seen["train"]) == 6  # other options: generated again
