"""A multi-node Ray cluster on this machine: profiles land on their GPU class's nodes, an unplaceable profile
fails with the placement message, and the Serve request router keeps sessions on one replica and fails over.

The cluster runs in a child process (tests/integration/placement_scenario.py): this test session has its own
`ray.init` from other tests, and a process can join one cluster only. The scenario runs once per module and
reports what it saw as JSON; each test below checks one claim.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration
SCENARIO = Path(__file__).with_name("placement_scenario.py")
MARK = "PLACEMENT_RESULT "
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def scenario() -> dict[str, Any]:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)  # the child starts its own cluster, never joins the session's
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(SCENARIO)], capture_output=True, text=True, timeout=TIMEOUT_S, env=env, check=False
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    assert lines, f"no result from the scenario (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(lines[-1][len(MARK) :])
    assert result["ok"], result.get("error")
    result["t_wall_s"] = round(time.monotonic() - started, 1)
    print(f"placement scenario: {result['t_wall_s']} s (cluster {result['t_cluster_s']} s)")
    return result


def test_fast_agentic_lands_only_on_the_rtx3090_nodes(scenario: dict[str, Any]) -> None:
    rtx = set(scenario["nodes"]["rtx3090"])
    seen = {r["node_id"] for r in scenario["fast"]}
    assert seen == rtx  # two replicas, one per 3090 node (each node holds one card)
    assert len({r["replica"] for r in scenario["fast"]}) == 2
    assert set(scenario["planned"]["qwen3.6-27b@fast-agentic"]) == rtx  # the check's plan agrees with Ray


def test_deep_context_lands_only_on_the_h100_node(scenario: dict[str, Any]) -> None:
    assert {r["node_id"] for r in scenario["deep"]} == {scenario["nodes"]["h100"]}
    assert scenario["planned"]["qwen3.6-27b@deep-context"] == [scenario["nodes"]["h100"]]
    assert scenario["nodes"]["head"] not in {r["node_id"] for r in scenario["fast"] + scenario["deep"]}


def test_unplaceable_profile_fails_with_the_message(scenario: dict[str, Any]) -> None:
    message = scenario["check_error"]
    assert message is not None
    assert (
        "qwen3.6-27b@deep-context needs 1 × gpu_l40s (1 per replica × 1 replica); the cluster has 0 — "
        "add a node with --resources '{\"gpu_l40s\": 1}'"
    ) in message


def test_watchdog_fails_instead_of_deploying_forever(scenario: dict[str, Any]) -> None:
    message = scenario["watchdog_error"]
    assert message is not None
    assert "cannot be placed on this Ray cluster" in message
    assert "needs 1 × gpu_l40s (1 per replica × 1 replica); the cluster has 0" in message
    assert scenario["t_watchdog_s"] < 20  # Serve alone would say "deploying" with no end


def test_session_affinity_through_the_serve_router(scenario: dict[str, Any]) -> None:
    for session, replicas in scenario["sessions"].items():
        assert len(set(replicas)) == 1, f"session {session} moved between replicas: {replicas}"
    assert len(set(scenario["conversation"])) == 1  # no session id: the conversation prefix keeps it together


def test_gateway_session_id_sticks_and_names_the_replica(scenario: dict[str, Any]) -> None:
    live = set(scenario["sessions"]["s1"]) | set(scenario["sessions"]["s2"]) | {r["replica"] for r in scenario["fast"]}
    for session, replicas in scenario["client_sessions"].items():
        assert len(replicas) == 4 and all(replicas), (session, replicas)  # 3 answers + 1 stream notice
        assert len(set(replicas)) == 1, f"session {session} moved between replicas: {replicas}"
        assert replicas[0] in live


def test_failover_when_the_sessions_replica_is_gone(scenario: dict[str, Any]) -> None:
    failover = scenario["failover"]
    after = failover["after"]
    assert scenario["t_kill_s"] < 20, "the killed replica never went away"
    assert len(after) == 6, failover
    assert failover["victim"] not in after
    assert len(set(after)) == 1  # re-bound to the survivor, and sticky there
    assert len(failover["errors"]) <= 1, failover  # at most the one call that met the dead actor


def test_scenario_is_quick_and_cleans_up(scenario: dict[str, Any]) -> None:
    assert scenario["t_total_s"] < 150
    assert scenario["t_shutdown_s"] < 30
