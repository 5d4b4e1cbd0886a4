"""Graft: the MiMo layout vLLM 0.32 loads (names, shapes, config), on a tiny random Llama built in place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    (folder / "tokenizer.json").write_text("{}")
    return folder


def _weights(folder: Path) -> dict:
    from bastion.engine.mtp.graft import load_weights

    return load_weights(folder)


def test_graft_writes_the_mimo_layout(tiny_llama: Path, tmp_path: Path) -> None:
    from bastion.engine.engine_args import mtp_layers
    from bastion.engine.manifest import verify_manifest
    from bastion.engine.mtp.graft import graft, mtp_weight_names

    out = graft(tiny_llama, tmp_path / "grafted")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MiMoForCausalLM"]
    assert config["model_type"] == "qwen2"
    assert config["num_nextn_predict_layers"] == 1
    assert config["tie_word_embeddings"] is False
    assert mtp_layers(out) == 1
    verify_manifest(out)  # a manifest was written and covers every file
    assert (out / "tokenizer.json").is_file()

    src, w = _weights(tiny_llama), _weights(out)
    mtp = {k for k in w if k.startswith("model.mtp_layers.")}
    assert mtp == set(mtp_weight_names(1))
    h = 32
    shapes = {k.removeprefix("model.mtp_layers.0."): tuple(w[k].shape) for k in mtp}
    assert shapes["input_proj.weight"] == (h, 2 * h)
    assert shapes["self_attn.q_proj.weight"] == (32, h)
    assert shapes["self_attn.k_proj.weight"] == shapes["self_attn.v_proj.weight"] == (16, h)
    assert shapes["self_attn.q_proj.bias"] == (32,)
    assert shapes["self_attn.k_proj.bias"] == (16,)
    assert shapes["mlp.gate_proj.weight"] == (64, h)
    assert shapes["mlp.down_proj.weight"] == (h, 64)
    for norm in ("token_layernorm", "hidden_layernorm", "final_layernorm", "input_layernorm"):
        assert shapes[f"{norm}.weight"] == (h,)

    # The body: Qwen2 layout (zero q/k/v biases), an explicit lm_head equal to the tied embedding.
    for i in range(3):
        for proj in ("q_proj", "k_proj", "v_proj"):
            assert torch.count_nonzero(w[f"model.layers.{i}.self_attn.{proj}.bias"]) == 0
    assert torch.equal(w["lm_head.weight"], src["model.embed_tokens.weight"])
    # The MTP layer starts from the last decoder layer; input_proj is identity on both halves.
    assert torch.equal(w["model.mtp_layers.0.mlp.up_proj.weight"], src["model.layers.2.mlp.up_proj.weight"].float())
    assert torch.equal(w["model.mtp_layers.0.final_layernorm.weight"], src["model.norm.weight"].float())
    eye = torch.eye(h)
    assert torch.equal(w["model.mtp_layers.0.input_proj.weight"], torch.cat([eye, eye], 1))


def test_head_moves_onto_another_body(tiny_llama: Path, tmp_path: Path) -> None:
    from bastion.engine.mtp.graft import graft, load_weights, write_checkpoint

    a = graft(tiny_llama, tmp_path / "a")
    weights = load_weights(a)
    weights["model.mtp_layers.0.input_proj.weight"] = torch.full_like(
        weights["model.mtp_layers.0.input_proj.weight"], 3
    )
    write_checkpoint(a, tmp_path / "a2", json.loads((a / "config.json").read_text()), weights)
    b = graft(tiny_llama, tmp_path / "b", head_from=tmp_path / "a2")
    assert torch.all(_weights(b)["model.mtp_layers.0.input_proj.weight"] == 3)


def test_head_file_round_trips_through_graft(tiny_llama: Path, tmp_path: Path) -> None:
    """export_head writes only the MTP layer (bfloat16); graft --head FILE installs exactly those values."""
    from safetensors.torch import load_file

    from bastion.engine.mtp.graft import MTP_PREFIX, export_head, graft, load_weights

    a = graft(tiny_llama, tmp_path / "a")
    head = export_head(a, tmp_path / "heads" / "head.safetensors")
    tensors = load_file(head)
    assert tensors and all(k.startswith(MTP_PREFIX) and v.dtype == torch.bfloat16 for k, v in tensors.items())
    b = graft(tiny_llama, tmp_path / "b", head_from=head)
    wb = load_weights(b)
    for name, value in tensors.items():
        assert wb[name].dtype == torch.float32 and torch.equal(wb[name], value.float())
    other = transformers.LlamaConfig(
        vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=8
    )
    transformers.LlamaForCausalLM(other).save_pretrained(tmp_path / "other")
    from bastion.errors import ModelStoreError

    with pytest.raises(ModelStoreError, match="does not fit"):
        graft(tmp_path / "other", tmp_path / "c", head_from=head)
    with pytest.raises(ModelStoreError, match=r"no model\.mtp_layers\.0"):
        graft(tiny_llama, tmp_path / "d", head_from=tiny_llama / "model.safetensors")


def test_graft_refuses_unknown_families_and_same_folder(tiny_llama: Path, tmp_path: Path) -> None:
    from bastion.engine.mtp.graft import graft, mimo_config
    from bastion.errors import ModelStoreError

    with pytest.raises(ModelStoreError, match="model_type 'gpt2'"):
        mimo_config({"model_type": "gpt2"})
    with pytest.raises(ModelStoreError, match="must differ"):
        graft(tiny_llama, tiny_llama)


def test_trainable_layer_loads_the_grafted_weights_and_runs(tiny_llama: Path, tmp_path: Path) -> None:
    from bastion.engine.mtp.train import load_layer

    out = tiny_llama.parent / "grafted-for-layer"
    from bastion.engine.mtp.graft import graft

    graft(tiny_llama, out)
    layer = load_layer(out)
    hidden = torch.randn(2, 5, 32)
    embeds = torch.randn(2, 5, 32)
    positions = torch.arange(5).expand(2, 5)
    y = layer(hidden, embeds, positions)
    assert y.shape == (2, 5, 32)
    # Causal: row 2 does not depend on rows after it; position 0's token embedding is ignored (as in vLLM).
    embeds2 = embeds.clone()
    embeds2[:, 3:] += 1.0
    embeds2[:, 0] += 5.0
    assert torch.allclose(layer(hidden, embeds2, positions)[:, :3], y[:, :3], atol=1e-5)
