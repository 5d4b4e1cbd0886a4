"""Fixtures for the chart tests: values generated from the examples, and the chart rendered once per set."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from helm_support import BASTION, MIXED_POOL, ROOT, Manifest, parse, template


@pytest.fixture(scope="session")
def mixed_values(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`bastion helm values` run on deploy/examples/mixed-pool.yaml, as an operator would."""
    out = tmp_path_factory.mktemp("values") / "mixed-pool-values.yaml"
    result = subprocess.run(
        [str(BASTION), "helm", "values", "--config", str(MIXED_POOL), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def full_values(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every optional part on: Ingress, ServiceMonitor, OTLP egress, secrets given as values, digests."""
    out = tmp_path_factory.mktemp("values") / "full.yaml"
    digest = "sha256:" + "ab" * 32
    out.write_text(
        yaml.safe_dump(
            {
                "images": {
                    "serving": {"repository": "r/serving", "tag": "1", "digest": digest, "pullPolicy": "Always"},
                    "control": {"repository": "r/control", "tag": "1", "digest": digest, "pullPolicy": "Always"},
                },
                "secrets": {
                    "databaseUrl": {
                        "existingSecret": "",
                        "key": "database-url",
                        "value": "postgresql+asyncpg://u:p@db/b",
                    },
                    "apiKeyPepper": {"existingSecret": "site-keys", "key": "pepper", "value": ""},
                },
                "controlPlane": {"ingress": {"enabled": True, "host": "console.test", "tlsSecretName": "console-tls"}},
                "serviceMonitor": {"enabled": True},
                "networkPolicy": {
                    "otlp": {"enabled": True, "port": 4317, "to": [{"ipBlock": {"cidr": "10.0.0.0/24"}}]},
                    "database": {"port": 5432, "to": [{"ipBlock": {"cidr": "10.1.0.10/32"}}]},
                    "gatewayFrom": [{"namespaceSelector": {"matchLabels": {"bastion.io/clients": "true"}}}],
                },
            }
        )
    )
    return out


@pytest.fixture(scope="session")
def render() -> Callable[..., list[Manifest]]:
    cache: dict[tuple[str, ...], list[Manifest]] = {}

    def _render(*values: Path) -> list[Manifest]:
        key = tuple(str(v) for v in values)
        if key not in cache:
            cache[key] = parse(template(list(values)).stdout)
        return cache[key]

    return _render
