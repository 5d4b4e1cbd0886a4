"""The Serve config export: what `bastion serve --export-serve-config` prints is what `bastion serve` deploys."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from bastion.cli import app
from bastion.config import Settings, load_config
from bastion.serve.options import deployment_name, deployment_options, serve_config

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "deploy/local/bastion.yaml"


def test_export_matches_serve_config() -> None:
    result = CliRunner().invoke(app, ["serve", "--config", str(DEFAULT), "--export-serve-config"])
    assert result.exit_code == 0, result.output
    exported = yaml.safe_load(result.output)
    assert exported == serve_config(load_config(DEFAULT, Settings()), str(DEFAULT))
    (application,) = exported["applications"]
    assert application["import_path"] == "bastion.serve.app:build_app"
    assert application["args"] == {"config": str(DEFAULT)}
    by_name = {d["name"]: d for d in application["deployments"]}
    fast = by_name["engine-smollm2-135m--fast-agentic"]
    deep = by_name["engine-smollm2-135m--deep-context"]
    # the two CPU replicas are pinned to different cores
    assert fast["ray_actor_options"]["runtime_env"]["env_vars"]["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert deep["ray_actor_options"]["runtime_env"]["env_vars"]["VLLM_CPU_OMP_THREADS_BIND"] == "auto"
    assert fast["num_replicas"] == 1 and fast["max_ongoing_requests"] == 16
    assert exported["http_options"]["host"] == "127.0.0.1"


def test_gpu_class_becomes_custom_resource_and_autoscaling(tmp_path: Path) -> None:
    data = yaml.safe_load(DEFAULT.read_text())
    data["gpu_pool"] = {"classes": {"rtx3090": {"vram_gb": 24, "bandwidth_gbps": 936, "resource": "gpu_rtx3090"}}}
    data["deployments"][1].update(
        {"gpu_class": "rtx3090", "gpus_per_replica": 1, "min_replicas": 1, "max_replicas": 4, "replicas": 2}
    )
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    config = load_config(path, Settings())
    options = deployment_options(config, config.deployments[1])
    assert options["ray_actor_options"]["num_gpus"] == 1
    assert options["ray_actor_options"]["resources"] == {"gpu_rtx3090": 1}
    assert options["autoscaling_config"]["min_replicas"] == 1
    assert options["autoscaling_config"]["max_replicas"] == 4
    assert options["autoscaling_config"]["initial_replicas"] == 2
    assert "num_replicas" not in options


def test_deployment_names_are_serve_safe() -> None:
    assert deployment_name("qwen3.6-27b", "fast-agentic") == "engine-qwen3_6-27b--fast-agentic"
