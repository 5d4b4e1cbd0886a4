"""External replicas in the platform file: OpenAI-compatible servers Bastion does not run (llama.cpp's
`llama-server`, Ollama, a vLLM elsewhere), put behind the same gateway, limits, audit and routing.

The upstream API key is named, never written here: `api_key_env` (an environment variable) or `api_key_file`
(a mounted secret). The key is read when the gateway starts and is never logged, audited or echoed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_NAME = r"^[a-z0-9][a-z0-9._-]{0,62}$"
_URL = re.compile(r"^https?://[^/\s?#]+(/[^\s?#]*)?$")
ServerKind = Literal["openai", "vllm", "llama_cpp", "ollama"]
SpeculationSource = Literal["auto", "vllm", "llama_cpp", "ollama", "none"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HealthCheckConfig(_Strict):
    """Polled by each gateway replica. Defaults eject a dead upstream within ~1.5 s (2 × 0.5 s + 0.5 s timeout);
    a connection error during a request ejects it at once."""

    path: str = Field(
        default="models",
        description="GET target: relative to base_url (`models` → {base_url}/models), or from the host root if it "
        "starts with / (`/health` for vLLM and llama-server)",
    )
    interval_s: float = Field(default=0.5, gt=0, le=30)
    timeout_s: float = Field(default=0.5, gt=0, le=30)
    failures_to_eject: int = Field(default=2, ge=1, le=10)
    successes_to_restore: int = Field(default=1, ge=1, le=10)


class ExternalTimeouts(_Strict):
    connect_s: float = Field(default=2.0, gt=0, le=60)
    read_s: float = Field(default=300.0, gt=0, le=3600, description="between two bytes of the answer")


class ExternalReplicaConfig(_Strict):
    name: str = Field(pattern=_NAME, description="the upstream's name in routing, audit and the console")
    base_url: str = Field(description="the OpenAI-compatible base, e.g. http://10.0.0.7:8080/v1")
    model: str = Field(description="the model name clients use (may also be served in Ray)")
    upstream_model: str | None = Field(default=None, description="the name the server knows; default: model")
    profile: str
    max_context: int = Field(gt=0, description="prompt + completion tokens one request may use")
    max_ongoing_requests: int = Field(default=8, ge=1)
    kind: ServerKind = Field(default="openai", description="decides token counting and speculation statistics")
    speculation_source: SpeculationSource = "auto"
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    api_key_file: Path | None = None
    health: HealthCheckConfig = HealthCheckConfig()
    timeouts: ExternalTimeouts = ExternalTimeouts()

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not _URL.match(value):
            raise ValueError("base_url must be http(s)://host[:port][/path], without query or credentials")
        if "@" in value.split("/")[2]:
            raise ValueError("base_url must not carry credentials: use api_key_env or api_key_file")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _one_key_source(self) -> ExternalReplicaConfig:
        if self.api_key_env and self.api_key_file:
            raise ValueError(f"external_replicas {self.name}: set api_key_env or api_key_file, not both")
        return self

    def read_api_key(self) -> str | None:
        """The upstream's key from its environment variable or secret file; a missing one is an error naming the
        source, never the value."""
        if self.api_key_env:
            value = os.environ.get(self.api_key_env, "").strip()
            if not value:
                raise ValueError(f"external replica {self.name}: environment variable {self.api_key_env} is not set")
            return value
        if self.api_key_file:
            try:
                return self.api_key_file.read_text().strip()
            except OSError as exc:
                raise ValueError(
                    f"external replica {self.name}: cannot read api_key_file ({type(exc).__name__})"
                ) from None
        return None

    @property
    def served_model(self) -> str:
        return self.upstream_model or self.model

    @property
    def speculation(self) -> str:
        """Where speculation statistics come from: the explicit source, else the server kind's (generic: any)."""
        if self.speculation_source != "auto":
            return self.speculation_source
        return {"openai": "auto", "vllm": "vllm", "llama_cpp": "llama_cpp", "ollama": "ollama"}[self.kind]

    @property
    def root_url(self) -> str:
        """scheme://host:port — where vLLM and llama-server answer /health, /tokenize and /metrics."""
        scheme, _, rest = self.base_url.partition("://")
        return f"{scheme}://{rest.split('/', 1)[0]}"

    @property
    def health_url(self) -> str:
        path = self.health.path
        return self.root_url + path if path.startswith("/") else f"{self.base_url}/{path}"


def check_external(replicas: list[ExternalReplicaConfig], profiles: set[str], deployment_names: set[str]) -> None:
    """Cross-references the platform file's validator runs (raises ValueError naming the entry)."""
    seen: set[str] = set()
    for i, ext in enumerate(replicas):
        if ext.profile not in profiles:
            raise ValueError(f"external_replicas.{i}.profile: unknown profile {ext.profile!r}")
        if ext.name in seen or ext.name in deployment_names:
            raise ValueError(f"external_replicas.{i}.name: {ext.name!r} is already used")
        seen.add(ext.name)
