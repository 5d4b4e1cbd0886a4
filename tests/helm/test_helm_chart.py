"""The chart rendered by a real `helm`: lint, Kubernetes schemas, the RayService field by field, security."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_support import (
    CHART,
    KUBERNETES_VALIDATE,
    MIXED_POOL,
    NAMESPACE,
    Manifest,
    chart_values,
    find,
    one,
    parse,
    run_helm,
    template,
)

from bastion.config import PlatformConfig, Settings, load_config
from bastion.serve.helm_values import CLUSTER_CONFIG_PATH, SERVE_HOST, cluster_platform, read_platform_file
from bastion.serve.options import serve_config

pytestmark = pytest.mark.integration

Render = Callable[..., list[Manifest]]
# Custom resources kubernetes-validate has no schema for; their fields are checked below instead.
CRD_KINDS = {"RayService", "ServiceMonitor"}


def _diff(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Every difference between two parsed documents, with its key path (numbers compare by value)."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        out = [f"{path}.{k}: missing" for k in expected.keys() - actual.keys()]
        out += [f"{path}.{k}: unexpected" for k in actual.keys() - expected.keys()]
        for k in expected.keys() & actual.keys():
            out += _diff(expected[k], actual[k], f"{path}.{k}")
        return out
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return [f"{path}: {len(expected)} items expected, {len(actual)} rendered"]
        return [d for i, (e, a) in enumerate(zip(expected, actual, strict=True)) for d in _diff(e, a, f"{path}[{i}]")]
    if isinstance(expected, bool) or isinstance(actual, bool):
        return [] if expected is actual else [f"{path}: {expected!r} expected, {actual!r} rendered"]
    return [] if expected == actual else [f"{path}: {expected!r} expected, {actual!r} rendered"]


def _rayservice(manifests: list[Manifest]) -> Manifest:
    return one(manifests, "RayService")


def _pod_specs(manifests: list[Manifest]) -> dict[str, dict[str, Any]]:
    """Every pod spec of the release: Deployments, Jobs, CronJobs and the RayService's head and worker groups."""
    specs = {}
    for m in manifests:
        if m["kind"] in ("Deployment", "Job"):
            specs[f"{m['kind']}/{m['metadata']['name']}"] = m["spec"]["template"]["spec"]
        elif m["kind"] == "CronJob":
            specs[f"CronJob/{m['metadata']['name']}"] = m["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    cluster = _rayservice(manifests)["spec"]["rayClusterConfig"]
    specs["ray/head"] = cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster["workerGroupSpecs"]:
        specs[f"ray/{group['groupName']}"] = group["template"]["spec"]
    return specs


# --- helm lint and the Kubernetes schemas --------------------------------------------------------------


def test_helm_lint_strict_is_clean(mixed_values: Path, full_values: Path) -> None:
    for values in ([], [mixed_values], [mixed_values, full_values]):
        result = run_helm("lint", "--strict", str(CHART), values=values)
        assert "0 chart(s) failed" in result.stdout
        assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


@pytest.mark.parametrize("kube_version", ["1.30.0", "1.35.0"])
@pytest.mark.parametrize("variant", ["default", "mixed-pool", "mixed-pool+everything-on"])
def test_rendered_manifests_validate(
    variant: str, kube_version: str, mixed_values: Path, full_values: Path, tmp_path: Path
) -> None:
    values = {"default": [], "mixed-pool": [mixed_values], "mixed-pool+everything-on": [mixed_values, full_values]}
    text = template(values[variant], "--kube-version", kube_version).stdout
    manifests = parse(text)
    files = []
    for i, manifest in enumerate(manifests):
        if manifest["kind"] in CRD_KINDS:
            continue
        file = tmp_path / f"{i:02d}-{manifest['kind']}.yaml"
        file.write_text(yaml.safe_dump(manifest))
        files.append(str(file))
    assert len(files) >= 12
    kinds = {m["kind"] for m in manifests}
    assert {"Deployment", "Service", "ConfigMap", "Job", "NetworkPolicy", "PodDisruptionBudget"} <= kinds
    result = subprocess.run(
        [str(KUBERNETES_VALIDATE), "--strict", "--quiet", "-k", kube_version, *files],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ERROR" not in result.stdout


def test_only_crd_kinds_are_left_to_python_checks(render: Render, mixed_values: Path, full_values: Path) -> None:
    kinds = {m["kind"] for m in render(mixed_values, full_values)}
    assert kinds & CRD_KINDS == CRD_KINDS
    assert {m["apiVersion"] for m in render(mixed_values, full_values) if m["kind"] in CRD_KINDS} == {
        "ray.io/v1",
        "monitoring.coreos.com/v1",
    }


# --- the values schema -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"controlPlane": {"replica": 3}}, "/controlPlane"),
        ({"netwrokPolicy": {"enabled": False}}, "additional properties 'netwrokPolicy'"),
        ({"platform": {"gatway": {"port": 8000}}}, "/platform"),
        ({"secrets": {"databaseUrl": {"existingSecret": "x", "key": "k", "value": "", "vaule": "y"}}}, "databaseUrl"),
        ({"networkPolicy": {"database": {"port": 5432, "to": [{"ipBlok": {"cidr": "10.0.0.0/8"}}]}}}, "ipBlok"),
        ({"ray": {"upgradeStrategy": "Rolling"}}, "/ray/upgradeStrategy"),
    ],
)
def test_misspelled_or_wrong_values_are_rejected(values: dict[str, Any], where: str, tmp_path: Path) -> None:
    file = tmp_path / "bad.yaml"
    file.write_text(yaml.safe_dump(values))
    result = template([file], check=False)
    assert result.returncode != 0
    assert "schema" in result.stderr and where in result.stderr, result.stderr


