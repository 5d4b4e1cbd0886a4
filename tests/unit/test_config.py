"""The platform file: the embedded default validates; typos and wrong types name the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from bastion.cli import app
from bastion.config import Settings, load_config
from bastion.config.schema import MtpSpeculation, SpeculationOff
from bastion.errors import ConfigError

pytestmark = pytest.mark.unit
DEFAULT = Path(__file__).resolve().parents[2] / "deploy" / "local" / "bastion.yaml"


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "platform.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def default_data() -> dict:
    return yaml.safe_load(DEFAULT.read_text())


def test_embedded_default_is_valid() -> None:
    config = load_config(DEFAULT, Settings())
    assert config.database.url.startswith("sqlite+aiosqlite:///")
    assert "{data_dir}" not in config.database.url
    assert config.redis.url is None
    assert isinstance(config.profiles["deep-context"].speculative, SpeculationOff)
    assert config.profiles["fast-agentic"].speculative == MtpSpeculation(method="mtp", num_speculative_tokens=1)
    assert config.model("smollm2-135m").max_model_len == 8192  # the model's whole context, for deep-context
    assert config.profiles["fast-agentic"].max_context == 2048
    assert {d.name for d in config.deployments} == {"smollm2-135m@deep-context", "smollm2-135m@fast-agentic"}


def test_cli_check_prints_ok() -> None:
    result = CliRunner().invoke(app, ["config", "check", str(DEFAULT)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "ok"


def test_misspelled_key_is_named_with_file(tmp_path: Path, default_data: dict) -> None:
    default_data["profiles"]["fast-agentic"]["speculativ"] = default_data["profiles"]["fast-agentic"].pop("speculative")
    path = _write(tmp_path, default_data)
    with pytest.raises(ConfigError) as err:
        load_config(path, Settings())
    assert f"{path}: profiles.fast-agentic.speculativ: unknown key" in str(err.value)


def test_misspelled_top_level_key(tmp_path: Path, default_data: dict) -> None:
    default_data["telemetri"] = {}
    path = _write(tmp_path, default_data)
    with pytest.raises(ConfigError, match=r"telemetri: unknown key"):
        load_config(path, Settings())


def test_wrong_type_names_key_and_expected_type(tmp_path: Path, default_data: dict) -> None:
    default_data["models"][0]["max_model_len"] = "long"
    path = _write(tmp_path, default_data)
    with pytest.raises(ConfigError) as err:
        load_config(path, Settings())
    assert f"{path}: models.0.max_model_len: expected integer, got 'long'" in str(err.value)


def test_every_error_is_listed(tmp_path: Path, default_data: dict) -> None:
    default_data["gateway"]["port"] = "http"
    default_data["audit"] = {"log_contents": True}
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, default_data), Settings())
    lines = str(err.value).splitlines()
    assert any("gateway.port: expected integer" in line for line in lines)
    assert any("audit.log_contents: unknown key" in line for line in lines)


def test_unknown_speculation_method(tmp_path: Path, default_data: dict) -> None:
    default_data["profiles"]["fast-agentic"]["speculative"] = {"method": "eagle9", "num_speculative_tokens": 2}
    with pytest.raises(ConfigError, match=r"profiles\.fast-agentic\.speculative"):
        load_config(_write(tmp_path, default_data), Settings())


def test_cross_references_are_checked(tmp_path: Path, default_data: dict) -> None:
    default_data["deployments"][0]["profile"] = "deep-contxt"
    with pytest.raises(ConfigError, match=r"deployments.0.profile: unknown profile 'deep-contxt'"):
        load_config(_write(tmp_path, default_data), Settings())


def test_mtp_parses(tmp_path: Path, default_data: dict) -> None:
    default_data["profiles"]["fast-agentic"]["speculative"] = {"method": "mtp", "num_speculative_tokens": 2}
    config = load_config(_write(tmp_path, default_data), Settings())
    assert config.profiles["fast-agentic"].speculative == MtpSpeculation(method="mtp", num_speculative_tokens=2)


def test_environment_overrides(tmp_path: Path, default_data: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BASTION_DATABASE_URL", "postgresql://u@127.0.0.1/x")
    monkeypatch.setenv("BASTION_REDIS_URL", "redis://127.0.0.1:6379/2")
    monkeypatch.setenv("BASTION_DATA_DIR", str(tmp_path / "data"))
    config = load_config(_write(tmp_path, default_data), Settings())
    assert config.database.url == "postgresql://u@127.0.0.1/x"
    assert config.redis.url == "redis://127.0.0.1:6379/2"
    assert config.data_dir == (tmp_path / "data").resolve()


def test_cli_reports_errors_in_one_line_each(tmp_path: Path, default_data: dict) -> None:
    default_data["modles"] = []
    path = _write(tmp_path, default_data)
    result = CliRunner().invoke(app, ["config", "check", str(path)])
    assert result.exit_code != 0
    assert isinstance(result.exception, ConfigError)
    assert "modles: unknown key" in str(result.exception)


@pytest.mark.parametrize("text, message", [("a: [", "not valid YAML at line"), ("- 1\n- 2\n", "must be a mapping")])
def test_malformed_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, Settings())


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml", Settings())
