"""The installed `bastion` command: one clear line and a non-zero exit on errors, no traceback unless --debug."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
BASTION = str(Path(sys.executable).parent / "bastion")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BASTION, *args], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)


def test_help_and_version() -> None:
    assert "config" in _run("--help").stdout
    result = _run("version")
    assert result.returncode == 0 and result.stdout.strip()


def test_config_check_default_prints_ok() -> None:
    result = _run("config", "check", "deploy/local/bastion.yaml")
    assert result.returncode == 0
    assert result.stdout.strip() == "ok"


def test_config_error_is_one_line_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "deploy/local/bastion.yaml").read_text().replace("max_model_len", "max_model_length"))
    result = _run("config", "check", str(bad))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"{bad}: models.0.max_model_length: unknown key" in result.stderr
    assert "required key is missing" in result.stderr  # max_model_len itself is now missing

    debug = _run("--debug", "config", "check", str(bad))
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_db_commands_on_sqlite(tmp_path: Path) -> None:
    config = tmp_path / "platform.yaml"
    text = (ROOT / "deploy/local/bastion.yaml").read_text().replace("data_dir: .bastion-data", f"data_dir: {tmp_path}")
    config.write_text(text)
    assert _run("db", "upgrade", "--config", str(config)).returncode == 0
    assert "(head)" in _run("db", "current", "--config", str(config)).stdout
    assert _run("db", "downgrade", "--config", str(config), "--revision", "base").returncode == 0
    assert "empty database" in _run("db", "current", "--config", str(config)).stdout


def test_db_unreachable_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "platform.yaml"
    text = (ROOT / "deploy/local/bastion.yaml").read_text()
    text = text.replace('"sqlite+aiosqlite:///{data_dir}/bastion.db"', '"postgresql://nobody@127.0.0.1:1/none"')
    config.write_text(text)
    result = _run("db", "current", "--config", str(config))
    assert result.returncode == 1
    assert result.stderr.startswith("error: database unreachable")
    assert "Traceback" not in result.stderr
