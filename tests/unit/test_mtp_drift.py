"""Live acceptance drift against a stored baseline."""

from __future__ import annotations

from pathlib import Path

import pytest

from bastion.engine.mtp.drift import Baseline, DriftMonitor, check_drift, read_baselines, write_baseline
from bastion.records import SpeculationStats

pytestmark = pytest.mark.unit

BASE = Baseline(acceptance_rate=0.60)


def _stats(draft: int, accepted: int) -> SpeculationStats:
    return SpeculationStats(
        drafts=draft, draft_tokens=draft, accepted_tokens=accepted, accepted_per_position=[accepted]
    )


def test_alert_only_on_a_drop_larger_than_the_margin() -> None:
    assert not check_drift("fast", _stats(1000, 550), BASE, margin=0.1).alert  # 5 points down
    status = check_drift("fast", _stats(1000, 400), BASE, margin=0.1)  # 20 points down
    assert status.alert
    assert status.drop == pytest.approx(0.2)
    assert status.live_rate == pytest.approx(0.4)
    assert not check_drift("fast", _stats(1000, 900), BASE).alert  # better than the baseline


def test_no_alert_without_enough_data_or_baseline() -> None:
    status = check_drift("fast", _stats(100, 0), BASE, min_draft_tokens=500)
    assert not status.alert
    assert not status.enough_data
    assert not check_drift("fast", _stats(5000, 0), None).alert
    assert not check_drift("fast", SpeculationStats(), BASE).alert


def test_monitor_judges_the_recent_window_not_the_lifetime_totals() -> None:
    monitor = DriftMonitor({"fast": BASE}, margin=0.1, min_draft_tokens=500, window_s=60)
    good = _stats(10_000, 6_000)  # a long healthy history
    assert not monitor.observe("fast", good, now=0).alert
    # In the next 100 s, 1000 drafts at 20% acceptance: lifetime is still 56%, the window says 20%.
    later = good + _stats(1000, 200)
    assert later.acceptance_rate > 0.5
    status = monitor.observe("fast", later, now=100)
    assert status.alert
    assert status.live_rate == pytest.approx(0.2)
    # An engine restart (counters back to zero) starts a fresh window instead of a negative delta.
    assert not monitor.observe("fast", _stats(10, 9), now=200).alert


def test_baseline_round_trip_keeps_the_manifest_valid(tmp_path: Path) -> None:
    from bastion.engine.manifest import verify_manifest, write_manifest

    (tmp_path / "config.json").write_text("{}")
    write_manifest(tmp_path)
    write_baseline(tmp_path, "fast-agentic", _stats(800, 480), source="bench acceptance k=1")
    verify_manifest(tmp_path)
    baselines = read_baselines(tmp_path)
    assert baselines["fast-agentic"].acceptance_rate == pytest.approx(0.6)
    assert baselines["fast-agentic"].draft_tokens == 800
    monitor = DriftMonitor.from_folder(tmp_path, min_draft_tokens=10)
    assert monitor.observe("fast-agentic", _stats(100, 10), now=0).alert
    with pytest.raises(ValueError):
        write_baseline(tmp_path, "x", SpeculationStats())


def _gauges(text: str) -> dict[str, dict[tuple, float]]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        f.name: {tuple(sorted(s.labels.items())): s.value for s in f.samples}
        for f in text_string_to_metric_families(text)
    }


def _replica(folder: Path, profile: str = "fast-agentic", speculative: bool = True):
    from bastion.engine.engine_args import EngineSpec
    from bastion.engine.replica import EngineReplica

    drift = {"margin": 0.1, "min_draft_tokens": 500, "window_s": 60.0}
    spec = EngineSpec("m", profile, str(folder), "m", 2048, speculative=speculative, drift=drift)
    return EngineReplica(spec)


def test_replica_exports_live_baseline_and_alert_per_profile(tmp_path: Path) -> None:
    """The engine replica's scrape text carries the verdict: quiet while healthy, 1 once acceptance drops."""
    write_baseline(tmp_path, "fast-agentic", _stats(1000, 600))
    replica = _replica(tmp_path)
    key = (("model", "m"), ("profile", "fast-agentic"))
    healthy = _gauges(replica.drift_metrics(_stats(2000, 1180)))
    assert healthy["bastion_mtp_acceptance_baseline"][key] == pytest.approx(0.6)
    assert healthy["bastion_mtp_acceptance_live"][key] == pytest.approx(0.59)
    assert healthy["bastion_mtp_acceptance_drift_alert"][key] == 0
    dropped = _gauges(replica.drift_metrics(_stats(2000, 1180) + _stats(1000, 300)))  # window: 30 %
    assert dropped["bastion_mtp_acceptance_live"][key] == pytest.approx(0.3)
    assert dropped["bastion_mtp_acceptance_drift_alert"][key] == 1
    assert dropped["bastion_mtp_acceptance_live_draft_tokens"][key] == 1000


def test_replica_without_baseline_exports_live_only_and_no_alert(tmp_path: Path) -> None:
    replica = _replica(tmp_path)
    gauges = _gauges(replica.drift_metrics(_stats(5000, 100)))
    key = (("model", "m"), ("profile", "fast-agentic"))
    assert gauges["bastion_mtp_acceptance_live"][key] == pytest.approx(0.02)
    assert gauges["bastion_mtp_acceptance_drift_alert"][key] == 0
    assert key not in gauges.get("bastion_mtp_acceptance_baseline", {})
    assert _replica(tmp_path, "deep-context", speculative=False)._drift_metrics() == ""


def test_engine_spec_carries_the_configured_margin(tmp_path: Path) -> None:
    from bastion.bench.doubles import platform_config
    from bastion.engine.engine_args import engine_spec

    config = platform_config(str(tmp_path), "sqlite+aiosqlite:///x.db", ["m"])
    config = config.model_copy(
        update={"telemetry": config.telemetry.model_copy(update={"acceptance_drift_margin": 0.2})}
    )
    spec = engine_spec(config, config.deployments[1])
    assert spec.drift == {"margin": 0.2, "min_draft_tokens": 500, "window_s": 900.0}
