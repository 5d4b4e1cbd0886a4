"""From the platform file to the speculation guard of each deployment: its settings, and the known-bad refusals
that `bastion config check`, `engine_spec` (before Ray) and the replica itself (before its engine) apply."""

from __future__ import annotations

import logging
from pathlib import Path

from bastion.config.schema import DeploymentConfig, PlatformConfig
from bastion.engine.canaries import golden_path
from bastion.engine.guard import GuardSettings
from bastion.engine.known_bad import TABLE_IDS, model_family, refusals
from bastion.engine.model_store import model_path
from bastion.errors import EngineConfigError

log = logging.getLogger(__name__)


def device_of(dep: DeploymentConfig) -> str:
    return "cpu" if dep.gpu_class is None else "gpu"


def guard_settings(config: PlatformConfig, dep: DeploymentConfig) -> GuardSettings | None:
    """The guard of a speculating deployment; None when its profile does not speculate or the guard is off."""
    method = config.profiles[dep.profile].speculative.method
    if method == "off":
        return None
    e = config.engine
    if not e.guard_enabled:
        log.warning("speculation guard is off (engine.guard_enabled): %s starts unchecked", dep.name)
        return None
    model = config.model(dep.model)
    return GuardSettings(
        golden=str(golden_path(config.data_dir, model.name, model.dtype)),
        dtype=model.dtype,
        interval_s=e.guard_interval_s,
        after_sampled_requests=e.guard_after_sampled_requests,
        greedy_min_match=e.guard_greedy_min_match,
        tie_margin=e.guard_tie_margin,
        logprob_margin=e.guard_logprob_margin,
        temperatures=tuple(e.guard_temperatures),
        live_min_tokens=e.guard_live_min_tokens,
        live_margin=e.guard_live_margin,
    )


def deployment_refusals(
    config: PlatformConfig, dep: DeploymentConfig, engine_args: dict | None = None, *, refused: bool = True
) -> list[str]:
    """Known-bad rows this deployment hits with the vLLM installed here (refused ones, or those that warn)."""
    profile = config.profiles[dep.profile]
    method = profile.speculative.method
    model = config.model(dep.model)
    folder = model_path(model, config.data_dir)
    args = {"enable_prefix_caching": True, **profile.engine_args, **(engine_args or {})}
    return refusals(
        where=f"deployment {dep.name}",
        method=method,
        device=device_of(dep),
        family=model_family(model.name, folder if Path(folder).is_dir() else None),
        prefix_caching=bool(args.get("enable_prefix_caching")),
        allowed=tuple(config.engine.allow_known_bad),
        refused=refused,
    )


def config_warnings(config: PlatformConfig) -> list[str]:
    return [w for dep in config.deployments for w in deployment_refusals(config, dep, refused=False)]


def config_refusals(config: PlatformConfig) -> list[str]:
    """Every problem `bastion config check` reports beyond the schema: unknown accepted rows, known-bad rows."""
    unknown = sorted(set(config.engine.allow_known_bad) - TABLE_IDS)
    problems = [f"engine.allow_known_bad: unknown id {u!r} (known: {', '.join(sorted(TABLE_IDS))})" for u in unknown]
    for dep in config.deployments:
        problems += deployment_refusals(config, dep)
    return problems


def check_config(config: PlatformConfig) -> None:
    problems = config_refusals(config)
    if problems:
        raise EngineConfigError("\n".join(problems))