def test_misspelled_worker_group_key_is_rejected(mixed_values: Path, tmp_path: Path) -> None:
    groups = yaml.safe_load(mixed_values.read_text())["workerGroups"]
    groups[0]["gpusPerPods"] = groups[0].pop("gpusPerPod")
    file = tmp_path / "bad.yaml"
    file.write_text(yaml.safe_dump({"workerGroups": groups}))
    result = template([mixed_values, file], check=False)
    assert result.returncode != 0 and "gpusPerPods" in result.stderr, result.stderr


def test_serve_config_out_of_step_with_platform_fails(mixed_values: Path, tmp_path: Path) -> None:
    """A hand-edited platform without regenerating serveConfig is caught at render time."""
    values = yaml.safe_load(mixed_values.read_text())
    platform = values["platform"]
    platform["deployments"] = platform["deployments"][:1]
    file = tmp_path / "drift.yaml"
    file.write_text(yaml.safe_dump({"platform": platform}))
    result = template([mixed_values, file], check=False)
    assert result.returncode != 0 and "regenerate" in result.stderr, result.stderr


def test_deployment_on_a_class_without_worker_group_fails(mixed_values: Path, tmp_path: Path) -> None:
    groups = yaml.safe_load(mixed_values.read_text())["workerGroups"]
    file = tmp_path / "groups.yaml"
    file.write_text(yaml.safe_dump({"workerGroups": [g for g in groups if g["gpuClass"] != "h100"]}))
    result = template([mixed_values, file], check=False)
    assert result.returncode != 0 and 'GPU class "h100"' in result.stderr, result.stderr


# --- the RayService, field by field ----------------------------------------------------------------------


