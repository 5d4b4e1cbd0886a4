"""The replica's side of the guard set-up: checks that need no engine (known-bad rows with the vLLM in this
process, a current golden record), and the guard itself built from the golden record and the canaries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bastion.engine.canaries import read_golden
from bastion.engine.golden import canary_prompts
from bastion.engine.guard import GuardSettings, SpeculationGuard
from bastion.engine.known_bad import model_family, refusals, refuse


def preflight_guard(spec: Any, spec_cfg: dict[str, Any]) -> None:
    """Before the engine starts: refuse a known-bad combination here (this process's vLLM and plugins), and a
    missing or stale golden record (EngineConfigError naming the command that records it)."""
    refuse(
        refusals(
            where=f"replica {spec.model}@{spec.profile}",
            method=str(spec_cfg.get("method")),
            device=spec.device,
            family=model_family(spec.model, Path(spec.path)),
            prefix_caching=bool(spec.engine_kwargs.get("enable_prefix_caching")),
            allowed=tuple(spec.allow_known_bad),
        )
    )
    if spec.guard is not None:
        read_golden(Path(spec.guard.golden), Path(spec.path), spec.guard.dtype)


def make_guard(settings: GuardSettings, model_dir: Path) -> SpeculationGuard:
    golden = read_golden(Path(settings.golden), model_dir, settings.dtype)
    prompts = canary_prompts(model_dir)
    missing = sorted(set(golden.greedy) - set(prompts))
    if missing:  # cannot happen with a current record (the canary set is part of its key)
        raise ValueError(f"golden record names canaries the set lacks: {missing}")
    guard = SpeculationGuard(settings, golden, {cid: prompts[cid] for cid in golden.greedy})
    bases = [golden.sampled[k].mean for k in golden.sampled]
    guard.live.floor = min(bases) if bases else None
    return guard
