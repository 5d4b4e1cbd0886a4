"""Capacity planner: how much KV cache, context and decode speed each profile gets on each GPU class.

Pure functions over frozen dataclasses, so the CLI, the admin API and tests share one set of numbers.

Units, explicitly: sizes given by people are decimal (parameters in billions, the MTP head in GB = 10^9
bytes, bandwidth in GB/s = 10^9 bytes/s); everything that is subtracted from a card is reported in GiB
(2^30 bytes), because a card's "24 GB" is 24 GiB (see catalog) and vLLM and nvidia-smi count in MiB/GiB.

The model of a profile on one card:
  weights = params × bits per weight ÷ 8 bytes; the fast-agentic profile adds the MTP head's bytes.
  KV room = VRAM − reserve − weights − MTP − per-sequence fixed state × concurrency.
  KV bytes per token = 2 (K and V) × attention layers × KV heads × head dim × bits per element ÷ 8, where
  attention layers are the full-attention ones, plus the MTP head's layers in fast-agentic.
  Decode is memory-bandwidth bound: every step reads all weights once (shared by the batch) and each
  sequence's KV and state, so one sequence's tok/s = bandwidth × efficiency ÷ bytes read per step.
  Speculation (Leviathan et al. 2023): E = (1 − α^(k+1)) / (1 − α), or E = 1 + Σ r_i from measured
  per-position rates; S = E / (1 + k·c); tok/s with MTP = tok/s × S.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from bastion.config import DEEP_CONTEXT, FAST_AGENTIC
from bastion.pool.architecture import Architecture
from bastion.pool.catalog import GpuClass, PoolError

GIB = 2**30
GB = 10**9
PROFILES = (DEEP_CONTEXT, FAST_AGENTIC)
# Bits stored per KV element; the GGUF block formats carry a scale per 32 elements (q4_0: 4.5, q8_0: 8.5).
KV_DTYPE_BITS: dict[str, float] = {"bf16": 16.0, "fp8": 8.0, "q8_0": 8.5, "q4_0": 4.5}
# Share of the card's bandwidth a decode step achieves. Calibrated on ARCHITECTURE.md's figure: a dense 27B at
# 5.69 bits/weight (19.2 GB read per token) decodes at ~38 tok/s on an RTX 3090 (936 GB/s): 38 × 19.2 / 936 ≈ 0.78.
DEFAULT_EFFICIENCY = 0.78
# CUDA context, activations and prefill buffers, CUDA graphs, allocator slack. 2.75 GiB reproduces
# ARCHITECTURE.md's 24 GB figures (27B hybrid, q4_0 KV: ~184K tokens deep-context, ~120K fast-agentic) within 5%.
DEFAULT_RESERVE_GIB = 2.75
# Per-position acceptance r_1..r_3 (r_i: share of steps whose first i drafts were all accepted) of an MTP head
# kept from the base model while the body was distilled: ARCHITECTURE.md's fast-agentic model. Published vLLM
# figures for vanilla Qwen3.x heads centre on r = 0.87, 0.72, 0.57 (conditional acceptance 0.87, 0.83, 0.79);
# a distilled body agrees with the head ~17% less often at each position (0.82–0.87 of the base's acceptance in
# published comparisons): conditionals × 0.83 give r = 0.72, 0.49, 0.32. Sources and arithmetic: docs/planner.md.
DEFAULT_RATES = (0.72, 0.49, 0.32)
# c = draft step cost ÷ target step cost, fitted from six published paired benchmarks of Qwen3.x 27B MTP
# (c = (E ÷ S_measured − 1) ÷ k: 0.16–0.34, median 0.235). Larger than the head's weight share (~0.1): it also
# carries verifying k + 1 tokens through the hybrid body and the draft's launches and sampling.
DEFAULT_DRAFT_COST = 0.24
DEFAULT_MAX_K = 3  # vLLM's MTP profiles in Bastion allow 1..3 speculative tokens


class PlanError(PoolError):
    """Planner inputs that do not make sense (a negative reserve, an unknown KV dtype, rates above 1)."""


# --- speculation -------------------------------------------------------------------------------------


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens per verification step with k drafts each accepted with probability α: a geometric series
    1 + α + … + α^k; at α = 1 every draft lands, so k + 1."""
    if alpha == 1:
        return float(k + 1)
    return (1 - alpha ** (k + 1)) / (1 - alpha)


