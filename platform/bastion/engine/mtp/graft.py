"""Graft one MiMo-layout MTP layer onto a Llama/Qwen2-family checkpoint, so vLLM serves it with `method: mtp`.

vLLM 0.32 (models/mimo.py, mimo_mtp.py) loads a checkpoint whose config says `MiMoForCausalLM` / `qwen2` /
`num_nextn_predict_layers` as the Qwen2 target (ignoring `model.mtp_layers.*`) and, as the drafter,
`MiMoMTP`: per layer `token_layernorm`, `hidden_layernorm`, `input_proj` (H × 2H over concat(previous
pre-norm hidden state, token embedding)), one Qwen2 decoder layer (q/k/v with bias), `final_layernorm`, then the
checkpoint's `lm_head`. Llama maps onto Qwen2 with zero q/k/v biases and an untied `lm_head`.

The layer starts as a copy of the last decoder layer: it already reads and writes the residual stream the final
norm and `lm_head` expect, so training starts from a sensible point rather than noise.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bastion.engine.manifest import MANIFEST, write_manifest
from bastion.errors import ModelStoreError

MTP_PREFIX = "model.mtp_layers.0."
WEIGHTS_FILE = "model.safetensors"
# Decoder-layer parts of an MTP layer, copied from (and shaped like) a regular decoder layer.
BLOCK_PARTS = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)
BIASES = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")
_SUPPORTED = {"llama", "qwen2", "mistral"}


def load_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise ModelStoreError(f"{folder} has no config.json (not a Hugging Face model folder)") from None


def load_weights(folder: Path) -> dict:
    """All tensors of a (possibly sharded) safetensors checkpoint."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelStoreError(f"{folder} has no *.safetensors weights")
    weights: dict = {}
    for file in files:
        weights.update(load_file(file))
    return weights


def mtp_weight_names(num_layers: int = 1) -> list[str]:
    """Every tensor name vLLM's MiMoMTP loads for `num_layers` MTP layers."""
    names = []
    for i in range(num_layers):
        prefix = f"model.mtp_layers.{i}."
        names += [prefix + n for n in ("token_layernorm.weight", "hidden_layernorm.weight", "input_proj.weight")]
        names += [prefix + n for n in BLOCK_PARTS + BIASES]
        names.append(prefix + "final_layernorm.weight")
    return names


def initial_mtp_layer(weights: dict, config: dict, token_scale: float = 1.0) -> dict:
    """MTP layer 0 from the last decoder layer; input_proj = [I | token_scale·I] (hidden half, token half)."""
    import torch

    hidden = int(config["hidden_size"])
    last = int(config["num_hidden_layers"]) - 1
    src = f"model.layers.{last}."
    layer = {}
    for part in BLOCK_PARTS:
        layer[MTP_PREFIX + part] = weights[src + part].float().clone()
    for bias, proj in zip(BIASES, ("q_proj", "k_proj", "v_proj"), strict=True):
        existing = weights.get(src + bias)
        rows = weights[f"{src}self_attn.{proj}.weight"].shape[0]
        layer[MTP_PREFIX + bias] = existing.float().clone() if existing is not None else torch.zeros(rows)
    eye = torch.eye(hidden)
    layer[MTP_PREFIX + "input_proj.weight"] = torch.cat([eye, token_scale * eye], dim=1)
    layer[MTP_PREFIX + "token_layernorm.weight"] = torch.ones(hidden)
    layer[MTP_PREFIX + "hidden_layernorm.weight"] = torch.ones(hidden)
    layer[MTP_PREFIX + "final_layernorm.weight"] = weights["model.norm.weight"].float().clone()
    return layer


def mimo_config(config: dict) -> dict:
    """The source config rewritten as MiMo: Qwen2 layout, one MTP layer, untied lm_head."""
    model_type = config.get("model_type")
    if model_type not in _SUPPORTED:
        raise ModelStoreError(
            f"cannot graft an MTP layer onto model_type {model_type!r} (supported: {', '.join(sorted(_SUPPORTED))})"
        )
    if config.get("mlp_bias"):
        raise ModelStoreError("cannot graft onto a model with MLP biases (Qwen2 has none)")
    out = {k: v for k, v in config.items() if k not in ("attention_bias", "mlp_bias", "pretraining_tp")}
    out.update(
        {
            "architectures": ["MiMoForCausalLM"],
            "model_type": "qwen2",
            "num_nextn_predict_layers": 1,
            "tie_word_embeddings": False,
            "use_sliding_window": False,
        }
    )
    out.setdefault("max_window_layers", config["num_hidden_layers"])
    return out


