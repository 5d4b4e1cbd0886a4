"""Read the platform file, apply `BASTION_*` overrides, and turn validation errors into lines a person can act on."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from bastion.config.schema import PlatformConfig
from bastion.errors import ConfigError

DEFAULT_CONFIG = Path("deploy/local/bastion.yaml")


class Settings(BaseSettings):
    """Process settings from the environment; the last three override the platform file."""

    model_config = SettingsConfigDict(env_prefix="BASTION_", extra="ignore")

    config: Path = DEFAULT_CONFIG
    env: Literal["development", "production"] = "development"
    log_level: str = "INFO"
    data_dir: Path | None = None
    database_url: str | None = None
    redis_url: str | None = None


_EXPECTED = {
    "int_parsing": "integer",
    "int_type": "integer",
    "int_from_float": "integer",
    "float_parsing": "number",
    "float_type": "number",
    "bool_parsing": "boolean",
    "bool_type": "boolean",
    "string_type": "string",
    "dict_type": "mapping",
    "list_type": "list",
    "model_type": "mapping",
    "model_attributes_type": "mapping",
}


def _describe(error: dict[str, Any]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {error.get('input')!r}"
    if kind == "literal_error":
        return f"{error['msg'].replace('Input should be', 'expected')}, got {error.get('input')!r}"
    if kind == "union_tag_invalid":
        return error["msg"]
    return error["msg"].removeprefix("Value error, ")


def format_errors(path: Path | str, exc: ValidationError) -> list[str]:
    """One line per error: `FILE: key.path: what is wrong`."""
    lines = []
    for error in exc.errors():
        loc = ".".join(str(part) for part in error["loc"])
        where = f"{path}: {loc}: " if loc else f"{path}: "
        lines.append(where + _describe(error))
    return lines


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the platform file must be a mapping at the top level")
    return data


def _apply_overrides(data: dict[str, Any], settings: Settings) -> dict[str, Any]:
    data = dict(data)
    if settings.data_dir is not None:
        data["data_dir"] = str(settings.data_dir)
    if settings.database_url is not None:
        data["database"] = {**(data.get("database") or {}), "url": settings.database_url}
    if settings.redis_url is not None:
        data["redis"] = {**(data.get("redis") or {}), "url": settings.redis_url or None}
    return data


def _expand(config: PlatformConfig) -> PlatformConfig:
    """Substitute `{data_dir}` in the database URL so one file works wherever the data directory is."""
    data_dir = config.data_dir.expanduser().resolve()
    url = config.database.url.replace("{data_dir}", str(data_dir))
    return config.model_copy(update={"data_dir": data_dir, "database": config.database.model_copy(update={"url": url})})


def load_config(path: Path | str | None = None, settings: Settings | None = None) -> PlatformConfig:
    """Load and validate the platform file; raise ConfigError listing every problem."""
    settings = settings or Settings()
    path = Path(path) if path is not None else settings.config
    data = _apply_overrides(_read_yaml(path), settings)
    try:
        config = PlatformConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("\n".join(format_errors(path, exc))) from None
    return _expand(config)


def is_production() -> bool:
    return os.environ.get("BASTION_ENV", "development") == "production"