def expected_tokens_from_rates(rates: Sequence[float], k: int) -> float:
    """E = 1 + Σ r_i over the first k positions; r_i is the share of steps whose first i drafts were all
    accepted (what vLLM's per-position acceptance counts ÷ drafts gives), so MTP's decay with position is kept."""
    if k > len(rates):
        raise PlanError(f"k = {k} needs {k} per-position rates, got {len(rates)}")
    return 1 + sum(rates[:k])


def speedup(expected: float, k: int, draft_cost: float) -> float:
    """S = E / (1 + k·c): the verification step yields E tokens but costs one target step plus k draft steps."""
    return expected / (1 + k * draft_cost)


@dataclass(frozen=True)
class Speculation:
    """Acceptance (a constant α, or per-position rates), the k to report (None: the best k), the largest k
    considered, and c = draft step cost ÷ target step cost. Neither α nor rates: DEFAULT_RATES."""

    alpha: float | None = None
    rates: tuple[float, ...] = ()
    k: int | None = None
    max_k: int = DEFAULT_MAX_K
    draft_cost: float = DEFAULT_DRAFT_COST

    def __post_init__(self) -> None:
        if self.alpha is not None and self.rates:
            raise PlanError("give an acceptance rate alpha or per-position rates, not both")
        if self.alpha is None and not self.rates:
            object.__setattr__(self, "rates", DEFAULT_RATES)
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise PlanError(f"acceptance rate alpha must be in 0..1, got {self.alpha}")
        _check_rates(self.rates)
        if self.draft_cost < 0:
            raise PlanError(f"draft cost must be >= 0, got {self.draft_cost}")
        if self.max_k < 1:
            raise PlanError(f"max k must be >= 1, got {self.max_k}")
        if self.k is not None and not 1 <= self.k <= self.horizon:
            raise PlanError(f"k must be in 1..{self.horizon}, got {self.k}")

    @property
    def horizon(self) -> int:
        """The largest k the inputs can speak for: as many positions as were measured, else max_k."""
        return len(self.rates) if self.rates else self.max_k

    def expected(self, k: int) -> float:
        if self.alpha is None:
            return expected_tokens_from_rates(self.rates, k)
        return expected_tokens(self.alpha, k)

    def speedup(self, k: int) -> float:
        return speedup(self.expected(k), k, self.draft_cost)

    def best_k(self) -> int:
        """The k in 1..horizon with the largest S (the smallest such k on a tie: fewer drafts, less waste)."""
        return max(range(1, self.horizon + 1), key=lambda k: (self.speedup(k), -k))

    def chosen_k(self) -> int:
        return self.k if self.k is not None else self.best_k()


def _check_rates(rates: Sequence[float]) -> None:
    if any(not 0 <= r <= 1 for r in rates):
        raise PlanError(f"per-position rates must be in 0..1, got {list(rates)}")
    if any(b > a for a, b in itertools.pairwise(rates)):
        raise PlanError(
            f"per-position rates must not increase (r_i is the share whose first i drafts were all accepted), "
            f"got {list(rates)}"
        )


# --- inputs and one profile's plan -------------------------------------------------------------------


@dataclass(frozen=True)
class MtpHead:
    """The MTP head's weights in GB (decimal, as checkpoint sizes are quoted) and its attention layers,
    which keep their own KV for every token of the context."""

    size_gb: float = 0.0
    layers: int = 1

    def __post_init__(self) -> None:
        if self.size_gb < 0 or self.layers < 0:
            raise PlanError("MTP head size and layers cannot be negative")


