"""Live acceptance drift: is a profile's MTP acceptance now clearly below what was measured for its head?

Acceptance decides what speculation is worth; a head that stopped matching the served body (a new fine-tune, a
different traffic mix) silently costs throughput. The baseline is what `bastion bench acceptance --write-baseline`
measured, stored as JSON next to the weights (and covered by the manifest). The monitor compares the live
counters over a recent window, not since start, so a drop shows up after it happens, and stays quiet until the
window has enough drafted tokens to tell noise from drift.
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bastion.records import SpeculationStats

BASELINE_FILE = "mtp-acceptance-baseline.json"


@dataclass(frozen=True)
class Baseline:
    """Measured acceptance of one profile (method and k) on the head in this folder."""

    acceptance_rate: float
    mean_acceptance_length: float | None = None
    per_position: list[float] = field(default_factory=list)
    draft_tokens: int = 0
    measured_at: str = ""
    source: str = ""


def read_baselines(folder: Path) -> dict[str, Baseline]:
    """Baselines per profile from the model folder; {} when none was measured."""
    path = Path(folder) / BASELINE_FILE
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {name: Baseline(**row) for name, row in data.get("profiles", {}).items()}


def write_baseline(folder: Path, profile: str, stats: SpeculationStats, source: str = "") -> Baseline:
    """Store (or replace) one profile's baseline; the manifest is rewritten so the folder still verifies."""
    from bastion.engine.manifest import MANIFEST, write_manifest

    if stats.acceptance_rate is None:
        raise ValueError("cannot store a baseline without drafted tokens")
    folder = Path(folder)
    path = folder / BASELINE_FILE
    data = json.loads(path.read_text()) if path.is_file() else {"format": 1, "profiles": {}}
    baseline = Baseline(
        acceptance_rate=stats.acceptance_rate,
        mean_acceptance_length=stats.mean_acceptance_length,
        per_position=stats.per_position_rates(),
        draft_tokens=stats.draft_tokens,
        measured_at=datetime.now(UTC).isoformat(),
        source=source,
    )
    data["profiles"][profile] = asdict(baseline)
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
    if (folder / MANIFEST).is_file():
        write_manifest(folder)
    return baseline


@dataclass(frozen=True)
class DriftStatus:
    """The verdict for one profile: `alert` only with enough live data and a drop larger than the margin."""

    profile: str
    alert: bool
    enough_data: bool
    live_rate: float | None
    baseline_rate: float | None
    drop: float | None  # baseline − live, in acceptance-rate points (0..1)
    live_draft_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_drift(
    profile: str,
    live: SpeculationStats,
    baseline: Baseline | None,
    *,
    margin: float = 0.10,
    min_draft_tokens: int = 500,
) -> DriftStatus:
    """Compare live acceptance with the baseline: alert when it is lower by more than `margin` (absolute)."""
    rate = live.acceptance_rate
    enough = live.draft_tokens >= min_draft_tokens and rate is not None
    if baseline is None or rate is None:
        baseline_rate = baseline.acceptance_rate if baseline else None
        return DriftStatus(profile, False, enough, rate, baseline_rate, None, live.draft_tokens)
    drop = baseline.acceptance_rate - rate
    return DriftStatus(
        profile,
        alert=enough and drop > margin,
        enough_data=enough,
        live_rate=rate,
        baseline_rate=baseline.acceptance_rate,
        drop=drop,
        live_draft_tokens=live.draft_tokens,
    )


class DriftMonitor:
    """Feed it the replica's cumulative counters (`EngineReplica.stats()["speculation"]`) now and then;
    it judges the change over the last `window_s` seconds against each profile's baseline."""

    def __init__(
        self,
        baselines: dict[str, Baseline],
        *,
        margin: float = 0.10,
        min_draft_tokens: int = 500,
        window_s: float = 900.0,
    ) -> None:
        self.baselines = baselines
        self.margin = margin
        self.min_draft_tokens = min_draft_tokens
        self.window_s = window_s
        self._snapshots: dict[str, deque[tuple[float, SpeculationStats]]] = {}

    @classmethod
    def from_folder(cls, folder: Path, **kwargs: Any) -> DriftMonitor:
        return cls(read_baselines(folder), **kwargs)

    def observe(self, profile: str, totals: SpeculationStats, now: float | None = None) -> DriftStatus:
        """Record a cumulative snapshot; return the verdict for the window that ends now."""
        now = time.monotonic() if now is None else now
        snaps = self._snapshots.setdefault(profile, deque())
        if snaps and totals.draft_tokens < snaps[-1][1].draft_tokens:
            snaps.clear()  # counters went backwards: the engine restarted
        snaps.append((now, totals))
        # Keep the newest snapshot at least window_s old as the window's start.
        while len(snaps) > 2 and now - snaps[1][0] >= self.window_s:
            snaps.popleft()
        window = totals - snaps[0][1] if len(snaps) > 1 else totals
        return check_drift(
            profile,
            window,
            self.baselines.get(profile),
            margin=self.margin,
            min_draft_tokens=self.min_draft_tokens,
        )


def drift_exposition(status: DriftStatus, model: str) -> str:
    """Prometheus text for one profile's verdict: live (window) and baseline acceptance, and the 0/1 alert.

    Live and baseline are left out while unknown (no drafts in the window, no baseline measured); the alert is
    always there, so an alert rule can also watch for its absence."""
    labels = f'model="{model}",profile="{status.profile}"'
    out = []
    for name, value, text in (
        ("live", status.live_rate, "Draft acceptance rate over the recent window, this replica"),
        ("baseline", status.baseline_rate, "Draft acceptance rate last measured for this profile's head"),
    ):
        out.append(f"# HELP bastion_mtp_acceptance_{name} {text}\n# TYPE bastion_mtp_acceptance_{name} gauge\n")
        if value is not None:
            out.append(f"bastion_mtp_acceptance_{name}{{{labels}}} {value:.6g}\n")
    out.append(
        "# HELP bastion_mtp_acceptance_drift_alert 1 when live acceptance is below the baseline by more than "
        "the margin (with enough drafted tokens)\n# TYPE bastion_mtp_acceptance_drift_alert gauge\n"
        f"bastion_mtp_acceptance_drift_alert{{{labels}}} {int(status.alert)}\n"
        "# HELP bastion_mtp_acceptance_live_draft_tokens Draft tokens in the live window\n"
        "# TYPE bastion_mtp_acceptance_live_draft_tokens gauge\n"
        f"bastion_mtp_acceptance_live_draft_tokens{{{labels}}} {status.live_draft_tokens}\n"
    )
    return "".join(out)
