"""Placement math: what the deployments ask Ray for against what the nodes hold, and the messages that say
what is missing; the deploy watchdog that turns Serve's silent "deploying" into an error."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from bastion.config import Settings, load_config
from bastion.pool import placement
from bastion.pool.catalog import BUILTIN_CLASSES
from bastion.pool.placement import Demand, NodeCapacity, PlacementError, check, gpus_for_weights
from bastion.serve import runner

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
MIXED = ROOT / "deploy/examples/mixed-pool.yaml"


def _ray_node(node_id: str, alive: bool = True, **resources: float) -> dict:
    return {"NodeID": node_id, "Alive": alive, "Resources": {"node:127.0.0.1": 1.0, **resources}}


def _mixed_cluster() -> list[dict]:
    return [
        _ray_node("head", CPU=1.0, memory=2e9),
        _ray_node("a3090", CPU=2.0, GPU=1.0, gpu_rtx3090=1.0),
        _ray_node("b3090", CPU=2.0, GPU=1.0, gpu_rtx3090=1.0),
        _ray_node("h100", CPU=2.0, GPU=1.0, gpu_h100=1.0),
    ]


def _mixed(tmp_path: Path, **changes: object) -> object:
    data = yaml.safe_load(MIXED.read_text())
    for index, update in changes.items():
        data["deployments"][int(index.removeprefix("d"))].update(update)
    path = tmp_path / "platform.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path, Settings())


def test_demands_come_from_the_serve_options() -> None:
    config = load_config(MIXED, Settings())
    fast, deep = runner.placement_demands(config)
    assert fast.name == "qwen3.6-27b@fast-agentic" and fast.replicas == 2
    assert fast.per_replica == {"CPU": 2.0, "GPU": 1.0, "gpu_rtx3090": 1.0}
    assert deep.per_replica == {"CPU": 2.0, "GPU": 1.0, "gpu_h100": 1.0} and deep.replicas == 1


def test_mixed_pool_fits_and_lands_on_its_class() -> None:
    config = load_config(MIXED, Settings())
    report = runner.check_placement(config, _mixed_cluster())
    assert report.ok
    assert sorted(report.assignment["qwen3.6-27b@fast-agentic"]) == ["a3090", "b3090"]
    assert report.assignment["qwen3.6-27b@deep-context"] == ["h100"]


def test_missing_class_names_resource_counts_and_fix(tmp_path: Path) -> None:
    nodes = [n for n in _mixed_cluster() if n["NodeID"] not in ("a3090", "b3090")]
    with pytest.raises(PlacementError) as err:
        runner.check_placement(load_config(MIXED, Settings()), nodes)
    message = str(err.value)
    assert (
        "qwen3.6-27b@fast-agentic needs 2 × gpu_rtx3090 (1 per replica × 2 replicas); the cluster has 0 — "
        "add a node with --resources '{\"gpu_rtx3090\": 1}'"
    ) in message
    assert "deep-context" not in message


def test_too_few_cards_counts_what_is_there() -> None:
    nodes = [n for n in _mixed_cluster() if n["NodeID"] != "b3090"]
    demands = runner.placement_demands(load_config(MIXED, Settings()))
    result = check(demands, placement.nodes_from_ray(nodes))
    assert not result.ok
    (short,) = result.shortfalls
    assert short.resource == "gpu_rtx3090"
    assert "needs 2 × gpu_rtx3090 (1 per replica × 2 replicas); the cluster has 1" in short.message


def test_dead_nodes_do_not_count() -> None:
    nodes = _mixed_cluster()
    nodes[3]["Alive"] = False
    result = check(runner.placement_demands(load_config(MIXED, Settings())), placement.nodes_from_ray(nodes))
    assert [s.resource for s in result.shortfalls] == ["gpu_h100"]


def test_replica_must_fit_on_one_node() -> None:
    """Two cards in total, one per node: a replica asking for two cards together cannot be placed."""
    demand = Demand("m@deep-context", {"CPU": 1.0, "gpu_rtx3090": 2.0}, 1, "rtx3090")
    nodes = [NodeCapacity("a", {"CPU": 4.0, "gpu_rtx3090": 1.0}), NodeCapacity("b", {"CPU": 4.0, "gpu_rtx3090": 1.0})]
    result = check([demand], nodes)
    (short,) = result.shortfalls
    assert short.placed == 0
    assert "no node has 2 × gpu_rtx3090 (the largest has 1)" in short.message
    assert "--resources '{\"gpu_rtx3090\": 2}'" in short.message


def test_deployments_sharing_a_class_are_summed() -> None:
    a = Demand("m@fast-agentic", {"CPU": 1.0, "gpu_rtx3090": 1.0}, 2)
    b = Demand("m@deep-context", {"CPU": 1.0, "gpu_rtx3090": 1.0}, 1)
    nodes = [NodeCapacity("x", {"CPU": 8.0, "gpu_rtx3090": 2.0})]
    result = check([a, b], nodes)
    (short,) = result.shortfalls
    assert short.resource == "gpu_rtx3090"
    assert short.message == (
        "the deployments need 3 × gpu_rtx3090 together (m@fast-agentic 2, m@deep-context 1); the cluster has 2 — "
        "add a node with --resources '{\"gpu_rtx3090\": 1}', or lower replicas"
    )


def test_cpu_shortfall_after_packing() -> None:
    """Totals suffice (4 CPUs) but each node has 2 free after the first replica: the third does not fit."""
    demand = Demand("m@fast-agentic", {"CPU": 1.5}, 3)
    result = check([demand], [NodeCapacity("a", {"CPU": 2.0}), NodeCapacity("b", {"CPU": 2.5})])
    (short,) = result.shortfalls
    assert short.placed == 2 and short.replicas == 3
    assert "not together on one node" in short.message


def test_zero_replicas_need_nothing() -> None:
    assert check([Demand("m@x", {"gpu_h200": 1.0}, 0)], []).ok


def test_actor_options_defaults() -> None:
    d = placement.demand_from_actor_options("m@p", {"resources": {"gpu_x": 1, "unused": 0}}, 3)
    assert d.per_replica == {"CPU": 1.0, "gpu_x": 1.0} and d.total("gpu_x") == 3


def test_tensor_parallel_degree_from_weights() -> None:
    assert gpus_for_weights(17.0, 24, 2.75) == 1
    assert gpus_for_weights(60.0, 24, 2.75) == 4  # 60 / 2 = 30 > 19.1; 60 / 4 = 15 fits
    assert gpus_for_weights(60.0, 80, 2.75) == 1
    hints = placement.tensor_parallel_hints(
        [("big@fast-agentic", "rtx3090", 1, 60.0), ("small@x", "rtx3090", 1, 10.0), ("remote@y", "h100", 1, None)],
        BUILTIN_CLASSES,
    )
    assert hints == {"big@fast-agentic": 4}


def test_tensor_parallel_hint_in_the_message() -> None:
    demand = Demand("big@fast-agentic", {"GPU": 1.0, "gpu_rtx3090": 1.0}, 2, "rtx3090")
    result = check([demand], [NodeCapacity("a", {"GPU": 1.0, "gpu_rtx3090": 1.0})], BUILTIN_CLASSES, {demand.name: 4})
    assert "the weights do not fit one RTX 3090: set gpus_per_replica: 4" in result.message()


def test_tp_hints_read_weight_files(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    with (model / "model.safetensors").open("wb") as f:
        f.truncate(3 * 2**30)  # sparse: 3 GiB of "weights" that use no disk
    data = yaml.safe_load(MIXED.read_text())
    data["models"][0]["source"] = str(model)
    data["gpu_pool"]["classes"]["rtx3090"]["vram_gb"] = 4  # 3 GiB weights, 1.25 GiB room per card → TP 4
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    config = load_config(path, Settings())
    assert runner.weights_gib(config, "qwen3.6-27b") == pytest.approx(3.0)
    assert runner.tp_hints(config) == {"qwen3.6-27b@fast-agentic": 4}


# --- the watchdog ----------------------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def _status(app_status: str, **deployments: tuple[str, str, dict]) -> SimpleNamespace:
    deps = {
        name: SimpleNamespace(status=SimpleNamespace(value=st), message=msg, replica_states=states)
        for name, (st, msg, states) in deployments.items()
    }
    app = SimpleNamespace(status=SimpleNamespace(value=app_status), message="", deployments=deps)
    return SimpleNamespace(applications={"bastion": app})


FAST = "engine-qwen3_6-27b--fast-agentic"


def test_watchdog_returns_when_running() -> None:
    clock = _Clock()
    seq = iter([_status("DEPLOYING", **{FAST: ("UPDATING", "", {"STARTING": 2})}), _status("RUNNING")])
    runner.wait_until_running("bastion", [], status=lambda: next(seq), nodes=list, clock=clock, sleep=clock.sleep)
    assert clock.now == 1.0


def test_watchdog_fails_at_once_when_no_node_can_hold_a_replica() -> None:
    """Serve would keep this replica "deploying" forever: the node with the class left after the check."""
    demand = Demand("qwen3.6-27b@fast-agentic", {"CPU": 2.0, "gpu_rtx3090": 1.0}, 2)
    nodes = [NodeCapacity("head", {"CPU": 4.0}), NodeCapacity("h100", {"CPU": 2.0, "gpu_h100": 1.0})]
    clock = _Clock()
    with pytest.raises(PlacementError) as err:
        runner.wait_until_running(
            "bastion",
            [demand],
            status=lambda: _status("DEPLOYING", **{FAST: ("UPDATING", "", {"STARTING": 2})}),
            nodes=lambda: nodes,
            clock=clock,
            sleep=clock.sleep,
        )
    assert "qwen3.6-27b@fast-agentic needs 2 × gpu_rtx3090 (1 per replica × 2 replicas); the cluster has 0" in str(
        err.value
    )
    assert clock.now == 0.0  # at once, not after the timeout


def test_watchdog_waits_for_a_placeable_replica_then_says_why() -> None:
    """A replica that fits a node but waits (busy node, slow worker start) gets the timeout, and the error
    repeats Serve's notice."""
    demand = Demand("qwen3.6-27b@fast-agentic", {"CPU": 2.0, "gpu_rtx3090": 1.0}, 1)
    nodes = [NodeCapacity("a", {"CPU": 2.0, "gpu_rtx3090": 1.0})]
    said = "has 1 replicas that have taken more than 30s to be scheduled. Resources required: gpu_rtx3090"
    clock = _Clock()
    with pytest.raises(runner.DeploymentTimeout) as err:
        runner.wait_until_running(
            "bastion",
            [demand],
            timeout_s=90,
            status=lambda: _status("DEPLOYING", **{FAST: ("UPDATING", said, {"STARTING": 1})}),
            nodes=lambda: nodes,
            clock=clock,
            sleep=clock.sleep,
        )
    assert clock.now == 90.0
    assert f"not running after 90 s; still waiting for: {FAST} (UPDATING, replicas {{'STARTING': 1}}: {said})" in str(
        err.value
    )


def test_watchdog_times_out_loudly() -> None:
    clock = _Clock()
    with pytest.raises(runner.DeploymentTimeout, match=r"not running after 5 s; still waiting for: engine-"):
        runner.wait_until_running(
            "bastion",
            [],
            timeout_s=5,
            status=lambda: _status("DEPLOYING", **{FAST: ("UPDATING", "", {"STARTING": 1})}),
            nodes=list,
            clock=clock,
            sleep=clock.sleep,
        )
    assert clock.now == 5.0


def test_watchdog_reports_deploy_failure() -> None:
    with pytest.raises(runner.DeploymentFailed, match="constructor raised"):
        runner.wait_until_running(
            "bastion",
            [],
            status=lambda: _status("DEPLOY_FAILED", **{FAST: ("DEPLOY_FAILED", "constructor raised", {})}),
        )