def mimo_weights(weights: dict, config: dict) -> dict:
    """The body in the Qwen2 layout: zero q/k/v biases where missing, an explicit lm_head; old MTP layers dropped."""
    import torch

    out = {k: v for k, v in weights.items() if not k.startswith("model.mtp_layers.")}
    for i in range(int(config["num_hidden_layers"])):
        for bias, proj in zip(BIASES, ("q_proj", "k_proj", "v_proj"), strict=True):
            name = f"model.layers.{i}.{bias}"
            if name not in out:
                weight = out[f"model.layers.{i}.self_attn.{proj}.weight"]
                out[name] = torch.zeros(weight.shape[0], dtype=weight.dtype)
    if "lm_head.weight" not in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"].clone()
    return out


def mtp_layer_of(path: Path) -> dict:
    """The MTP layer tensors of a grafted checkpoint folder, or of a head file (`export_head`), as float32."""
    from safetensors.torch import load_file

    path = Path(path)
    weights = load_file(path) if path.is_file() else load_weights(path)
    layer = {k: v.float() for k, v in weights.items() if k.startswith(MTP_PREFIX)}
    if not layer:
        raise ModelStoreError(f"{path} has no {MTP_PREFIX}* weights (graft it first)")
    return layer


def export_head(checkpoint: Path, out_file: Path, dtype: str = "bfloat16") -> Path:
    """Write only the MTP layer of a grafted checkpoint to one safetensors file (~8 MB in bfloat16 for 135M).

    A head file is what a repository can ship: `graft --head FILE` installs it on the body it was trained for.
    """
    import torch
    from safetensors.torch import save_file

    layer = mtp_layer_of(checkpoint)
    cast = getattr(torch, dtype)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(cast).contiguous() for k, v in sorted(layer.items())}, out_file, metadata={"format": "pt"})
    out_file.chmod(0o644)  # safetensors writes 0600; a shipped file must be readable by whoever serves it
    return out_file


def write_checkpoint(src: Path, out: Path, config: dict, weights: dict, extra_files: dict | None = None) -> None:
    """Copy tokenizer and other side files from src, write config + one safetensors file + the manifest.

    Built in a staging folder and renamed, so a half-written checkpoint is never mistaken for a finished one.
    """
    from safetensors.torch import save_file

    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for item in src.iterdir():
        skip = item.suffix == ".safetensors" or item.name.endswith(".index.json")
        if item.is_file() and not skip and item.name not in (MANIFEST, "config.json"):
            shutil.copy2(item, staging / item.name)
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for name, text in (extra_files or {}).items():
        (staging / name).write_text(text)
    tensors = {k: v.contiguous() for k, v in weights.items()}
    save_file(tensors, staging / WEIGHTS_FILE, metadata={"format": "pt"})
    write_manifest(staging)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


def graft(model_dir: Path, out_dir: Path, *, head_from: Path | None = None, token_scale: float = 1.0) -> Path:
    """Write OUT_DIR: MODEL_DIR's body in the MiMo layout plus one MTP layer.

    The layer is fresh (from the last decoder layer), or copied from head_from: a grafted checkpoint folder or a
    head file written by `export_head`; its shapes must fit MODEL_DIR.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if model_dir.resolve() == out_dir.resolve():
        raise ModelStoreError("graft writes a new folder: OUT_DIR must differ from MODEL_DIR")
    config = load_config(model_dir)
    weights = load_weights(model_dir)
    new_config = mimo_config(config)
    body = mimo_weights(weights, new_config)
    if head_from is not None:
        head = mtp_layer_of(Path(head_from))
        mine = {k: tuple(v.shape) for k, v in initial_mtp_layer(weights, config).items()}
        theirs = {k: tuple(v.shape) for k, v in head.items()}
        if mine != theirs:
            raise ModelStoreError(f"the head in {head_from} does not fit {model_dir} (different shapes)")
    else:
        head = initial_mtp_layer(weights, config, token_scale)
    write_checkpoint(model_dir, out_dir, new_config, {**body, **head})
    return out_dir
