"""The benchmark commands run end to end with small budgets (the figures themselves go to docs/benchmarks.md)."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from bastion.cli import app

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_bench_audit_writes_and_reports(pg_url: str) -> None:
    result = CliRunner().invoke(
        app, ["bench", "audit", "--database-url", pg_url, "--events", "500", "--batch-size", "100"]
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    assert figures["events"] == 500 and figures["database"] == "postgresql+asyncpg"
    assert figures["events_per_second"] > 0
    assert 0 < figures["enqueue_p50_us"] <= figures["enqueue_p99_us"]


def test_bench_gateway_compares_policy_with_bare_relay() -> None:
    result = CliRunner().invoke(app, ["bench", "gateway", "--requests", "40", "--seconds", "2"])
    assert result.exit_code == 0, result.output
    assert "concurrency" in result.output
    assert re.search(r"\| 16 \|", result.output)
