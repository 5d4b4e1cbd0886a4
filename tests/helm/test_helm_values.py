"""`bastion helm values`: the chart's generated values come from the platform file and stay in step with it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from helm_support import BASTION, CHART, MIXED_POOL, PRODUCTION, ROOT, one, parse, template

from bastion.config import load_config
from bastion.errors import ConfigError
from bastion.serve import helm_values as hv

pytestmark = pytest.mark.integration


def _bastion(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BASTION), *args], capture_output=True, text=True, timeout=120, check=False, cwd=ROOT)


def test_example_platform_files_pass_config_check() -> None:
    for file in (MIXED_POOL, PRODUCTION):
        result = _bastion("config", "check", str(file))
        assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_mixed_pool_example_is_the_one_the_issue_describes() -> None:
    config = load_config(MIXED_POOL)
    assert {n: c.resource for n, c in config.gpu_pool.classes.items()} == {
        "rtx3090": "gpu_rtx3090",
        "h100": "gpu_h100",
    }
    cards = {n.gpu_class: n.count for n in config.gpu_pool.nodes}
    assert cards == {"rtx3090": 2, "h100": 1}
    by_profile = {d.profile: d for d in config.deployments}
    assert by_profile["fast-agentic"].gpu_class == "rtx3090" and by_profile["fast-agentic"].replicas == 2
    assert by_profile["deep-context"].gpu_class == "h100" and by_profile["deep-context"].replicas == 1
    assert config.profiles["fast-agentic"].speculative.model_dump() == {"method": "mtp", "num_speculative_tokens": 2}
    assert config.profiles["deep-context"].speculative.method == "off"
    assert all(m.source.startswith("/models/") for m in config.models)


def test_chart_values_yaml_is_generated_from_the_production_example() -> None:
    """helm/bastion/values.yaml's generated block is `bastion helm values` of deploy/examples/production.yaml."""
    text = (CHART / "values.yaml").read_text()
    fragment = hv.render_fragment(hv.helm_values(hv.read_platform_file(PRODUCTION), str(PRODUCTION)), "x")
    expected = hv.splice(text, fragment.replace("# source: x", "# source: deploy/examples/production.yaml"))
    assert text == expected, (
        "helm/bastion/values.yaml is stale: run `bastion helm values --config deploy/examples/production.yaml "
        "--update helm/bastion/values.yaml`"
    )


def test_chart_values_schema_carries_the_platform_schema() -> None:
    current = json.loads((CHART / "values.schema.json").read_text())
    assert hv.values_schema(current) == current, (
        "helm/bastion/values.schema.json is stale: run `bastion helm schema --update helm/bastion/values.schema.json`"
    )

    # Strict everywhere: every object schema that lists properties forbids the others.
    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            if "properties" in node:
                assert node.get("additionalProperties") is False, path
            for key, value in node.items():
                walk(value, f"{path}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}/{i}")

    walk(current, "#")


def test_cli_out_matches_the_function(mixed_values: Path) -> None:
    values = yaml.safe_load(mixed_values.read_text())
    expected = hv.helm_values(hv.read_platform_file(MIXED_POOL), chart_defaults=hv.chart_defaults(CHART))
    assert values == expected
    assert set(values) == {"platform", "serveConfig", "workerGroups", "generatedSha256"}


