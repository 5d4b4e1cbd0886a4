"""How a plan reaches a person: a rich table, JSON for scripts, and a PNG of context against decode speed."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from bastion.config import DEEP_CONTEXT, FAST_AGENTIC
from bastion.pool.catalog import GpuClass, PoolError
from bastion.pool.planner import (
    PlanInputs,
    ProfilePlan,
    Speculation,
    decode_tok_s,
    fixed_bytes_per_sequence,
    profile_kv_bytes_per_token,
)

PLOT_POINTS = 64


def summary(inputs: PlanInputs) -> str:
    """One line that says which model shape and settings the numbers are for."""
    a = inputs.arch
    fast_bits = f" (fast {inputs.fast_bits_per_weight:g})" if inputs.fast_bits_per_weight is not None else ""
    return (
        f"{a.params_b:g}B params at {inputs.bits_per_weight:g} bits/weight{fast_bits}; "
        f"{a.full_attention_layers}/{a.layers} full-attention layers × {a.kv_heads} KV heads × {a.head_dim}; "
        f"KV {inputs.kv_dtype} = {profile_kv_bytes_per_token(inputs, DEEP_CONTEXT):,.0f} B/token; "
        f"fixed state {fixed_bytes_per_sequence(inputs) / 2**20:,.1f} MiB/seq; "
        f"MTP {inputs.mtp.size_gb:g} GB + {inputs.mtp.layers} layer(s); reserve {inputs.reserve_gib:g} GiB; "
        f"concurrency {inputs.concurrency}; decode efficiency {inputs.efficiency:g}"
    )


def _num(value: float | None, fmt: str = ",.1f") -> str:
    return "—" if value is None else format(value, fmt)


def table(plans: Sequence[ProfilePlan]) -> Table:
    """Per GPU and profile: the memory split in GiB, tokens, and tok/s without and (fast-agentic) with MTP.
    E and S do not depend on the card, so they get their own table (`speculation_table`)."""
    t = Table(
        box=box.SIMPLE_HEAD,
        padding=(0, 1, 0, 0),
        pad_edge=False,
        show_edge=False,
        caption="sizes in GiB; tok/s per sequence",
    )
    t.add_column("GPU", no_wrap=True)
    t.add_column("profile", no_wrap=True)
    for col in ("weights", "MTP", "KV", "KV tokens", "ctx/seq", "tok/s", "+MTP"):
        t.add_column(col, justify="right", no_wrap=True)
    for p in plans:
        t.add_row(*_row(p))
    return t


def _row(p: ProfilePlan) -> list[str]:
    head = [p.gpu_name, p.profile, _num(p.weights_gib, ".2f"), _num(p.mtp_gib, ".2f"), _num(p.kv_gib, ".2f")]
    if not p.fits:
        return [*head, "[red]no fit[/red]", "—", "—", "—"]
    spec = _num(p.tok_s_spec) if p.profile == FAST_AGENTIC else ""
    return [*head, f"{p.kv_tokens:,}", f"{p.context_per_sequence:,}", _num(p.tok_s), spec]


def speculation_table(spec: Speculation) -> Table:
    """E and S for every k the inputs speak for, marking the k used in the table above and the best one."""
    accept = f"rates {','.join(f'{r:g}' for r in spec.rates)}" if spec.rates else f"α = {spec.alpha:g}"
    t = Table(title=f"MTP: {accept}, c = {spec.draft_cost:g}", box=box.SIMPLE_HEAD, pad_edge=False, min_width=44)
    for col in ("k", "E tokens/step", "S speedup", ""):
        t.add_column(col, justify="right")
    chosen, best = spec.chosen_k(), spec.best_k()
    for k in range(1, spec.horizon + 1):
        marks = ", ".join(m for m, on in (("used", k == chosen), ("best", k == best)) if on)
        t.add_row(str(k), f"{spec.expected(k):.3f}", f"{spec.speedup(k):.3f}", marks)
    return t


def to_json(inputs: PlanInputs, plans: Sequence[ProfilePlan]) -> str:
    """Inputs and every plan's fields, unrounded, so a script gets the same numbers the table shows rounded."""
    data: dict[str, Any] = {
        "inputs": asdict(inputs),
        "plans": [{**asdict(p), "decode_tok_s": p.decode_tok_s} for p in plans],
    }
    return json.dumps(data, indent=2)


def plot(inputs: PlanInputs, gpus: Sequence[GpuClass], plans: Sequence[ProfilePlan], path: Path) -> None:
    """One line per GPU and profile: decode tok/s (with MTP for fast-agentic) as each sequence's context fills,
    ending at the most context the profile has room for. Where the lines end shows the VRAM trade."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    by_key = {g.key: g for g in gpus}
    colors = {key: f"C{i % 10}" for i, key in enumerate(by_key)}
    fig, ax = plt.subplots(figsize=(9, 5.5))
    try:
        for p in (q for q in plans if q.fits and q.tok_s is not None):
            xs, ys = _curve(inputs, by_key[p.gpu], p)
            style = "-" if p.profile == FAST_AGENTIC else "--"
            color = colors[p.gpu]
            ax.plot(xs, ys, style, color=color, label=f"{p.gpu_name} {p.profile}")
            ax.plot(xs[-1:], ys[-1:], "o", color=color)
        ax.xaxis.set_major_formatter(lambda x, _pos: f"{x / 1000:g}K")
        ax.set_xlabel("context per sequence (tokens)")
        ax.set_ylabel("decode tok/s per sequence")
        ax.set_title(f"{inputs.arch.params_b:g}B, KV {inputs.kv_dtype}, concurrency {inputs.concurrency}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=110)
    except OSError as exc:
        raise PoolError(f"cannot write plot {path}: {exc.strerror or exc}") from exc
    finally:
        plt.close(fig)


def _curve(inputs: PlanInputs, gpu: GpuClass, p: ProfilePlan) -> tuple[list[int], list[float]]:
    factor = p.speedup if p.speedup is not None else 1.0
    xs = [round(p.context_per_sequence * i / (PLOT_POINTS - 1)) for i in range(PLOT_POINTS)]
    ys = [(decode_tok_s(inputs, gpu, p.profile, x) or 0.0) * factor for x in xs]
    return xs, ys
