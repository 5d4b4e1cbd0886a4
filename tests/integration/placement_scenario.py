"""Multi-node placement and replica-routing scenario, run in its own process by test_placement_cluster.py.

Why a separate process: the test session already holds its own `ray.init`, and one process can be connected to
one Ray cluster only. This script starts a `ray.cluster_utils.Cluster` on loopback — a head without GPU
resources, two "RTX 3090" nodes and one "H100" node (custom resources standing for GPU classes) — deploys
lightweight stand-ins (no vLLM) with exactly the options `bastion.serve.options.deployment_options` gives for
deploy/examples/mixed-pool.yaml, through the same deploy path as `bastion serve` (placement check, deploy,
watchdog), and prints one JSON object with what it saw. The test asserts on that object.

Run by hand: `.venv/bin/python tests/integration/placement_scenario.py` (prints the JSON on the last line).
"""

from __future__ import annotations

import os

# Before Ray is imported, and inherited by every Ray process this script starts (ENVIRONMENT.md: loopback only).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_worker_niceness", "0")

import asyncio
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
MIXED = ROOT / "deploy/examples/mixed-pool.yaml"
APP = "bastion-placement"
MARK = "PLACEMENT_RESULT "


def actor_alive(name: str, namespace: str) -> bool:
    """Whether the named actor is still registered: a dead actor that may not restart loses its name."""
    import ray

    try:
        ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    return True


def stand_in_class() -> Any:
    from ray import serve

    @serve.deployment
    class StandIn:
        """Where am I: the node and replica that served the call (what the test checks), nothing else."""

        def where(self, *args: Any) -> dict[str, str]:
            import ray

            ctx = serve.get_replica_context()
            return {"node_id": ray.get_runtime_context().get_node_id(), "replica": ctx.replica_id.unique_id}

        # The engine deployment's call shape, so the gateway's RayEngineClient can drive a stand-in.
        def complete(self, endpoint: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], str]:
            return 200, {"choices": []}, serve.get_replica_context().replica_id.unique_id

        async def stream(self, endpoint: str, body: dict[str, Any]) -> Any:
            from bastion.gateway.engine_client import replica_notice

            yield replica_notice(serve.get_replica_context().replica_id.unique_id)
            yield "data: [DONE]\n\n"

    return StandIn


def ingress_class() -> Any:
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Ingress:
        """Holds the stand-ins the way GatewayIngress holds the engines (Serve needs one ingress per app)."""

        def __init__(self, *engines: Any) -> None:
            self.engines = engines

        def ping(self) -> str:
            return "ok"

    return Ingress


def build(config: Any) -> Any:
    from bastion.serve.options import deployment_options

    stand_in = stand_in_class()
    bound = [stand_in.options(**deployment_options(config, dep)).bind() for dep in config.deployments]
    return ingress_class().bind(*bound)


async def sessions_through_the_gateway_client(handle: Any, config: Any) -> dict[str, list[str]]:
    """X-Session-Id as the gateway hands it on: RayEngineClient → handle options → the router's affinity; the
    replica each answer names (non-streaming and the stream's replica notice) is what the gateway records."""
    from bastion.gateway.engine_client import UpstreamInfo, notice_replica
    from bastion.serve.ray_engine_client import RayEngineClient

    name = handle.deployment_name
    client = RayEngineClient([(UpstreamInfo(name, "qwen3.6-27b", "fast-agentic", 4096, 8), handle)])
    body = {"model": "qwen3.6-27b", "messages": [{"role": "user", "content": "hi"}]}
    seen: dict[str, list[str]] = {}
    for session in ("c1", "c2", "c3", "c4"):
        replicas = [(await client.complete(name, "chat", dict(body), session_id=session)).replica for _ in range(3)]
        async for event in client.stream(name, "chat", dict(body), session_id=session):
            if (replica := notice_replica(event)) is not None:
                replicas.append(replica)
        seen[session] = [r or "" for r in replicas]
    return seen


def unplaceable_config(tmp: Path) -> Any:
    """mixed-pool.yaml with deep-context moved to an L40S class that no node has."""
    from bastion.config import Settings, load_config

    data = yaml.safe_load(MIXED.read_text())
    data["gpu_pool"]["classes"]["l40s"] = {"vram_gb": 48, "bandwidth_gbps": 864, "resource": "gpu_l40s"}
    data["deployments"] = [d for d in data["deployments"] if d["profile"] == "deep-context"]
    data["deployments"][0]["gpu_class"] = "l40s"
    path = tmp / "unplaceable.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path, Settings())