def test_no_secret_reaches_the_values(tmp_path: Path) -> None:
    source = yaml.safe_load(MIXED_POOL.read_text())
    source["database"]["url"] = "postgresql+asyncpg://bastion:hunter2@db:5432/bastion"
    source["redis"]["url"] = "redis://:hunter3@redis:6379/0"
    source["audit"] = {"content_key_file": "/somewhere/content.key", "signing_key_file": "/elsewhere/sign.key"}
    file = tmp_path / "platform.yaml"
    file.write_text(yaml.safe_dump(source))
    result = _bastion("helm", "values", "--config", str(file), "--chart", str(CHART))
    assert result.returncode == 0, result.stderr
    assert "hunter" not in result.stdout
    platform = yaml.safe_load(result.stdout)["platform"]
    assert platform["database"]["url"] == hv.DATABASE_URL_PLACEHOLDER
    assert platform["redis"]["url"] == hv.REDIS_URL_PLACEHOLDER
    assert platform["audit"]["content_key_file"] == "/etc/bastion/secrets/audit-content-key"
    assert platform["audit"]["signing_key_file"] == "/etc/bastion/secrets/audit-signing-key"
    assert platform["auth"]["api_key_pepper_file"] == "/etc/bastion/secrets/api-key-pepper"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"database": {"url": "sqlite+aiosqlite:///x.db"}}, "database.url: a cluster needs a shared database"),
        ({"data_dir": "relative/dir"}, "data_dir: must be an absolute path"),
        ({"gateway": {"prot": 1}}, "gateway.prot: unknown key"),
    ],
)
def test_cli_rejects_what_a_cluster_cannot_run(change: dict[str, object], message: str, tmp_path: Path) -> None:
    source = yaml.safe_load(MIXED_POOL.read_text())
    source.update(change)
    file = tmp_path / "platform.yaml"
    file.write_text(yaml.safe_dump(source))
    result = _bastion("helm", "values", "--config", str(file))
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr


def test_splice_needs_the_markers() -> None:
    with pytest.raises(ConfigError):
        hv.splice("platform: {}\n", "x")


def test_fragment_replaces_the_default_platform_instead_of_merging(mixed_values: Path) -> None:
    """Helm deep-merges -f files into values.yaml; the fragment's nulls delete the default's extra keys."""
    manifests = parse(template([mixed_values]).stdout)
    mounted = yaml.safe_load(one(manifests, "ConfigMap", "bastion-platform")["data"]["bastion.yaml"])
    expected = hv.cluster_platform(hv.read_platform_file(MIXED_POOL))
    assert json.loads(hv.go_json(mounted)) == json.loads(hv.go_json(expected))
    assert "rtx4090" not in mounted["gpu_pool"]["classes"] and "auth" in mounted
    assert "oidc_issuer" not in mounted["auth"]


def test_a_merged_or_edited_platform_fails_to_render(mixed_values: Path, tmp_path: Path) -> None:
    values = yaml.safe_load(mixed_values.read_text())
    # Without the nulls, the production default's rtx4090 class and Keycloak settings would leak in.
    merged = {k: v for k, v in values.items()}
    merged["platform"] = hv.cluster_platform(hv.read_platform_file(MIXED_POOL))
    file = tmp_path / "merged.yaml"
    file.write_text(yaml.safe_dump(merged))
    result = template([file], check=False)
    assert result.returncode != 0 and "deep-merged" in result.stderr, result.stderr
    edit = tmp_path / "edit.yaml"
    edit.write_text(yaml.safe_dump({"platform": {"gateway": {"max_body_bytes": 2048}}}))
    result = template([mixed_values, edit], check=False)
    assert result.returncode != 0 and "regenerate" in result.stderr, result.stderr


def test_go_json_matches_helm_to_json_for_tricky_values(tmp_path: Path) -> None:
    """Fractions, whole floats, HTML characters and non-ASCII text digest the same in Python and in Helm."""
    source = yaml.safe_load(MIXED_POOL.read_text())
    source["deployments"][0]["num_cpus"] = 0.25
    source["deployments"][0]["env"] = {"NOTE": "a<b & c>d é ✓", "BIG": "1e21"}
    source["gpu_pool"]["classes"]["rtx3090"]["bandwidth_gbps"] = 936.5
    source["profiles"]["fast-agentic"]["engine_args"] = {"gpu_memory_utilization": 0.92, "enforce_eager": True}
    file = tmp_path / "platform.yaml"
    file.write_text(yaml.safe_dump(source, allow_unicode=True))
    out = tmp_path / "values.yaml"
    result = _bastion("helm", "values", "--config", str(file), "--chart", str(CHART), "--out", str(out))
    assert result.returncode == 0, result.stderr
    manifests = parse(template([out]).stdout)  # renders only if Helm's digest equals Python's
    config = yaml.safe_load(one(manifests, "ConfigMap", "bastion-platform")["data"]["bastion.yaml"])
    assert config["deployments"][0]["env"]["NOTE"] == "a<b & c>d é ✓"
