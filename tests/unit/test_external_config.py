"""The platform file's `external_replicas`: strict keys, references checked, secrets named never inlined."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from bastion.config.schema import PlatformConfig

pytestmark = pytest.mark.unit


def platform(*external: dict[str, Any]) -> dict[str, Any]:
    return {
        "data_dir": "/tmp/x",
        "database": {"url": "sqlite+aiosqlite:///x.db"},
        "models": [{"name": "m1", "source": "/nonexistent", "max_model_len": 4096}],
        "profiles": {"deep-context": {}, "fast-agentic": {}},
        "deployments": [{"model": "m1", "profile": "deep-context"}],
        "external_replicas": list(external),
    }


def ext(**overrides: Any) -> dict[str, Any]:
    return {
        "name": "gpu-box",
        "base_url": "http://10.1.2.3:8080/v1/",
        "model": "m1",
        "profile": "fast-agentic",
        "max_context": 8192,
        **overrides,
    }


def test_minimal_entry_gets_safe_defaults() -> None:
    config = PlatformConfig.model_validate(platform(ext(kind="llama_cpp", health={"path": "/health"})))
    (e,) = config.external_replicas
    assert e.base_url == "http://10.1.2.3:8080/v1"  # trailing slash dropped
    assert e.root_url == "http://10.1.2.3:8080"
    assert e.health_url == "http://10.1.2.3:8080/health"
    assert e.speculation == "llama_cpp" and e.served_model == "m1"
    # The defaults take a dead upstream out well within 2 s: two failed probes 0.5 s apart, 0.5 s timeout each.
    h = e.health
    assert h.interval_s * (h.failures_to_eject - 1) + h.timeout_s * h.failures_to_eject <= 2.0


def test_relative_health_path_and_generic_kind() -> None:
    e = PlatformConfig.model_validate(platform(ext(upstream_model="qwen3:27b"))).external_replicas[0]
    assert e.health_url == "http://10.1.2.3:8080/v1/models"
    assert e.speculation == "auto" and e.served_model == "qwen3:27b"
    ollama = PlatformConfig.model_validate(platform(ext(kind="ollama"))).external_replicas[0]
    assert ollama.speculation == "ollama"


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        (ext(colour="red"), "colour"),
        (ext(health={"interval": 1}), "interval"),
        (ext(profile="nope"), "unknown profile 'nope'"),
        (ext(api_key_env="K", api_key_file="/run/k"), "not both"),
        (ext(base_url="http://user:pw@host/v1"), "credentials"),
        (ext(base_url="ftp://host/v1"), "base_url"),
        (ext(kind="tgi"), "kind"),
        (ext(max_context=0), "max_context"),
    ],
)
def test_bad_entries_are_errors_naming_the_key(entry: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValidationError) as info:
        PlatformConfig.model_validate(platform(entry))
    assert needle in str(info.value)


def test_names_are_unique() -> None:
    with pytest.raises(ValidationError, match="already used"):
        PlatformConfig.model_validate(platform(ext(), ext()))


def test_the_key_is_read_from_its_source_and_errors_never_show_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    by_env = PlatformConfig.model_validate(platform(ext(api_key_env="GPU_BOX_KEY"))).external_replicas[0]
    monkeypatch.delenv("GPU_BOX_KEY", raising=False)
    with pytest.raises(ValueError, match="GPU_BOX_KEY is not set"):
        by_env.read_api_key()
    monkeypatch.setenv("GPU_BOX_KEY", " sk-from-env-0001\n")
    assert by_env.read_api_key() == "sk-from-env-0001"
    assert "sk-from-env" not in repr(by_env) and "sk-from-env" not in by_env.model_dump_json()

    secret = tmp_path / "key"
    secret.write_text("sk-from-file-0002\n")
    by_file = PlatformConfig.model_validate(platform(ext(api_key_file=str(secret)))).external_replicas[0]
    assert by_file.read_api_key() == "sk-from-file-0002"
    secret.unlink()
    with pytest.raises(ValueError, match="cannot read api_key_file") as info:
        by_file.read_api_key()
    assert "sk-from-file" not in str(info.value)
    assert PlatformConfig.model_validate(platform(ext())).external_replicas[0].read_api_key() is None
