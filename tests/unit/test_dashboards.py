"""Every metric a Grafana dashboard queries exists: Bastion's names in the gateway's and replica's `/metrics`
output (rendered after one synthetic request), vLLM's names in the vLLM metric definitions the replica exports."""

from __future__ import annotations

import importlib.util
import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bastion.engine.engine_args import EngineSpec
from bastion.engine.replica import EngineReplica
from bastion.records import RequestRecord, SpeculationStats
from bastion.telemetry.metrics import GatewayMetrics

pytestmark = pytest.mark.unit
DASHBOARDS = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")


class _Audit:
    queue_depth = 3
    spool_bytes = 0


def record(**kwargs) -> RequestRecord:
    base = {
        "request_id": "r1",
        "tenant_id": "t1",
        "key_id": "k1",
        "endpoint": "chat",
        "model": "m1",
        "profile": "fast-agentic",
        "upstream": "engine-m1--fast-agentic",
        "routing_reason": "default",
        "status": 200,
        "error_code": None,
        "stream": True,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "started_at": datetime.now(UTC),
        "latency_ms": 120.0,
        "ttft_ms": 20.0,
        "speculation": SpeculationStats(drafts=4, draft_tokens=12, accepted_tokens=9),
    }
    return RequestRecord(**{**base, **kwargs})


def sample_names(text: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def exposed_names() -> set[str]:
    metrics = GatewayMetrics(max_tenant_labels=5)
    metrics.watch_in_flight(lambda: {"engine-m1--fast-agentic": 1})
    metrics.watch_audit(_Audit())
    metrics.record(record())
    metrics.record(record(status=429, error_code="requests_per_minute", stream=False, completion_tokens=0))
    replica = EngineReplica(EngineSpec("m1", "fast-agentic", "/nonexistent", "m1", 2048))
    return sample_names(metrics.render().decode()) | sample_names(replica.metrics())


def vllm_names() -> set[str]:
    """Metric names vLLM's Prometheus logger defines (it runs in each replica process)."""
    spec = importlib.util.find_spec("vllm")  # located, not imported (slow)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vLLM is not installed here")
    root = Path(next(iter(spec.submodule_search_locations))) / "v1"
    found: set[str] = set()
    for path in (root / "metrics" / "loggers.py", root / "spec_decode" / "metrics.py"):
        found |= set(re.findall(r'"(vllm:[a-z0-9_]+)"', path.read_text()))
    return found


def queries(board: dict) -> list[str]:
    out = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            out.append(var["query"]["query"] if isinstance(var["query"], dict) else var["query"])
    return out


def metric_names(expr: str) -> set[str]:
    return {n for n in NAME.findall(expr) if n.startswith(("bastion_", "vllm:"))}


def base(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


@pytest.mark.parametrize("path", sorted(DASHBOARDS.glob("*.json")), ids=lambda p: p.name)
def test_every_dashboard_metric_exists(path: Path) -> None:
    board = json.loads(path.read_text())
    assert board["templating"]["list"][0]["type"] == "datasource"
    exposed, engine = exposed_names(), vllm_names()
    used = {n for expr in queries(board) for n in metric_names(expr)}
    assert used
    missing = sorted(n for n in used if (n not in exposed if n.startswith("bastion_") else base(n) not in engine))
    assert not missing, f"{path.name} queries metrics nothing exports: {missing}"
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_the_four_dashboards_are_there() -> None:
    names = {p.name for p in DASHBOARDS.glob("*.json")}
    assert names == {"overview.json", "tenants.json", "speculation.json", "audit.json"}
