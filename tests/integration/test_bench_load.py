"""`bastion bench load` with tiny numbers: the scripted phase through the session's Ray Serve, its report's
shape, no errors, and one audit row per request."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_scripted_load_phase_reports_no_errors(ray_cluster: None, tmp_path: Path) -> None:
    from bastion.bench.load import markdown, run_load
    from testbed import SERVE_PORT

    reports = run_load(
        tmp_path,
        None,
        port=SERVE_PORT,
        seconds=3,
        concurrency=8,
        real_seconds=1,
        real_concurrency=1,
        warmup_s=1,
        start=False,
        route_prefix="/bench-load",
    )
    [report] = reports
    assert report.name == "scripted" and report.concurrency == 8
    assert report.requests > 8 and report.errors == 0, report.error_kinds
    assert set(report.latency_ms) == {"p50", "p95", "p99"} and 0 < report.latency_ms["p50"] <= report.latency_ms["p99"]
    assert report.ttft_ms["p50"] > 0 and report.tokens > 0
    assert report.audit_rows == report.audited_requests == report.requests + report.warmup_requests
    labels = {m.process for m in report.memory}
    assert any("ServeReplica" in label for label in labels) and any("raylet" in label for label in labels)
    assert all(m.warm_mb > 0 and m.end_mb > 0 for m in report.memory)
    table = markdown(reports)
    assert "| scripted | 8 |" in table and "RSS after warm-up" in table
    assert report.as_dict()["max_growth_pct"] == round(report.max_growth_pct, 2)