def test_worker_group_per_gpu_class(render: Render, mixed_values: Path) -> None:
    platform = PlatformConfig.model_validate(cluster_platform(read_platform_file(MIXED_POOL)))
    cluster = _rayservice(render(mixed_values))["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"gpu-rtx3090", "gpu-h100"}
    expected = {"gpu-rtx3090": ("rtx3090", "gpu_rtx3090", 2), "gpu-h100": ("h100", "gpu_h100", 1)}
    for name, (gpu_class, resource, pods) in expected.items():
        group = groups[name]
        assert platform.gpu_pool.classes[gpu_class].resource == resource
        assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (pods, pods, pods)
        # rayStartParams.resources: a quoted JSON string, as `ray start --resources` takes it.
        raw = group["rayStartParams"]["resources"]
        assert raw.startswith('"') and raw.endswith('"'), raw
        assert json.loads(raw[1:-1].replace('\\"', '"')) == {resource: 1}
        spec = group["template"]["spec"]
        assert spec["nodeSelector"] == {"bastion.io/gpu-class": gpu_class}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        container = spec["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
        assert {"containerPort": 8000, "name": "serve"} in container["ports"]
        labels = group["template"]["metadata"]["labels"]
        assert labels["bastion.io/gpu-class"] == gpu_class
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == SERVE_HOST
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert cluster["rayVersion"] == yaml.safe_load((CHART / "values.yaml").read_text())["ray"]["version"]


def test_worker_group_edits_reach_the_rayservice(render: Render, mixed_values: Path, tmp_path: Path) -> None:
    groups = yaml.safe_load(mixed_values.read_text())["workerGroups"]
    groups[1].update(
        gpusPerPod=2,
        nodeSelector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        tolerations=[{"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}],
    )
    file = tmp_path / "groups.yaml"
    file.write_text(yaml.safe_dump({"workerGroups": groups}))
    group = _rayservice(parse(template([mixed_values, file]).stdout))["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]
    spec = group["template"]["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert spec["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}]
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert json.loads(group["rayStartParams"]["resources"][1:-1].replace('\\"', '"')) == {"gpu_h100": 2}


def test_ray_pods_run_serve_throughput_optimized_behind_haproxy(
    render: Render, mixed_values: Path, tmp_path: Path
) -> None:
    """The mode the deployed-path benchmark measured (docs/benchmarks.md): every Ray container gets it, so the
    controller, the proxies and every replica agree; both can be switched off."""
    wanted = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}

    def serve_env(manifests: list[Manifest]) -> dict[str, dict[str, str]]:
        return {
            name: {e["name"]: e["value"] for e in spec["containers"][0]["env"] if e["name"].startswith("RAY_SERVE_")}
            for name, spec in _pod_specs(manifests).items()
            if name.startswith("ray/")
        }

    assert all(env == wanted for env in serve_env(render(mixed_values)).values())
    off = tmp_path / "off.yaml"
    off.write_text(yaml.safe_dump({"ray": {"throughputOptimized": False, "serveIngress": "proxy"}}))
    assert all(env == {} for env in serve_env(parse(template([mixed_values, off]).stdout)).values())


@pytest.mark.parametrize("variant", ["default", "mixed-pool"])
def test_serve_config_v2_is_serve_config_of_the_mounted_platform_file(
    variant: str, render: Render, mixed_values: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """serveConfigV2 equals serve_config() of the platform file the pods read from the ConfigMap."""
    manifests = render(*([mixed_values] if variant == "mixed-pool" else []))
    mounted = tmp_path / "bastion.yaml"
    mounted.write_text(one(manifests, "ConfigMap", "bastion-platform")["data"]["bastion.yaml"])
    # As in the pods: the URLs come from the Secret through the environment.
    monkeypatch.setenv("BASTION_DATABASE_URL", "postgresql+asyncpg://u:p@db:5432/bastion")
    config = load_config(mounted, Settings())
    expected = serve_config(config, CLUSTER_CONFIG_PATH, host=SERVE_HOST)
    rendered = yaml.safe_load(_rayservice(manifests)["spec"]["serveConfigV2"])
    assert _diff(expected, rendered) == []
    if variant == "mixed-pool":
        source = PlatformConfig.model_validate(cluster_platform(read_platform_file(MIXED_POOL)))
        assert _diff(serve_config(source, CLUSTER_CONFIG_PATH, host=SERVE_HOST), rendered) == []
        deployments = {d["name"]: d for d in rendered["applications"][0]["deployments"]}
        fast = deployments["engine-qwen3_6-27b--fast-agentic"]
        assert fast["ray_actor_options"]["resources"] == {"gpu_rtx3090": 1}
        assert fast["num_replicas"] == 2
        assert deployments["engine-qwen3_6-27b--deep-context"]["ray_actor_options"]["resources"] == {"gpu_h100": 1}


def test_the_diff_helper_reports_a_changed_field() -> None:
    assert _diff({"a": {"b": [1, 2.0]}}, {"a": {"b": [1, 2]}}) == []
    assert _diff({"a": {"b": [1, 2]}}, {"a": {"b": [1, 3]}}) == [".a.b[1]: 2 expected, 3 rendered"]
    assert _diff({"a": True}, {"a": 1}) == [".a: True expected, 1 rendered"]


def test_rayservice_upgrade_strategy_and_config_mount(render: Render) -> None:
    manifests = render()
    spec = _rayservice(manifests)["spec"]
    assert spec["upgradeStrategy"] == {"type": "NewCluster"}
    head = spec["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m for m in head["containers"][0]["volumeMounts"]}
    assert mounts["platform"]["mountPath"] == CLUSTER_CONFIG_PATH
    volumes = {v["name"]: v for v in head["volumes"]}
    assert volumes["platform"]["configMap"]["name"] == "bastion-platform"
    assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "bastion-models", "readOnly": True}


# --- control plane, migrations, secrets --------------------------------------------------------------------


def test_migration_job_is_a_pre_install_and_pre_upgrade_hook(render: Render) -> None:
    job = one(render(), "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["bastion", "db", "upgrade", "--config", CLUSTER_CONFIG_PATH]
    # Everything the hook uses exists before it: hook objects with a lower weight.
    for kind in ("ConfigMap", "ServiceAccount"):
        hook = one(render(), kind, "bastion-migrate")
        assert hook["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
        assert int(hook["metadata"]["annotations"]["helm.sh/hook-weight"]) < 0


def test_audit_retention_cronjob_runs_the_signed_retention(render: Render) -> None:
    cron = one(render(), "CronJob", "bastion-retention")
    assert cron["spec"]["schedule"] == "17 3 * * *" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["bastion", "audit", "retention", "--config", CLUSTER_CONFIG_PATH]
    assert [e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"] if "valueFrom" in e] == ["database-url"]
    secret_files = [
        i["path"]
        for s in next(v for v in pod["volumes"] if v["name"] == "secrets")["projected"]["sources"]
        for i in s["secret"]["items"]
    ]
    assert secret_files == ["audit-signing-key"]  # the one key retention signs its records with


def test_secrets_default_to_existing_secret_and_generate_keys(render: Render) -> None:
    manifests = render()
    secret = one(manifests, "Secret", "bastion-secrets")
    assert set(secret["data"]) == {"api-key-pepper", "audit-signing-key", "pool-stats-token"}
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    env = {e["name"]: e for e in one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["BASTION_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "bastion-external",
        "key": "database-url",
    }
    assert env["BASTION_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "bastion-external", "key": "redis-url"}
    config = yaml.safe_load(one(manifests, "ConfigMap", "bastion-platform")["data"]["bastion.yaml"])
    assert "postgres" not in yaml.safe_dump(config) and "redis://" not in yaml.safe_dump(config)


def test_secret_values_and_existing_secrets(render: Render, mixed_values: Path, full_values: Path) -> None:
    manifests = render(mixed_values, full_values)
    secret = one(manifests, "Secret", "bastion-secrets")
    assert set(secret["data"]) == {"database-url", "audit-signing-key", "pool-stats-token"}
    hook_secret = one(manifests, "Secret", "bastion-migrate")
    assert hook_secret["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    job_env = one(manifests, "Job")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "bastion-migrate", "key": "database-url"} in [
        e["valueFrom"]["secretKeyRef"] for e in job_env if "valueFrom" in e
    ]
    head = _rayservice(manifests)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    sources = next(v for v in head["volumes"] if v["name"] == "secrets")["projected"]["sources"]
    refs = {(s["secret"]["name"], s["secret"]["items"][0]["key"], s["secret"]["items"][0]["path"]) for s in sources}
    assert refs == {
        ("site-keys", "pepper", "api-key-pepper"),
        ("bastion-secrets", "audit-signing-key", "audit-signing-key"),
        ("bastion-secrets", "pool-stats-token", "pool-stats-token"),
    }


def test_missing_secret_source_fails(tmp_path: Path) -> None:
    file = tmp_path / "nosecret.yaml"
    file.write_text(yaml.safe_dump({"secrets": {"databaseUrl": {"existingSecret": "", "key": "k", "value": ""}}}))
    result = template([file], check=False)
    assert result.returncode != 0 and "secrets.databaseUrl" in result.stderr


def test_ingress_and_service_monitor(render: Render, mixed_values: Path, full_values: Path) -> None:
    manifests = render(mixed_values, full_values)
    ingress = one(manifests, "Ingress")
    assert ingress["spec"]["rules"][0]["host"] == "console.test"
    assert ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == "bastion-control"
    monitor = one(manifests, "ServiceMonitor")
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"http", "metrics"}
    assert not find(render(), "Ingress") and not find(render(), "ServiceMonitor")


# --- security: Pod Security, NetworkPolicies, disruption budgets --------------------------------------------


@pytest.mark.parametrize("variant", ["default", "mixed-pool"])
def test_every_pod_is_restricted(variant: str, render: Render, mixed_values: Path) -> None:
    specs = _pod_specs(render(*([mixed_values] if variant == "mixed-pool" else [])))
    assert len(specs) >= 4
    for where, spec in specs.items():
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        assert not any("hostPath" in v for v in spec.get("volumes", [])), where
        for container in spec["containers"]:
            ctx = container["securityContext"]
            assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] >= 10000, where
            assert ctx["allowPrivilegeEscalation"] is False and ctx["privileged"] is False, where
            assert ctx["readOnlyRootFilesystem"] is True, where
            assert ctx["capabilities"] == {"drop": ["ALL"]}, where
            assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, where
            limits = container["resources"]["limits"]
            requests = container["resources"]["requests"]
            assert {"cpu", "memory"} <= set(limits) and {"cpu", "memory"} <= set(requests), where


def test_gpu_worker_exceptions_apply_to_gpu_workers_only(mixed_values: Path, tmp_path: Path) -> None:
    file = tmp_path / "exceptions.yaml"
    file.write_text(
        yaml.safe_dump(
            {"podSecurity": {"gpuWorkerExceptions": {"readOnlyRootFilesystem": False, "addCapabilities": ["IPC_LOCK"]}}}
        )
    )
    specs = _pod_specs(parse(template([mixed_values, file]).stdout))
    for where, spec in specs.items():
        ctx = spec["containers"][0]["securityContext"]
        if where.startswith("ray/gpu-"):
            assert ctx["readOnlyRootFilesystem"] is False and ctx["capabilities"]["add"] == ["IPC_LOCK"]
        else:
            assert ctx["readOnlyRootFilesystem"] is True and "add" not in ctx["capabilities"], where


def _policies(manifests: list[Manifest]) -> dict[str, Manifest]:
    return {p["metadata"]["name"].removeprefix("bastion-"): p["spec"] for p in find(manifests, "NetworkPolicy")}


def test_network_policies_default_deny_and_gateway_only(render: Render, mixed_values: Path) -> None:
    policies = _policies(render(mixed_values))
    deny = policies["default-deny"]
    assert deny["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in deny and "egress" not in deny
    assert deny["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "bastion"
    # Rules open to any source must be on the gateway port only.
    for name, policy in policies.items():
        for rule in policy.get("ingress", []):
            if not rule.get("from"):
                assert name == "serving" and rule["ports"] == [{"protocol": "TCP", "port": 8000}], (name, rule)
    assert policies["control"]["ingress"] == []
    assert policies["migrations"]["ingress"] == []


def test_database_egress_only_from_control_plane_serving_and_migrations(
    render: Render, mixed_values: Path, full_values: Path
) -> None:
    policies = _policies(render(mixed_values, full_values))
    with_database = {
        name
        for name, policy in policies.items()
        for rule in policy.get("egress", [])
        if {"protocol": "TCP", "port": 5432} in rule.get("ports", [])
    }
    assert with_database == {"serving", "control", "migrations", "retention"}
    database_rule = next(r for r in policies["control"]["egress"] if {"protocol": "TCP", "port": 5432} in r["ports"])
    assert database_rule["to"] == [{"ipBlock": {"cidr": "10.1.0.10/32"}}]
    gateway_rule = next(
        r for r in policies["serving"]["ingress"] if r.get("ports") == [{"protocol": "TCP", "port": 8000}]
    )
    assert gateway_rule["from"] == [{"namespaceSelector": {"matchLabels": {"bastion.io/clients": "true"}}}]
    # Keycloak only from the control plane.
    with_oidc = {
        n
        for n, p in policies.items()
        for r in p.get("egress", [])
        if {"protocol": "TCP", "port": 443} in r.get("ports", [])
    }
    assert with_oidc <= {"control"}


def test_pod_disruption_budgets(render: Render, mixed_values: Path) -> None:
    budgets = {p["metadata"]["name"]: p["spec"] for p in find(render(mixed_values), "PodDisruptionBudget")}
    assert set(budgets) == {"bastion-control", "bastion-ray-head", "bastion-gpu-rtx3090", "bastion-gpu-h100"}
    assert budgets["bastion-gpu-h100"]["selector"]["matchLabels"]["bastion.io/gpu-class"] == "h100"
    assert budgets["bastion-gpu-rtx3090"]["maxUnavailable"] == 1


def test_everything_is_namespaced_to_the_release(render: Render) -> None:
    for manifest in render():
        assert manifest["metadata"]["namespace"] == NAMESPACE, manifest["metadata"]["name"]


def test_notes_tell_how_to_create_a_tenant_and_reach_the_console(mixed_values: Path, full_values: Path) -> None:
    # `helm install --dry-run=client` renders NOTES.txt without a cluster.
    def notes(*values: Path) -> str:
        result = run_helm("install", "bastion", str(CHART), "-n", NAMESPACE, "--dry-run=client", values=list(values))
        return result.stdout.split("NOTES:", 1)[1]

    text = notes(mixed_values)
    assert 'exec -it "$CONTROL" -- bastion tenants create acme --config /etc/bastion/bastion.yaml' in text
    assert "bastion keys create acme --name first-key" in text
    assert "port-forward svc/bastion-serve-svc 8000:8000" in text
    assert "port-forward svc/bastion-control 8080:80" in text
    assert "https://console.test/" in notes(mixed_values, full_values)


def test_generated_keys_are_in_the_formats_bastion_reads(tmp_path: Path) -> None:
    """The chart generates the pepper, the audit signing key (Ed25519 PEM) and the content key (AES-256)."""
    import base64

    from bastion.audit.crypto import ContentCipher
    from bastion.audit.signing import Signer
    from bastion.tenancy.key_material import load_pepper

    source = yaml.safe_load(MIXED_POOL.read_text())
    source["audit"] = {"content_key_file": "/keys/content.key", "log_content": True}
    platform_file = tmp_path / "platform.yaml"
    platform_file.write_text(yaml.safe_dump(source))
    values = chart_values(platform_file, tmp_path / "values.yaml")
    secret = one(parse(template([values]).stdout), "Secret", "bastion-secrets")
    files = {}
    for key, data in secret["data"].items():
        files[key] = tmp_path / key
        files[key].write_bytes(base64.b64decode(data))
    assert set(files) == {"api-key-pepper", "audit-signing-key", "audit-content-key", "pool-stats-token"}
    assert len(load_pepper(files["api-key-pepper"], tmp_path)) == 64
    assert len(files["pool-stats-token"].read_text().strip()) >= 32  # bastion.pool.live_stats.MIN_TOKEN_CHARS
    assert Signer.from_file(files["audit-signing-key"]).key_id
    assert ContentCipher.from_file(files["audit-content-key"])
