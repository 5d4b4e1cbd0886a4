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
    from bastion.engine.model_store import verify_manifest
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