@dataclass(frozen=True)
class PlanInputs:
    """Everything a plan depends on besides the card. `fast_bits_per_weight` lets fast-agentic use a smaller
    quant to make room for the head (ARCHITECTURE.md: 5.69 deep, 5.47 fast); None uses `bits_per_weight`.
    `at_context` is the tokens already in each sequence when tok/s is measured (0: a short prompt)."""

    arch: Architecture
    bits_per_weight: float = 16.0
    fast_bits_per_weight: float | None = None
    kv_dtype: str = "bf16"
    mtp: MtpHead = field(default_factory=MtpHead)
    reserve_gib: float = DEFAULT_RESERVE_GIB
    concurrency: int = 1
    at_context: int = 0
    efficiency: float = DEFAULT_EFFICIENCY
    speculation: Speculation = field(default_factory=Speculation)

    def __post_init__(self) -> None:
        for bits in (self.bits_per_weight, self.fast_bits_per_weight):
            if bits is not None and not 0 < bits <= 32:
                raise PlanError(f"bits per weight must be in (0, 32], got {bits}")
        if self.kv_dtype not in KV_DTYPE_BITS:
            raise PlanError(f"unknown KV cache dtype {self.kv_dtype!r}; expected one of {', '.join(KV_DTYPE_BITS)}")
        if self.reserve_gib < 0:
            raise PlanError(f"reserve must be >= 0 GiB, got {self.reserve_gib}")
        if self.concurrency < 1:
            raise PlanError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.at_context < 0:
            raise PlanError(f"--at-context must be >= 0, got {self.at_context}")
        if not 0 < self.efficiency <= 1:
            raise PlanError(f"efficiency must be in (0, 1], got {self.efficiency}")
        if self.arch.full_attention_layers == 0:
            raise PlanError("the model has no full-attention layers: its memory does not grow with context")

    def bits_for(self, profile: str) -> float:
        if profile == FAST_AGENTIC and self.fast_bits_per_weight is not None:
            return self.fast_bits_per_weight
        return self.bits_per_weight


@dataclass(frozen=True)
class ProfilePlan:
    """One profile on one GPU class. Sizes in GiB; `tok_s` is one sequence's decode speed without speculation,
    `tok_s_spec` with it (fast-agentic only); both None when the model does not fit."""

    gpu: str
    gpu_name: str
    profile: str
    vram_gib: float
    bandwidth_gbps: float
    bits_per_weight: float
    weights_gib: float
    mtp_gib: float
    state_gib: float
    reserve_gib: float
    kv_gib: float
    kv_bytes_per_token: float
    kv_tokens: int
    context_per_sequence: int
    concurrency: int
    fits: bool
    tok_s: float | None
    k: int | None = None
    expected_tokens: float | None = None
    speedup: float | None = None
    tok_s_spec: float | None = None
    best_k: int | None = None
    best_speedup: float | None = None
    best_tok_s_spec: float | None = None

    @property
    def decode_tok_s(self) -> float | None:
        """What a user of this profile sees: with speculation where it is on."""
        return self.tok_s_spec if self.tok_s_spec is not None else self.tok_s


def weight_bytes(params_b: float, bits_per_weight: float) -> float:
    return params_b * 1e9 * bits_per_weight / 8


def kv_bytes_per_token(attention_layers: int, kv_heads: int, head_dim: int, bits_per_element: float) -> float:
    """2 (K and V) × layers × KV heads × head dim × bytes per element."""
    return 2 * attention_layers * kv_heads * head_dim * bits_per_element / 8


def attention_layers(inputs: PlanInputs, profile: str) -> int:
    """Layers whose KV grows with the context: full attention, plus the MTP head's in fast-agentic."""
    return inputs.arch.full_attention_layers + (inputs.mtp.layers if profile == FAST_AGENTIC else 0)


def profile_kv_bytes_per_token(inputs: PlanInputs, profile: str) -> float:
    arch = inputs.arch
    return kv_bytes_per_token(attention_layers(inputs, profile), arch.kv_heads, arch.head_dim, _kv_bits(inputs))


