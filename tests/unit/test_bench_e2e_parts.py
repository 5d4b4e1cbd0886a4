"""The pieces of `bastion bench e2e` that need no server: vLLM's command line from the replica's engine
arguments, process groups from Ray's worker titles, the ratios, and the real phase's platform file."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from bastion.bench.e2e import ratios, real_platform_file, vllm_server_command
from bastion.bench.streams import RAY_OTHER, CpuGroups, PathTally, StreamResult, cpu_delta, ray_role

REPO = Path(__file__).resolve().parents[2]


def test_vllm_command_carries_the_replica_engine_arguments() -> None:
    kwargs = {
        "model": "/m",
        "served_model_name": ["smollm2-135m"],
        "dtype": "bfloat16",
        "max_model_len": 8192,
        "enforce_eager": True,
        "disable_log_stats": False,
        "speculative_config": {"method": "ngram", "num_speculative_tokens": 3},
        "kv_cache_dtype": None,
    }
    args = vllm_server_command(kwargs, 9999, "hermes")
    assert args[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert args[args.index("--host") + 1] == "127.0.0.1" and args[args.index("--port") + 1] == "9999"
    assert args[args.index("--model") + 1] == "/m" and args[args.index("--served-model-name") + 1] == "smollm2-135m"
    assert "--enforce-eager" in args and "--disable-log-stats" not in args and "--kv-cache-dtype" not in args
    assert json.loads(args[args.index("--speculative-config") + 1])["num_speculative_tokens"] == 3
    assert args[args.index("--tool-call-parser") + 1] == "hermes" and "--enable-auto-tool-choice" in args


def test_ray_workers_are_grouped_by_role() -> None:
    assert ray_role("ray::ProxyActor") == "serve proxy"
    assert ray_role("ray::ServeController") == "serve controller"
    assert ray_role("ray::ServeReplica:bench-e2e:gateway") == "gateway replica"
    assert ray_role("ray::ServeReplica:bench-e2e:engine-m1--deep-context") == "engine replicas"
    assert ray_role("raylet") is None and ray_role("ray::IDLE") is None


def test_cpu_groups_count_this_process_as_the_client() -> None:
    before = CpuGroups().snapshot()
    sum(i * i for i in range(300_000))
    assert cpu_delta(before, CpuGroups().snapshot())["client"] > 0


def test_a_process_that_changes_group_brings_only_its_new_cpu() -> None:
    """A Ray worker idle at the first sample and a replica at the second: its earlier CPU is not the round's."""
    before = {1: ("client", 1.0), 7: (RAY_OTHER, 30.0)}
    after = {1: ("client", 1.5), 7: ("gateway replica", 30.25), 9: ("engine replicas", 0.5)}
    assert cpu_delta(before, after) == {"client": 0.5, "gateway replica": 0.25, "engine replicas": 0.5}


def _path(rps_s: float, ttft: float, n: int = 4) -> dict:
    tally = PathTally()
    tally.add([StreamResult(True, ttft_ms=ttft, total_ms=ttft * 2, tokens=4, decode_tok_s=10.0)] * n, rps_s, {})
    return tally.summary([])


def test_ratios_against_the_reference_and_the_peer() -> None:
    level = {"paths": {"direct": _path(1.0, 10), "litellm": _path(2.0, 30), "bastion": _path(1.25, 14)}}
    r = ratios(level, "direct", "litellm")
    assert r["bastion"]["req_s_vs_direct"] == 0.8 and r["bastion"]["ttft_added_p50_ms"] == 4.0
    assert r["bastion"]["req_s_vs_litellm"] == 1.6 and r["litellm"]["ttft_added_p50_ms"] == 20.0
    assert "direct" not in r


def test_real_phase_serves_the_first_deployment_without_speculation(tmp_path: Path) -> None:
    path = real_platform_file(tmp_path, REPO / "deploy" / "local" / "bastion.yaml")
    data = yaml.safe_load(path.read_text())
    assert [d["profile"] for d in data["deployments"]] == ["deep-context"]
    assert data["deployments"][0]["env"]["VLLM_CPU_OMP_THREADS_BIND"] == "auto"
    assert data["database"]["url"].startswith("sqlite+aiosqlite:///" + str(tmp_path))
