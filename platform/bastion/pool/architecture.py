"""The model shape the planner needs, read from an HF `config.json` or given as numbers.

Only what decides memory and decode speed is kept: the parameter count (weights), the layers that keep a
KV cache growing with the context (full attention), and what every sequence holds regardless of its
length (linear-attention state, sliding-window caches).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bastion.pool.catalog import PoolError

# vLLM keeps the linear-attention (Gated DeltaNet / Mamba) state in the model dtype by default: bf16.
STATE_BYTES_PER_ELEMENT = 2
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


class ArchitectureError(PoolError):
    """A config.json that cannot be read, or lacks what the planner needs."""


@dataclass(frozen=True)
class Architecture:
    """A decoder's shape. `linear_state_bytes` is per sequence, for all linear-attention layers together.

    `sliding_layers` keep a KV cache bounded by `sliding_window` tokens, so they cost a fixed amount per
    sequence like the linear state; the planner prices them with the chosen KV dtype.
    """

    params_b: float
    layers: int
    full_attention_layers: int
    kv_heads: int
    head_dim: int
    linear_state_bytes: int = 0
    sliding_layers: int = 0
    sliding_window: int = 0
    mtp_layers: int = 1
    max_context: int | None = None

    def __post_init__(self) -> None:
        if self.params_b <= 0:
            raise ArchitectureError(f"parameters must be positive, got {self.params_b} billion")
        if min(self.layers, self.kv_heads, self.head_dim) <= 0:
            raise ArchitectureError("layers, KV heads and head dim must be positive")
        if not 0 <= self.full_attention_layers <= self.layers:
            raise ArchitectureError(f"full-attention layers ({self.full_attention_layers}) must be 0..{self.layers}")
        if self.linear_state_bytes < 0 or self.sliding_layers < 0 or self.mtp_layers < 0:
            raise ArchitectureError("linear state, sliding layers and MTP layers cannot be negative")


def load_hf_config(path: Path) -> dict[str, Any]:
    """The text model's part of a config.json: multimodal configs (Qwen3.5/3.6) nest it under `text_config`."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ArchitectureError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise ArchitectureError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from exc
    if not isinstance(data, dict):
        raise ArchitectureError(f"{path}: expected a JSON object")
    text = data.get("text_config")
    return {**data, **text} if isinstance(text, dict) else data


def architecture_from_hf(
    cfg: dict[str, Any], params_b: float | None = None, source: str = "config.json"
) -> Architecture:
    """Read the shape; `params_b` is needed for hybrid and MoE models, whose count config.json does not give."""
    layers = _int(cfg, "num_hidden_layers", source)
    heads = _int(cfg, "num_attention_heads", source)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or _int(cfg, "hidden_size", source) // heads)
    full, linear, sliding = _layer_kinds(cfg, layers, source)
    window = int(cfg.get("sliding_window") or 0) if sliding else 0
    if sliding and window <= 0:
        raise ArchitectureError(f"{source}: sliding-attention layers but no sliding_window")
    if params_b is None:
        params_b = _dense_params_b(cfg, source, hybrid=linear > 0 or sliding > 0)
    mtp = cfg.get("mtp_num_hidden_layers") or cfg.get("num_nextn_predict_layers") or 1
    max_ctx = cfg.get("max_position_embeddings")
    return Architecture(
        params_b=params_b,
        layers=layers,
        full_attention_layers=full,
        kv_heads=kv_heads,
        head_dim=head_dim,
        linear_state_bytes=linear * _linear_state_per_layer(cfg),
        sliding_layers=sliding,
        sliding_window=window,
        mtp_layers=int(mtp),
        max_context=int(max_ctx) if max_ctx else None,
    )


def _int(cfg: dict[str, Any], key: str, source: str) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or value <= 0:
        raise ArchitectureError(f"{source}: missing or invalid {key} (got {value!r})")
    return value


def _layer_kinds(cfg: dict[str, Any], layers: int, source: str) -> tuple[int, int, int]:
    """(full, linear, sliding) layer counts. HF marks layer i full when (i + 1) % interval == 0."""
    types = cfg.get("layer_types")
    if isinstance(types, list):
        if len(types) != layers:
            raise ArchitectureError(f"{source}: layer_types has {len(types)} entries for {layers} layers")
        full, sliding = types.count("full_attention"), types.count("sliding_attention")
        return full, layers - full - sliding, sliding
    interval = cfg.get("full_attention_interval")
    if isinstance(interval, int) and interval > 0:
        full = sum(1 for i in range(layers) if (i + 1) % interval == 0)
        return full, layers - full, 0
    pattern = cfg.get("sliding_window_pattern")
    if isinstance(pattern, int) and pattern > 1 and cfg.get("sliding_window"):
        full = sum(1 for i in range(layers) if (i + 1) % pattern == 0)
        return full, 0, layers - full
    return layers, 0, 0


def _linear_state_per_layer(cfg: dict[str, Any]) -> int:
    """Gated DeltaNet (Qwen3-Next, Qwen3.5/3.6): a recurrent state of V heads × K dim × V dim, plus the
    short convolution's last (kernel − 1) inputs over the q, k and v channels. 0 when the keys are absent."""
    try:
        v_heads, k_heads = cfg["linear_num_value_heads"], cfg["linear_num_key_heads"]
        k_dim, v_dim = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"]
    except KeyError:
        return 0
    kernel = cfg.get("linear_conv_kernel_dim", 4)
    recurrent = v_heads * k_dim * v_dim
    conv = (kernel - 1) * (2 * k_heads * k_dim + v_heads * v_dim)
    return (recurrent + conv) * STATE_BYTES_PER_ELEMENT


def _dense_params_b(cfg: dict[str, Any], source: str, hybrid: bool) -> float:
    """Llama/Qwen-style count: q, k, v, o projections, a gated MLP (3 matrices), embeddings (×2 if untied).
    Norms and biases are left out (under 0.1%). Hybrid and MoE layers differ, so those need --params-b."""
    if hybrid or any(cfg.get(k) for k in _MOE_KEYS):
        raise ArchitectureError(f"{source}: cannot count parameters of a hybrid or MoE model; pass --params-b")
    hidden = _int(cfg, "hidden_size", source)
    heads = _int(cfg, "num_attention_heads", source)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 3 * hidden * _int(cfg, "intermediate_size", source)
    embeddings = _int(cfg, "vocab_size", source) * hidden * (1 if cfg.get("tie_word_embeddings") else 2)
    return (_int(cfg, "num_hidden_layers", source) * (attention + mlp) + embeddings) / 1e9
