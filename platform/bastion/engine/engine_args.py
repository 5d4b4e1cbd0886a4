"""From (model, profile) in the platform file to the arguments of one vLLM engine.

Kept free of vLLM imports so the mapping can be checked (and fail loudly) before an engine is started.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bastion.config.schema import (
    DeploymentConfig,
    DraftModelSpeculation,
    MtpSpeculation,
    NgramSpeculation,
    PlatformConfig,
    ProfileConfig,
    SpeculationOff,
)
from bastion.engine.guard import GuardSettings
from bastion.engine.model_store import model_path
from bastion.errors import EngineConfigError

WORKER_EXTENSION = "bastion.engine.vllm_plugin.WorkerControl"

# Keys under which checkpoints declare their multi-token-prediction layers.
_MTP_KEYS = ("num_nextn_predict_layers", "mtp_num_hidden_layers", "num_mtp_layers")


@dataclass(frozen=True)
class EngineSpec:
    """Everything one replica needs: picklable, so Ray can ship it to the replica process."""

    model: str
    profile: str
    path: str
    served_name: str
    max_model_len: int
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    speculative: bool = False
    verify_manifest: bool = True
    tool_parser: str | None = None  # vLLM's OpenAI layer, not an engine argument
    drift: dict[str, float] = field(default_factory=dict)  # DriftMonitor settings (telemetry.acceptance_drift_*)
    guard: GuardSettings | None = None  # the speculation guard (engine/guard.py); None: no speculation or off
    device: str = "cpu"  # for the known-bad check at replica start (engine/known_bad.py)
    allow_known_bad: tuple[str, ...] = ()


def mtp_layers(folder: Path) -> int:
    """How many MTP layers a checkpoint declares in its config.json (0 when none)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        return 0
    except ValueError:
        raise EngineConfigError(f"{folder / 'config.json'} is not valid JSON") from None
    text_config = config.get("text_config", config)
    return max(int(text_config.get(key) or 0) for key in _MTP_KEYS)


def speculative_config(config: PlatformConfig, profile_name: str, profile: ProfileConfig) -> dict[str, Any] | None:
    """vLLM's `speculative_config` for a profile; None when speculation is off."""
    spec = profile.speculative
    if isinstance(spec, SpeculationOff):
        return None
    if isinstance(spec, NgramSpeculation):
        return {
            "method": "ngram",
            "num_speculative_tokens": spec.num_speculative_tokens,
            "prompt_lookup_max": spec.prompt_lookup_max,
            "prompt_lookup_min": spec.prompt_lookup_min,
        }
    if isinstance(spec, MtpSpeculation):
        return {"method": "mtp", "num_speculative_tokens": spec.num_speculative_tokens}
    if isinstance(spec, DraftModelSpeculation):
        draft = config.model(spec.model)
        return {
            "method": "draft_model",
            "model": str(model_path(draft, config.data_dir)),
            "num_speculative_tokens": spec.num_speculative_tokens,
        }
    raise EngineConfigError(f"profile {profile_name}: unsupported speculation {spec!r}")  # pragma: no cover


def check_mtp(model: str, profile: str, folder: Path) -> None:
    """MTP on a checkpoint without MTP layers is an error, never a silent fallback to no speculation."""
    if mtp_layers(folder) == 0:
        raise EngineConfigError(
            f"profile {profile} asks for MTP speculation, but model {model} ({folder}) has no MTP layers "
            f"(its config.json sets none of {', '.join(_MTP_KEYS)}); graft and train a head with "
            "`bastion mtp graft`, or use ngram or draft_model speculation for this profile"
        )


def engine_spec(config: PlatformConfig, dep: DeploymentConfig) -> EngineSpec:
    model = config.model(dep.model)
    profile = config.profiles[dep.profile]
    folder = model_path(model, config.data_dir)
    spec_config = speculative_config(config, dep.profile, profile)
    if spec_config is not None and spec_config["method"] == "mtp":
        check_mtp(model.name, dep.profile, folder)
    from bastion.engine.guard_setup import deployment_refusals, device_of, guard_settings
    from bastion.engine.known_bad import refuse

    max_len = min(model.max_model_len, profile.max_context or model.max_model_len)
    kwargs: dict[str, Any] = {
        "model": str(folder),
        "served_model_name": [model.name],
        "dtype": model.dtype,
        "max_model_len": max_len,
        "kv_cache_dtype": profile.kv_cache_dtype,
        "enforce_eager": dep.gpu_class is None,  # CPU: eager is ready in ~20 s, compile takes 60-90 s
        "disable_log_stats": False,  # vLLM's own counters feed routing, dashboards and reconciliation
        "tensor_parallel_size": max(dep.gpus_per_replica, 1),
        "enable_prefix_caching": True,
        # bastion_set_cpu_fix in the worker process (vllm_plugin.py): tests switch the CPU fix off and on
        "worker_extension_cls": WORKER_EXTENSION,
    }
    if spec_config is not None:
        kwargs["speculative_config"] = spec_config
        kwargs["per_request_spec_decode_metrics"] = "summary"
    kwargs.update(profile.engine_args)
    refuse(deployment_refusals(config, dep, kwargs))
    return EngineSpec(
        tool_parser=model.tool_parser,
        model=model.name,
        profile=dep.profile,
        path=str(folder),
        served_name=model.name,
        max_model_len=max_len,
        engine_kwargs=kwargs,
        speculative=spec_config is not None,
        drift={
            "margin": config.telemetry.acceptance_drift_margin,
            "min_draft_tokens": config.telemetry.acceptance_drift_min_draft_tokens,
            "window_s": config.telemetry.acceptance_drift_window_s,
        },
        guard=guard_settings(config, dep),
        device=device_of(dep),
        allow_known_bad=tuple(config.engine.allow_known_bad),
    )
