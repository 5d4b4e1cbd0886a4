"""`bastion plan`: flags → planner inputs → table, JSON or plot. cli.py registers it; the numbers live in planner."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from bastion.config import load_config
from bastion.pool import report
from bastion.pool.architecture import Architecture, architecture_from_hf, load_hf_config
from bastion.pool.catalog import GpuClass, gpu_classes, select
from bastion.pool.planner import (
    DEFAULT_DRAFT_COST,
    DEFAULT_EFFICIENCY,
    DEFAULT_MAX_K,
    DEFAULT_RATES,
    DEFAULT_RESERVE_GIB,
    MtpHead,
    PlanError,
    PlanInputs,
    Speculation,
)
from bastion.pool.planner import plan as make_plan

MIB = 2**20
_console = Console()


def _opt(help_text: str, *names: str) -> typer.models.OptionInfo:
    return typer.Option(*names, help=help_text)


def plan(
    config_json: Annotated[Path | None, _opt("the model's Hugging Face config.json")] = None,
    params_b: Annotated[float | None, _opt("parameters in billions (needed for hybrid/MoE configs)")] = None,
    layers: Annotated[int | None, _opt("decoder layers")] = None,
    full_attention_layers: Annotated[int | None, _opt("layers with a full-attention KV cache")] = None,
    kv_heads: Annotated[int | None, _opt("KV heads per layer")] = None,
    head_dim: Annotated[int | None, _opt("head dimension")] = None,
    linear_state_mib: Annotated[float | None, _opt("per-sequence state of the linear-attention layers, MiB")] = None,
    max_context: Annotated[int | None, _opt("the model's longest context (caps context per sequence)")] = None,
    bits_per_weight: Annotated[float, _opt("weight bits per weight (16 = bf16)")] = 16.0,
    fast_bits_per_weight: Annotated[float | None, _opt("bits per weight for fast-agentic, if smaller")] = None,
    kv_dtype: Annotated[str, _opt("KV cache dtype: bf16, fp8, q8_0, q4_0")] = "bf16",
    mtp_gb: Annotated[float, _opt("MTP head size in GB (10^9 bytes)")] = 0.0,
    mtp_layers: Annotated[int | None, _opt("attention layers of the MTP head (default: config.json's, or 1)")] = None,
    gpu: Annotated[list[str] | None, _opt("GPU class (repeatable; default: every class)")] = None,
    vram_gb: Annotated[float | None, _opt("plan for one card of this VRAM instead of --gpu")] = None,
    bandwidth_gbps: Annotated[float | None, _opt("memory bandwidth of the --vram-gb card, GB/s")] = None,
    platform: Annotated[
        Path | None, _opt("platform file whose gpu_pool.classes extend the built-ins", "--config")
    ] = None,
    reserve_gib: Annotated[float, _opt("runtime reserve per card, GiB")] = DEFAULT_RESERVE_GIB,
    concurrency: Annotated[int, _opt("sequences sharing the KV cache")] = 1,
    at_context: Annotated[int, _opt("tokens already in each sequence when tok/s is measured")] = 0,
    alpha: Annotated[float | None, _opt("constant MTP acceptance rate per draft, instead of --rates")] = None,
    rates: Annotated[
        str | None,
        _opt(f"per-position acceptance r_1,r_2,… (default {','.join(map(str, DEFAULT_RATES))}: a distilled body)"),
    ] = None,
    k: Annotated[int | None, _opt("speculative tokens (default: the best k)")] = None,
    max_k: Annotated[int, _opt("largest k to consider with --alpha")] = DEFAULT_MAX_K,
    draft_cost: Annotated[float, _opt("draft step cost ÷ target step cost")] = DEFAULT_DRAFT_COST,
    efficiency: Annotated[float, _opt("share of memory bandwidth a decode step achieves")] = DEFAULT_EFFICIENCY,
    as_json: Annotated[bool, _opt("print JSON instead of a table", "--json")] = False,
    plot: Annotated[Path | None, _opt("also write a PNG: context per sequence against tok/s")] = None,
) -> None:
    """Capacity plan: weights, MTP head, KV cache, context per sequence and decode tok/s per GPU and profile."""
    arch = _architecture(
        config_json, params_b, layers, full_attention_layers, kv_heads, head_dim, linear_state_mib, max_context
    )
    inputs = PlanInputs(
        arch=arch,
        bits_per_weight=bits_per_weight,
        fast_bits_per_weight=fast_bits_per_weight,
        kv_dtype=kv_dtype,
        mtp=MtpHead(mtp_gb, arch.mtp_layers if mtp_layers is None else mtp_layers),
        reserve_gib=reserve_gib,
        concurrency=concurrency,
        at_context=at_context,
        efficiency=efficiency,
        speculation=_speculation(alpha, rates, k, max_k, draft_cost),
    )
    gpus = _gpus(gpu, vram_gb, bandwidth_gbps, platform)
    plans = make_plan(inputs, gpus)
    if plot is not None:
        report.plot(inputs, gpus, plans, plot)
    if as_json:
        typer.echo(report.to_json(inputs, plans))
        return
    _console.print(report.summary(inputs))
    _console.print(report.table(plans))
    _console.print(report.speculation_table(inputs.speculation))
    if plot is not None:
        _console.print(f"plot written to {plot}")


def _architecture(
    config_json: Path | None,
    params_b: float | None,
    layers: int | None,
    full: int | None,
    kv_heads: int | None,
    head_dim: int | None,
    linear_state_mib: float | None,
    max_context: int | None,
) -> Architecture:
    """config.json when given, each flag overriding it; otherwise the flags alone."""
    linear = None if linear_state_mib is None else round(linear_state_mib * MIB)
    if config_json is not None:
        arch = architecture_from_hf(load_hf_config(config_json), params_b, source=str(config_json))
        overrides = {
            "layers": layers,
            "full_attention_layers": full,
            "kv_heads": kv_heads,
            "head_dim": head_dim,
            "linear_state_bytes": linear,
            "max_context": max_context,
        }
        return replace(arch, **{key: v for key, v in overrides.items() if v is not None})
    if params_b is None or kv_heads is None or head_dim is None or (layers is None and full is None):
        raise PlanError(
            "give --config-json PATH, or --params-b, --layers (or --full-attention-layers), --kv-heads and --head-dim"
        )
    return Architecture(
        params_b=params_b,
        layers=layers or full or 0,
        full_attention_layers=full if full is not None else layers or 0,
        kv_heads=kv_heads,
        head_dim=head_dim,
        linear_state_bytes=linear or 0,
        max_context=max_context,
    )


def _speculation(alpha: float | None, rates: str | None, k: int | None, max_k: int, draft_cost: float) -> Speculation:
    if alpha is not None and rates is not None:
        raise PlanError("give --alpha or --rates, not both")
    parsed = _parse_rates(rates) if rates is not None else ()
    return Speculation(alpha=alpha, rates=parsed, k=k, max_k=max_k, draft_cost=draft_cost)  # neither: defaults


def _parse_rates(text: str) -> tuple[float, ...]:
    try:
        parsed = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise PlanError(f"--rates: expected comma-separated numbers like 0.8,0.6,0.4, got {text!r}") from None
    return parsed


def _gpus(
    keys: list[str] | None, vram_gb: float | None, bandwidth: float | None, platform: Path | None
) -> list[GpuClass]:
    """The named classes (built-ins plus the platform file's), or one ad-hoc card from --vram-gb."""
    if vram_gb is None:
        if bandwidth is not None:
            raise PlanError("--bandwidth-gbps goes with --vram-gb")
        pool = load_config(platform).gpu_pool if platform is not None else None
        return select(gpu_classes(pool), keys)
    if keys:
        raise PlanError("give --gpu or --vram-gb, not both")
    if vram_gb <= 0 or (bandwidth is not None and bandwidth <= 0):
        raise PlanError("--vram-gb and --bandwidth-gbps must be positive")
    return [GpuClass("custom", f"{vram_gb:g} GB card", vram_gb, bandwidth or 0.0, "gpu_custom")]
