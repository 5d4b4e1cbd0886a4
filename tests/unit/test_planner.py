"""Capacity planner: memory, KV tokens and tok/s against numbers worked out by hand; speculation math; the CLI.

Conventions the arithmetic below follows: a card's "24 GB" is 24 × 2^30 bytes; parameters, the MTP head and
bandwidth are decimal (10^9). GiB = 1,073,741,824 bytes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bastion import cli
from bastion.config import FAST_AGENTIC
from bastion.config.schema import GpuClassConfig, GpuPoolConfig, PoolNodeConfig
from bastion.pool.architecture import Architecture, ArchitectureError, architecture_from_hf, load_hf_config
from bastion.pool.catalog import BUILTIN_CLASSES, GpuClass, PoolError, gpu_classes, inventory, select
from bastion.pool.planner import (
    DEFAULT_DRAFT_COST,
    DEFAULT_EFFICIENCY,
    DEFAULT_RATES,
    MtpHead,
    PlanError,
    PlanInputs,
    Speculation,
    expected_tokens,
    expected_tokens_from_rates,
    kv_bytes_per_token,
    plan,
    plan_profile,
    speedup,
)

pytestmark = pytest.mark.unit
GIB = 1_073_741_824
RTX3090 = BUILTIN_CLASSES["rtx3090"]
H100 = BUILTIN_CLASSES["h100"]

# Qwen3-32B-like: 64 layers, all full attention, 8 KV heads × 128. 32.0B parameters for round numbers.
DENSE = Architecture(params_b=32.0, layers=64, full_attention_layers=64, kv_heads=8, head_dim=128)
# Qwen3.6-27B-like: 16 of 64 layers full attention, 4 KV heads × 256, 64 MiB of linear-attention state per sequence.
HYBRID = Architecture(
    params_b=27.0, layers=64, full_attention_layers=16, kv_heads=4, head_dim=256, linear_state_bytes=64 * 2**20
)


# --- catalog and pool ----------------------------------------------------------------------------


def test_builtin_catalog_numbers() -> None:
    got = {k: (c.vram_gb, c.bandwidth_gbps, c.resource) for k, c in BUILTIN_CLASSES.items()}
    assert got == {
        "rtx3090": (24, 936, "gpu_rtx3090"),
        "rtx4090": (24, 1008, "gpu_rtx4090"),
        "rtx5090": (32, 1792, "gpu_rtx5090"),
        "l40s": (48, 864, "gpu_l40s"),
        "a100": (80, 2039, "gpu_a100"),
        "h100": (80, 3350, "gpu_h100"),
        "h200": (141, 4800, "gpu_h200"),
    }


def test_platform_classes_extend_and_override_builtins() -> None:
    pool = GpuPoolConfig(
        classes={
            "h100": GpuClassConfig(vram_gb=94, bandwidth_gbps=3900, resource="gpu_h100nvl"),
            "mi300x": GpuClassConfig(vram_gb=192, bandwidth_gbps=5300, resource="gpu_mi300x"),
        }
    )
    classes = gpu_classes(pool)
    assert classes["h100"] == GpuClass("h100", "H100", 94, 3900, "gpu_h100nvl")
    assert classes["mi300x"] == GpuClass("mi300x", "mi300x", 192, 5300, "gpu_mi300x")
    assert classes["rtx3090"] == RTX3090
    assert BUILTIN_CLASSES["h100"].vram_gb == 80  # the built-ins themselves are untouched


def test_inventory_totals_and_resources() -> None:
    pool = GpuPoolConfig(
        classes={"rtx3090": GpuClassConfig(vram_gb=24, bandwidth_gbps=936, resource="gpu_rtx3090")},
        nodes=[
            PoolNodeConfig(name="ws-1", gpu_class="rtx3090", count=2),
            PoolNodeConfig(name="ws-2", gpu_class="rtx3090", count=1),
            PoolNodeConfig(name="dc-1", gpu_class="h100", count=4),
        ],
    )
    inv = inventory(pool)
    assert inv.totals() == {"rtx3090": 3, "h100": 4}
    assert [n.name for n in inv.nodes_with("rtx3090")] == ["ws-1", "ws-2"]
    assert inv.nodes[2].resources == {"gpu_h100": 4.0}


def test_unknown_class_names_the_known_ones() -> None:
    with pytest.raises(PoolError, match=r"unknown GPU class 'rtx9090'; known: rtx3090, rtx4090"):
        select(BUILTIN_CLASSES, ["rtx9090"])
    pool = GpuPoolConfig(nodes=[PoolNodeConfig(name="n", gpu_class="tpu", count=1)])
    with pytest.raises(PoolError, match=r"node 'n': unknown GPU class 'tpu'"):
        inventory(pool)


# --- memory and KV: dense ------------------------------------------------------------------------


def test_kv_bytes_per_token_formula() -> None:
    # 2 × 64 layers × 8 heads × 128 × 2 bytes (bf16) = 262,144
    assert kv_bytes_per_token(64, 8, 128, 16) == 262_144
    # 2 × 16 × 4 × 256 = 32,768 elements × 4.5 bits / 8 = 18,432 (q4_0)
    assert kv_bytes_per_token(16, 4, 256, 4.5) == 18_432
    # q8_0: 32,768 × 8.5 / 8 = 34,816
    assert kv_bytes_per_token(16, 4, 256, 8.5) == 34_816


def test_dense_on_24gb_bf16_kv() -> None:
    inputs = PlanInputs(arch=DENSE, bits_per_weight=4.0, kv_dtype="bf16", reserve_gib=2.0, concurrency=4)
    p = plan_profile(inputs, RTX3090, "deep-context")
    # weights: 32e9 × 4 / 8 = 16,000,000,000 B = 14.901 GiB
    assert p.weights_gib == pytest.approx(16e9 / GIB)
    assert p.weights_gib == pytest.approx(14.9012, abs=1e-4)
    # KV room: 24 × 2^30 − 2 × 2^30 − 16e9 = 23,622,320,128 − 16,000,000,000 = 7,622,320,128 B = 7.0988 GiB
    assert p.kv_gib == pytest.approx(7.0988, abs=1e-4)
    # bf16 KV: 262,144 B/token; 7,622,320,128 / 262,144 = 29,076.9 → 29,076 tokens; ÷ 4 sequences = 7,269
    assert p.kv_bytes_per_token == 262_144
    assert p.kv_tokens == 29_076
    assert p.context_per_sequence == 7_269
    assert p.fits
    # tok/s: 936e9 × 0.78 / (16e9 weights + 0 KV at an empty context) = 730.08e9 / 16e9 = 45.63
    assert p.tok_s == pytest.approx(45.63)


def test_dense_bf16_weights_do_not_fit_24gb() -> None:
    # 32e9 × 16 / 8 = 64e9 B = 59.6 GiB of weights on a 24 GiB card: negative KV room, no plan.
    p = plan_profile(PlanInputs(arch=DENSE, bits_per_weight=16), RTX3090, "deep-context")
    assert not p.fits
    assert p.kv_gib < 0
    assert p.kv_tokens == 0
    assert p.tok_s is None


def test_dense_on_80gb_fp8_kv() -> None:
    inputs = PlanInputs(arch=DENSE, bits_per_weight=16.0, kv_dtype="fp8", reserve_gib=2.0)
    p = plan_profile(inputs, H100, "deep-context")
    # weights: 64e9 B = 59.6046 GiB; KV room: 78 × 2^30 − 64e9 = 83,751,862,272 − 64e9 = 19,751,862,272 B
    assert p.weights_gib == pytest.approx(59.6046, abs=1e-4)
    # fp8: 2 × 64 × 8 × 128 × 1 = 131,072 B/token; 19,751,862,272 / 131,072 = 150,694.8 → 150,694
    assert p.kv_bytes_per_token == 131_072
    assert p.kv_tokens == 150_694
    assert p.context_per_sequence == 150_694
    # tok/s: 3350e9 × 0.78 / 64e9 = 2613e9 / 64e9 = 40.828125
    assert p.tok_s == pytest.approx(40.828125)


def test_default_efficiency_reproduces_38_tok_s_on_a_3090() -> None:
    # ARCHITECTURE.md: dense 27B at 5.69 bits/weight ≈ 38 tok/s on an RTX 3090.
    # 27e9 × 5.69 / 8 = 19,203,750,000 B per token; 936e9 × 0.78 / 19.20375e9 = 38.02
    arch = Architecture(params_b=27.0, layers=64, full_attention_layers=64, kv_heads=4, head_dim=128)
    p = plan_profile(PlanInputs(arch=arch, bits_per_weight=5.69, kv_dtype="q4_0"), RTX3090, "deep-context")
    assert DEFAULT_EFFICIENCY == 0.78
    assert p.tok_s == pytest.approx(38.02, abs=0.01)


# --- memory and KV: hybrid -----------------------------------------------------------------------


def _hybrid_inputs(**overrides: object) -> PlanInputs:
    base: dict[str, object] = {
        "arch": HYBRID,
        "bits_per_weight": 5.69,
        "fast_bits_per_weight": 5.47,
        "kv_dtype": "q4_0",
        "mtp": MtpHead(size_gb=1.9, layers=1),
        "reserve_gib": 2.75,
        "speculation": Speculation(alpha=0.8, k=3, draft_cost=0.06),
    }
    return PlanInputs(**{**base, **overrides})  # type: ignore[arg-type]


def test_hybrid_deep_context_on_24gb() -> None:
    p = plan_profile(_hybrid_inputs(), RTX3090, "deep-context")
    # 24 × 2^30 = 25,769,803,776; reserve 2.75 × 2^30 = 2,952,790,016; weights 27e9 × 5.69 / 8 = 19,203,750,000;
    # linear state 64 MiB = 67,108,864. KV room = 25,769,803,776 − 2,952,790,016 − 19,203,750,000 − 67,108,864
    #                                           = 3,546,154,896 B (3.3026 GiB)
    assert p.mtp_gib == 0
    assert p.state_gib == pytest.approx(0.0625)
    assert p.kv_gib == pytest.approx(3_546_154_896 / GIB)
    # q4_0, 16 full-attention layers: 18,432 B/token; 3,546,154,896 / 18,432 = 192,391.2 → 192,391
    assert p.kv_bytes_per_token == 18_432
    assert p.kv_tokens == 192_391
    # tok/s: 730.08e9 / (19,203,750,000 + 67,108,864 state) = 37.885
    assert p.tok_s == pytest.approx(37.885, abs=1e-3)
    assert p.speedup is None and p.tok_s_spec is None


def test_hybrid_fast_agentic_on_24gb() -> None:
    p = plan_profile(_hybrid_inputs(), RTX3090, FAST_AGENTIC)
    # weights 27e9 × 5.47 / 8 = 18,461,250,000; MTP 1.9e9 = 1,900,000,000 B = 1.7695 GiB.
    # KV room = 25,769,803,776 − 2,952,790,016 − 18,461,250,000 − 1,900,000,000 − 67,108,864 = 2,388,654,896 B
    assert p.bits_per_weight == 5.47
    assert p.mtp_gib == pytest.approx(1.7695, abs=1e-4)
    # 17 attention layers (16 + the MTP layer): 2 × 17 × 4 × 256 × 0.5625 = 19,584 B/token
    # 2,388,654,896 / 19,584 = 121,969.7 → 121,969
    assert p.kv_bytes_per_token == 19_584
    assert p.kv_tokens == 121_969
    # tok/s without MTP: 730.08e9 / (18,461,250,000 + 67,108,864) = 39.4034
    assert p.tok_s == pytest.approx(39.4034, abs=1e-4)
    # with MTP at α = 0.8, k = 3, c = 0.06: E = 2.952, S = 2.952 / 1.18 = 2.50169
    assert p.k == 3
    assert p.expected_tokens == pytest.approx(2.952)
    assert p.speedup == pytest.approx(2.50169, abs=1e-5)
    assert p.tok_s_spec == pytest.approx(39.4034 * 2.50169, abs=1e-3)
    assert p.decode_tok_s == p.tok_s_spec


def test_hybrid_on_80gb_at_concurrency_8_bf16() -> None:
    p = plan_profile(_hybrid_inputs(kv_dtype="bf16", concurrency=8), H100, "deep-context")
    # 80 × 2^30 = 85,899,345,920; − 2,952,790,016 reserve − 19,203,750,000 weights − 8 × 67,108,864 state
    #   = 63,205,934,992 B. bf16: 2 × 16 × 4 × 256 × 2 = 65,536 B/token → 964,446.8 → 964,446 tokens.
    assert p.state_gib == pytest.approx(0.5)
    assert p.kv_tokens == 964_446
    # ÷ 8 sequences = 120,555 each
    assert p.context_per_sequence == 120_555
    # tok/s per sequence: 3350e9 × 0.78 / (19,203,750,000 + 8 × 67,108,864) = 2613e9 / 19,740,620,912 = 132.367
    assert p.tok_s == pytest.approx(132.367, abs=1e-3)


def test_context_is_capped_by_the_models_max_context() -> None:
    arch = Architecture(
        params_b=27.0, layers=64, full_attention_layers=16, kv_heads=4, head_dim=256, max_context=262_144
    )
    p = plan_profile(_hybrid_inputs(arch=arch), H100, "deep-context")
    assert p.kv_tokens > 3_000_000  # 80 GiB holds far more than one sequence can use...
    assert p.context_per_sequence == 262_144  # ...so the model's limit is what a sequence gets


def test_reading_kv_at_a_long_context_slows_decode() -> None:
    # At 100,000 tokens the step also reads 100,000 × 18,432 = 1,843,200,000 B of KV:
    # 730.08e9 / (19,203,750,000 + 67,108,864 + 1,843,200,000) = 34.578
    p = plan_profile(_hybrid_inputs(at_context=100_000), RTX3090, "deep-context")
    assert p.tok_s == pytest.approx(34.578, abs=1e-3)


def test_plan_covers_every_gpu_and_profile() -> None:
    plans = plan(_hybrid_inputs(), [RTX3090, H100])
    assert [(p.gpu, p.profile) for p in plans] == [
        ("rtx3090", "deep-context"),
        ("rtx3090", "fast-agentic"),
        ("h100", "deep-context"),
        ("h100", "fast-agentic"),
    ]


# --- speculation ---------------------------------------------------------------------------------


def test_expected_tokens_and_speedup_from_alpha() -> None:
    # E = (1 − 0.8^4) / (1 − 0.8) = (1 − 0.4096) / 0.2 = 2.952
    assert expected_tokens(0.8, 3) == pytest.approx(2.952)
    # k = 1: (1 − 0.64) / 0.2 = 1.8
    assert expected_tokens(0.8, 1) == pytest.approx(1.8)
    # α = 1: every draft lands, k + 1
    assert expected_tokens(1.0, 3) == 4
    # S = 2.952 / (1 + 3 × 0.06) = 2.952 / 1.18 = 2.501695
    assert speedup(2.952, 3, 0.06) == pytest.approx(2.501695, abs=1e-6)


def test_best_k_with_constant_alpha() -> None:
    # c = 0.3: S(2) = 2.44 / 1.6 = 1.525, S(3) = 2.952 / 1.9 = 1.5537, S(4) = 3.3616 / 2.2 = 1.528 → k = 3
    assert Speculation(alpha=0.8, max_k=8, draft_cost=0.3).best_k() == 3
    # c = 0.06: S(6) = 3.951424 / 1.36 = 2.9055, S(7) = 4.1611392 / 1.42 = 2.9304, S(8) = 4.3289114 / 1.48 = 2.9249
    assert Speculation(alpha=0.8, max_k=8, draft_cost=0.06).best_k() == 7
    # within MTP's 1..3 the largest k wins at c = 0.06
    assert Speculation(alpha=0.8, draft_cost=0.06).best_k() == 3


def test_per_position_rates() -> None:
    rates = (0.8, 0.6, 0.4)
    # E = 1 + 0.8 + 0.6 + 0.4 = 2.8 (the constant-α formula would say 2.952 at α = 0.8)
    assert expected_tokens_from_rates(rates, 3) == pytest.approx(2.8)
    assert expected_tokens_from_rates(rates, 2) == pytest.approx(2.4)
    spec = Speculation(alpha=None, rates=rates, draft_cost=0.3)
    # S(1) = 1.8 / 1.3 = 1.385, S(2) = 2.4 / 1.6 = 1.5, S(3) = 2.8 / 1.9 = 1.474 → k = 2
    assert spec.speedup(2) == pytest.approx(1.5)
    assert spec.best_k() == 2
    assert spec.horizon == 3


def test_default_speculation_is_a_distilled_heads_measured_rates() -> None:
    spec = Speculation()
    assert spec.alpha is None and spec.rates == DEFAULT_RATES == (0.72, 0.49, 0.32)
    assert spec.draft_cost == DEFAULT_DRAFT_COST == 0.24
    # S(1) = 1.72 / 1.24 = 1.3871, S(2) = 2.21 / 1.48 = 1.4932, S(3) = 2.53 / 1.72 = 1.4709 → k = 2
    assert spec.best_k() == 2
    assert spec.speedup(2) == pytest.approx(1.4932, abs=1e-4)
    assert Speculation(alpha=0.8).rates == ()  # an explicit α replaces the default rates


def test_default_mtp_figure_for_a_distilled_27b_on_a_3090_matches_architecture_md() -> None:
    # ARCHITECTURE.md: a distilled dense 27B decodes at ~38 tok/s on an RTX 3090 and at 53–57 tok/s with MTP
    # (+40–50%). The planner's defaults must land within ±15% of that range (α 0.75, c 0.06 gave 91.6).
    p = plan_profile(_hybrid_inputs(speculation=Speculation()), RTX3090, FAST_AGENTIC)
    assert p.tok_s_spec is not None
    assert 53 * 0.85 <= p.tok_s_spec <= 57 * 1.15
    assert p.tok_s_spec == pytest.approx(39.4034 * 1.4932, abs=0.01)  # 58.8
    deep = plan_profile(_hybrid_inputs(speculation=Speculation()), RTX3090, "deep-context")
    assert 1.35 <= p.tok_s_spec / deep.tok_s <= 1.6  # the head's gain over the MTP-off profile: ~+50%


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": None, "rates": (0.5, 0.6)}, "must not increase"),
        ({"alpha": None, "rates": (1.2,)}, r"must be in 0\.\.1"),
        ({"alpha": 0.8, "rates": (0.8,)}, "not both"),
        ({"alpha": None, "rates": (0.8, 0.6), "k": 3}, r"k must be in 1\.\.2"),
        ({"alpha": 1.5}, r"alpha must be in 0\.\.1"),
    ],
)
def test_bad_speculation_inputs(kwargs: dict, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        Speculation(**kwargs)


def test_bad_plan_inputs() -> None:
    with pytest.raises(PlanError, match="unknown KV cache dtype 'int4'"):
        PlanInputs(arch=DENSE, kv_dtype="int4")
    with pytest.raises(PlanError, match="concurrency must be >= 1"):
        PlanInputs(arch=DENSE, concurrency=0)


# --- config.json ---------------------------------------------------------------------------------

QWEN3_32B = {
    "architectures": ["Qwen3ForCausalLM"],
    "hidden_size": 5120,
    "intermediate_size": 25600,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "num_hidden_layers": 64,
    "vocab_size": 151936,
    "tie_word_embeddings": False,
    "max_position_embeddings": 40960,
}
QWEN36_27B = {
    "architectures": ["Qwen3_5ForConditionalGeneration"],
    "text_config": {
        "num_hidden_layers": 64,
        "num_attention_heads": 24,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "hidden_size": 5120,
        "full_attention_interval": 4,
        "linear_num_value_heads": 48,
        "linear_num_key_heads": 16,
        "linear_key_head_dim": 128,
        "linear_value_head_dim": 128,
        "linear_conv_kernel_dim": 4,
        "max_position_embeddings": 262144,
        "mtp_num_hidden_layers": 1,
    },
}


def _write(tmp_path: Path, data: dict, name: str = "config.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_dense_config_json(tmp_path: Path) -> None:
    arch = architecture_from_hf(load_hf_config(_write(tmp_path, QWEN3_32B)))
    assert (arch.layers, arch.full_attention_layers, arch.kv_heads, arch.head_dim) == (64, 64, 8, 128)
    assert arch.linear_state_bytes == 0
    assert arch.max_context == 40960
    # per layer: attention 5120 × 128 × (2 × 64 + 2 × 8) = 94,371,840; MLP 3 × 5120 × 25600 = 393,216,000
    # 64 × 487,587,840 = 31,205,621,760; untied embeddings 2 × 151,936 × 5120 = 1,555,824,640 → 32.7614464 B
    assert arch.params_b == pytest.approx(32.7614464)


def test_head_dim_falls_back_to_hidden_over_heads(tmp_path: Path) -> None:
    cfg = {k: v for k, v in QWEN3_32B.items() if k != "head_dim"} | {"num_attention_heads": 40}
    assert architecture_from_hf(cfg).head_dim == 128  # 5120 / 40


def test_hybrid_config_json_with_interval(tmp_path: Path) -> None:
    arch = architecture_from_hf(load_hf_config(_write(tmp_path, QWEN36_27B)), params_b=27.0)
    # layers 3, 7, …, 63 ((i + 1) % 4 == 0) are full attention: 16 of 64
    assert (arch.layers, arch.full_attention_layers, arch.kv_heads, arch.head_dim) == (64, 16, 4, 256)
    # per linear layer: recurrent 48 × 128 × 128 = 786,432; conv 3 × (2 × 16 × 128 + 48 × 128) = 30,720
    # (786,432 + 30,720) × 2 bytes = 1,634,304; × 48 linear layers = 78,446,592 B
    assert arch.linear_state_bytes == 78_446_592
    assert arch.mtp_layers == 1
    assert arch.max_context == 262144


def test_hybrid_config_json_with_layer_types(tmp_path: Path) -> None:
    text = dict(QWEN36_27B["text_config"])  # type: ignore[arg-type]
    del text["full_attention_interval"]
    text["layer_types"] = (["linear_attention"] * 3 + ["full_attention"]) * 16
    arch = architecture_from_hf(load_hf_config(_write(tmp_path, {"text_config": text})), params_b=27.0)
    assert arch.full_attention_layers == 16
    assert arch.linear_state_bytes == 78_446_592


def test_sliding_window_layers_cost_a_fixed_window() -> None:
    cfg = {
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "sliding_window": 128,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
    }
    arch = architecture_from_hf(cfg, params_b=1.0)
    assert (arch.full_attention_layers, arch.sliding_layers, arch.sliding_window) == (2, 2, 128)
    # bf16: 2 sliding layers × 2 × 2 heads × 64 × 2 bytes = 1,024 B/token × 128 tokens = 131,072 B per sequence
    p = plan_profile(PlanInputs(arch=arch, reserve_gib=0.0), RTX3090, "deep-context")
    assert p.state_gib == pytest.approx(131_072 / GIB)


def test_hybrid_config_needs_params(tmp_path: Path) -> None:
    with pytest.raises(ArchitectureError, match="pass --params-b"):
        architecture_from_hf(load_hf_config(_write(tmp_path, QWEN36_27B)))


def test_unreadable_config(tmp_path: Path) -> None:
    with pytest.raises(ArchitectureError, match=r"cannot read .*missing\.json"):
        load_hf_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ArchitectureError, match="not valid JSON"):
        load_hf_config(bad)
    with pytest.raises(ArchitectureError, match="missing or invalid num_hidden_layers"):
        architecture_from_hf({"num_attention_heads": 8})


# --- CLI -----------------------------------------------------------------------------------------

DENSE_FLAGS = ["--params-b", "32", "--layers", "64", "--kv-heads", "8", "--head-dim", "128"]


def test_cli_json(tmp_path: Path) -> None:
    args = ["plan", *DENSE_FLAGS, "--bits-per-weight", "16", "--kv-dtype", "fp8", "--reserve-gib", "2"]
    result = CliRunner().invoke(cli.app, [*args, "--gpu", "h100", "--alpha", "0.8", "--k", "3", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    deep, fast = data["plans"]
    assert (deep["gpu"], deep["profile"], fast["profile"]) == ("h100", "deep-context", "fast-agentic")
    assert deep["kv_tokens"] == 150_694  # as in test_dense_on_80gb_fp8_kv
    assert deep["tok_s"] == pytest.approx(40.828125)
    assert fast["expected_tokens"] == pytest.approx(2.952)
    # fast-agentic adds the MTP layer (mtp-gb 0 here): 2 × 65 × 8 × 128 = 133,120 B/token
    assert fast["kv_bytes_per_token"] == 133_120
    assert data["inputs"]["speculation"]["alpha"] == 0.8


def test_cli_config_json_and_table(tmp_path: Path) -> None:
    path = _write(tmp_path, QWEN36_27B)
    args = ["plan", "--config-json", str(path), "--params-b", "27", "--linear-state-mib", "64"]
    args += ["--bits-per-weight", "5.69", "--kv-dtype", "q4_0", "--gpu", "rtx3090"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert "192,391" in result.output  # as in test_hybrid_deep_context_on_24gb
    assert "RTX 3090" in result.output


def test_cli_defaults_to_the_distilled_rates(tmp_path: Path) -> None:
    args = ["plan", "--config-json", str(_write(tmp_path, QWEN36_27B)), "--params-b", "27", "--bits-per-weight"]
    args += ["5.69", "--fast-bits-per-weight", "5.47", "--kv-dtype", "q4_0", "--mtp-gb", "1.9", "--gpu", "rtx3090"]
    data = json.loads(CliRunner().invoke(cli.app, [*args, "--json"]).output)
    assert data["inputs"]["speculation"]["rates"] == list(DEFAULT_RATES)
    fast = data["plans"][1]
    assert (fast["profile"], fast["k"]) == ("fast-agentic", 2)
    assert 53 * 0.85 <= fast["tok_s_spec"] <= 57 * 1.15  # the docs' example command, with the real linear state


def test_cli_plot_writes_a_png(tmp_path: Path) -> None:
    png = tmp_path / "plan.png"
    args = ["plan", *DENSE_FLAGS, "--bits-per-weight", "4", "--gpu", "rtx3090", "--gpu", "h100", "--plot", str(png)]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--alpha", "0.8", "--rates", "0.8,0.6"], "give --alpha or --rates, not both"),
        (["--rates", "0.8,high"], "--rates: expected comma-separated numbers"),
        (["--gpu", "rtx3090", "--vram-gb", "24"], "give --gpu or --vram-gb, not both"),
        (["--gpu", "tpu"], "unknown GPU class 'tpu'"),
        (["--kv-dtype", "int4"], "unknown KV cache dtype 'int4'"),
    ],
)
def test_cli_bad_flags_are_one_line_errors(
    args: list[str], message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["bastion", "plan", *DENSE_FLAGS, *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert len(err.strip().splitlines()) == 1


def test_cli_without_a_model_says_what_to_give() -> None:
    result = CliRunner().invoke(cli.app, ["plan", "--gpu", "rtx3090"])
    assert isinstance(result.exception, PlanError)
    assert "--config-json" in str(result.exception)


def test_cli_unreadable_config_json(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli.app, ["plan", "--config-json", str(tmp_path / "nope.json")])
    assert isinstance(result.exception, ArchitectureError)
    assert "cannot read" in str(result.exception)


def test_cli_custom_card(tmp_path: Path) -> None:
    args = ["plan", *DENSE_FLAGS, "--bits-per-weight", "4", "--reserve-gib", "2", "--concurrency", "4"]
    result = CliRunner().invoke(cli.app, [*args, "--kv-dtype", "bf16", "--vram-gb", "24", "--bandwidth-gbps", "936"])
    assert result.exit_code == 0, result.output
    deep = json.loads(CliRunner().invoke(cli.app, [*args, "--vram-gb", "24", "--json"]).output)["plans"][0]
    assert deep["kv_tokens"] == 29_076  # as in test_dense_on_24gb_bf16_kv
    assert deep["tok_s"] is None  # no bandwidth given: no speed