def fixed_bytes_per_sequence(inputs: PlanInputs) -> float:
    """What a sequence holds whatever its length: linear-attention state and sliding-window caches (a window
    is never longer than the model's context)."""
    arch = inputs.arch
    window = min(arch.sliding_window, arch.max_context or arch.sliding_window)
    sliding = kv_bytes_per_token(arch.sliding_layers, arch.kv_heads, arch.head_dim, _kv_bits(inputs)) * window
    return arch.linear_state_bytes + sliding


def decode_tok_s(inputs: PlanInputs, gpu: GpuClass, profile: str, context: int) -> float | None:
    """One sequence's tok/s without speculation when every sequence holds `context` tokens: bandwidth ×
    efficiency ÷ bytes read per step (all weights once for the batch, plus each sequence's KV and state).
    None when the card's bandwidth is unknown."""
    if gpu.bandwidth_gbps <= 0:
        return None
    per_sequence = context * profile_kv_bytes_per_token(inputs, profile) + fixed_bytes_per_sequence(inputs)
    step = weight_bytes(inputs.arch.params_b, inputs.bits_for(profile)) + inputs.concurrency * per_sequence
    return gpu.bandwidth_gbps * GB * inputs.efficiency / step


def plan_profile(inputs: PlanInputs, gpu: GpuClass, profile: str) -> ProfilePlan:
    """The memory split and speeds of one profile on one card (see the module docstring for the model)."""
    if profile not in PROFILES:
        raise PlanError(f"unknown profile {profile!r}; expected one of {', '.join(PROFILES)}")
    fast = profile == FAST_AGENTIC
    bits = inputs.bits_for(profile)
    weights_gib = weight_bytes(inputs.arch.params_b, bits) / GIB
    mtp_gib = inputs.mtp.size_gb * GB / GIB if fast else 0.0
    state_gib = fixed_bytes_per_sequence(inputs) * inputs.concurrency / GIB
    kv_gib = gpu.vram_gb - inputs.reserve_gib - weights_gib - mtp_gib - state_gib
    per_token = profile_kv_bytes_per_token(inputs, profile)
    kv_tokens = max(0, math.floor(kv_gib * GIB / per_token))
    context = kv_tokens // inputs.concurrency
    if inputs.arch.max_context:
        context = min(context, inputs.arch.max_context)
    fits = kv_tokens >= inputs.concurrency
    tok_s = decode_tok_s(inputs, gpu, profile, min(inputs.at_context, context)) if fits else None
    plan = ProfilePlan(
        gpu=gpu.key,
        gpu_name=gpu.name,
        profile=profile,
        vram_gib=gpu.vram_gb,
        bandwidth_gbps=gpu.bandwidth_gbps,
        bits_per_weight=bits,
        weights_gib=weights_gib,
        mtp_gib=mtp_gib,
        state_gib=state_gib,
        reserve_gib=inputs.reserve_gib,
        kv_gib=kv_gib,
        kv_bytes_per_token=per_token,
        kv_tokens=kv_tokens,
        context_per_sequence=context,
        concurrency=inputs.concurrency,
        fits=fits,
        tok_s=tok_s,
    )
    return _with_speculation(plan, inputs.speculation) if fast else plan


def _with_speculation(plan: ProfilePlan, spec: Speculation) -> ProfilePlan:
    k, best = spec.chosen_k(), spec.best_k()
    s, s_best = spec.speedup(k), spec.speedup(best)
    return replace(
        plan,
        k=k,
        expected_tokens=spec.expected(k),
        speedup=s,
        tok_s_spec=plan.tok_s * s if plan.tok_s is not None else None,
        best_k=best,
        best_speedup=s_best,
        best_tok_s_spec=plan.tok_s * s_best if plan.tok_s is not None else None,
    )


def plan(inputs: PlanInputs, gpus: Sequence[GpuClass], profiles: Sequence[str] = PROFILES) -> list[ProfilePlan]:
    """Every profile on every card, card by card."""
    return [plan_profile(inputs, gpu, profile) for gpu in gpus for profile in profiles]


def _kv_bits(inputs: PlanInputs) -> float:
    return KV_DTYPE_BITS[inputs.kv_dtype]