def run(out: dict[str, Any], tmp: Path) -> None:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from bastion.config import Settings, load_config
    from bastion.pool.placement import PlacementError
    from bastion.serve import runner
    from bastion.serve.options import deployment_name

    started = time.monotonic()
    node = {"num_cpus": 2, "object_store_memory": 80 * 2**20}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False, "object_store_memory": 80 * 2**20},
    )
    try:
        rtx = [cluster.add_node(num_gpus=1, resources={"gpu_rtx3090": 1}, **node) for _ in range(2)]
        h100 = cluster.add_node(num_gpus=1, resources={"gpu_h100": 1}, **node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace="placement-scenario")
        out["nodes"] = {
            "head": cluster.head_node.node_id,
            "rtx3090": [n.node_id for n in rtx],
            "h100": h100.node_id,
        }
        out["t_cluster_s"] = round(time.monotonic() - started, 1)
        serve.start(proxy_location="Disabled")

        # 1. The mixed pool: the placement check passes and the replicas land on their classes.
        config = load_config(MIXED, Settings())
        report = runner.check_placement(config)
        out["planned"] = report.assignment
        t0 = time.monotonic()
        runner.deploy_app(build(config), config, APP, route_prefix=None, timeout_s=60)
        out["t_deploy_s"] = round(time.monotonic() - t0, 1)
        fast = serve.get_deployment_handle(deployment_name("qwen3.6-27b", "fast-agentic"), APP)
        deep = serve.get_deployment_handle(deployment_name("qwen3.6-27b", "deep-context"), APP)
        out["fast"] = [fast.where.remote().result(timeout_s=30) for _ in range(24)]
        out["deep"] = [deep.where.remote().result(timeout_s=30) for _ in range(6)]

        # 2. Session affinity through the Serve router: same session id (or the same conversation), same replica.
        sessions = {
            f"s{i}": [fast.options(session_id=f"s{i}").where.remote().result(timeout_s=30) for _ in range(5)]
            for i in range(6)
        }
        out["sessions"] = {k: [r["replica"] for r in v] for k, v in sessions.items()}
        chat = {"model": "qwen3.6-27b", "messages": [{"role": "user", "content": "hello"}]}
        turns = []
        for i in range(5):
            body = {**chat, "messages": [*chat["messages"], *([{"role": "assistant", "content": "x"}] * i)]}
            turns.append(fast.where.remote("chat", body).result(timeout_s=30)["replica"])
        out["conversation"] = turns
        out["client_sessions"] = asyncio.run(sessions_through_the_gateway_client(fast, config))

        # 3. Failover: kill the replica a session is bound to; the session moves to the survivor and stays there.
        victim = out["sessions"]["s0"][0]
        actor = next(
            a
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::") and a["name"].endswith("#" + victim)
        )
        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
        # ray.kill only sends the kill: a call made before the actor is gone may still reach it (one CI run saw
        # the victim answer the first call). The claim is about routing after the death, so wait for the death.
        t0 = time.monotonic()
        while time.monotonic() - t0 < 20 and actor_alive(actor["name"], actor["namespace"]):
            time.sleep(0.1)
        out["t_kill_s"] = round(time.monotonic() - t0, 2)
        after, errors = [], []
        deadline = time.monotonic() + 30
        while len(after) < 6 and time.monotonic() < deadline:
            try:
                after.append(fast.options(session_id="s0").where.remote().result(timeout_s=30)["replica"])
            except Exception as exc:  # the first call may meet the dead actor before Serve drops it
                errors.append(type(exc).__name__)
                time.sleep(0.2)
        out["failover"] = {"victim": victim, "after": after, "errors": errors}

        # 4. A profile the pool cannot host: the check fails before deploying, with the message.
        bad = unplaceable_config(tmp)
        try:
            runner.check_placement(bad)
            out["check_error"] = None
        except PlacementError as exc:
            out["check_error"] = str(exc)

        # 5. The watchdog, when the check is bypassed: Serve would say "deploying" forever; we fail in seconds.
        t0 = time.monotonic()
        try:
            runner.deploy_app(build(bad), bad, APP + "-bad", route_prefix=None, timeout_s=45, check=False)
            out["watchdog_error"] = None
        except PlacementError as exc:
            out["watchdog_error"] = str(exc)
        out["t_watchdog_s"] = round(time.monotonic() - t0, 1)
        serve.delete(APP + "-bad", _blocking=False)
    finally:
        t0 = time.monotonic()
        # No serve.shutdown(): it waits out each replica's graceful-shutdown period (30 s); the whole throwaway
        # cluster goes down with its processes instead.
        ray.shutdown()
        cluster.shutdown()
        out["t_shutdown_s"] = round(time.monotonic() - t0, 1)
        out["t_total_s"] = round(time.monotonic() - started, 1)


def main() -> int:
    import tempfile

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            run(out, Path(tmp))
            out["ok"] = True
        except Exception:
            out["ok"] = False
            out["error"] = traceback.format_exc()
    print(MARK + json.dumps(out), flush=True)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
