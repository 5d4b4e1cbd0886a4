"""The control plane's Deployment as rendered by a real `helm`: the console URL, the OIDC client id and audience,
and the live pool statistics (gateway URL and shared token) reach it from values, and what it renders is what
ControlSettings and bastion.pool.live_stats read."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_support import MIXED_POOL, NAMESPACE, Manifest, chart_values, one, parse, template

from bastion.config import PlatformConfig
from bastion.control.settings import ControlSettings
from bastion.pool.live_stats import POOL_STATS_PATH

pytestmark = pytest.mark.integration

Render = Callable[..., list[Manifest]]
TOKEN_FILE = "/etc/bastion/secrets/pool-stats-token"


def _control(manifests: list[Manifest]) -> dict[str, Any]:
    return one(manifests, "Deployment", "bastion-control")["spec"]["template"]["spec"]


def _env(manifests: list[Manifest]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in _control(manifests)["containers"][0]["env"]}


def _secret_files(volumes: list[dict[str, Any]]) -> set[str]:
    secrets = next(v for v in volumes if v["name"] == "secrets")
    return {item["path"] for source in secrets["projected"]["sources"] for item in source["secret"]["items"]}


def _settings(platform: dict[str, Any], env: dict[str, str]) -> ControlSettings:
    """ControlSettings from the rendered platform file and environment (less the pod-only secret file and
    production flag: the test has no mounted secret)."""
    env = {k: v for k, v in env.items() if k not in ("BASTION_OIDC_CLIENT_SECRET_FILE", "BASTION_ENV")}
    return ControlSettings.from_config(PlatformConfig.model_validate({**platform, "database": {"url": "x"}}), env)


def _values(tmp_path: Path, name: str, data: dict[str, Any]) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_point_the_control_plane_at_the_gateway_service(render: Render) -> None:
    manifests = render()
    env = _env(manifests)
    assert env["BASTION_POOL_STATS_URL"] == f"http://bastion-serve-svc.{NAMESPACE}.svc:8000{POOL_STATS_PATH}"
    assert "BASTION_CONSOLE_URL" not in env  # no Ingress, no publicUrl: the request's own URL
    assert "BASTION_OIDC_CLIENT_ID" not in env and "BASTION_OIDC_AUDIENCE" not in env  # the platform file's
    platform = yaml.safe_load(one(manifests, "ConfigMap", "bastion-platform")["data"]["bastion.yaml"])
    assert platform["control"]["pool_stats_token_file"] == TOKEN_FILE
    # The token is mounted where the platform file says, in the control plane and in every Ray pod (the gateway).
    assert "pool-stats-token" in _secret_files(_control(manifests)["volumes"])
    cluster = one(manifests, "RayService")["spec"]["rayClusterConfig"]
    for pod in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert "pool-stats-token" in _secret_files(pod["template"]["spec"]["volumes"])
    # What the control plane builds from this environment and platform file.
    settings = _settings(platform, env)
    assert settings.pool_stats_url == env["BASTION_POOL_STATS_URL"]
    assert settings.client_id == "bastion-console" and settings.audience == "bastion-console"


def test_ingress_host_is_the_console_url(render: Render, mixed_values: Path, full_values: Path) -> None:
    env = _env(render(mixed_values, full_values))
    assert env["BASTION_CONSOLE_URL"] == "https://console.test"


def test_values_set_console_url_oidc_client_and_pool_stats(mixed_values: Path, tmp_path: Path) -> None:
    overrides = {
        "controlPlane": {
            "publicUrl": "https://admin.corp.example/",
            "oidc": {"clientId": "corp-console", "audience": "corp-admin-api"},
            "poolStats": {"url": "http://gw.serving.svc:8000/internal/pool/replicas"},
        },
        "secrets": {"poolStatsToken": {"existingSecret": "site-tokens", "key": "pool", "value": ""}},
    }
    manifests = parse(template([mixed_values, _values(tmp_path, "cp.yaml", overrides)]).stdout)
    env = _env(manifests)
    assert env["BASTION_CONSOLE_URL"] == "https://admin.corp.example"
    assert env["BASTION_OIDC_CLIENT_ID"] == "corp-console" and env["BASTION_OIDC_AUDIENCE"] == "corp-admin-api"
    assert env["BASTION_POOL_STATS_URL"] == "http://gw.serving.svc:8000/internal/pool/replicas"
    secrets = next(v for v in _control(manifests)["volumes"] if v["name"] == "secrets")["projected"]["sources"]
    token = next(s["secret"] for s in secrets if s["secret"]["items"][0]["path"] == "pool-stats-token")
    assert token == {"name": "site-tokens", "items": [{"key": "pool", "path": "pool-stats-token"}]}
    platform = yaml.safe_load(one(manifests, "ConfigMap", "bastion-platform")["data"]["bastion.yaml"])
    settings = _settings(platform, env)
    assert (settings.client_id, settings.audience) == ("corp-console", "corp-admin-api")
    assert settings.public_url == "https://admin.corp.example"


def test_oidc_issuer_without_a_client_id_fails_to_render(tmp_path: Path) -> None:
    source = yaml.safe_load(MIXED_POOL.read_text())
    source["auth"] = {"oidc_issuer": "https://kc.example/realms/bastion"}
    platform_file = _values(tmp_path, "platform.yaml", source)
    values = chart_values(platform_file, tmp_path / "values.yaml")
    failed = template([values], check=False)
    assert failed.returncode != 0 and "no OIDC client id" in failed.stderr
    fixed = _values(tmp_path, "client.yaml", {"controlPlane": {"oidc": {"clientId": "console", "audience": ""}}})
    env = _env(parse(template([values, fixed]).stdout))
    assert env["BASTION_OIDC_CLIENT_ID"] == "console" and "BASTION_OIDC_AUDIENCE" not in env


def test_control_plane_reaches_the_gateway_port_only_among_ray_ports(render: Render, mixed_values: Path) -> None:
    policies = {p["metadata"]["name"]: p["spec"] for p in render(mixed_values) if p["kind"] == "NetworkPolicy"}
    to_ray = [r for r in policies["bastion-control"]["egress"] if r.get("to", [{}])[0].get("podSelector")]
    assert [r["ports"] for r in to_ray] == [[{"protocol": "TCP", "port": 8000}]]
    from_control = [
        r
        for r in policies["bastion-serving"]["ingress"]
        if any(
            p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component") == "control-plane"
            for p in r.get("from", [])
        )
    ]
    assert [r["ports"] for r in from_control] == [[{"protocol": "TCP", "port": 8000}]]
