"""Speculation statistics: per request (from vLLM's response metrics) and per replica (vLLM's own counters).

How they reconcile: vLLM counts every verification step of every request in `vllm:spec_decode_*`. A request's
`metrics.speculative_decoding` covers the steps of that request alone, so over a quiet replica the sums of
`num_spec_steps`, `num_draft_tokens` and `num_accepted_draft_tokens` over the requests equal the change in
`vllm:spec_decode_num_drafts_total`, `..._num_draft_tokens_total` and `..._num_accepted_tokens_total`.
Per-position acceptance follows from the acceptance histogram: position i accepted in every step that
accepted more than i drafts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

_COUNTERS = {
    "vllm:spec_decode_num_drafts": "drafts",
    "vllm:spec_decode_num_draft_tokens": "draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "accepted_tokens",
}
_PER_POSITION = "vllm:spec_decode_num_accepted_tokens_per_pos"


@dataclass
class SpeculationStats:
    """Drafts (verification steps), drafted and accepted tokens, and accepted tokens per draft position."""

    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def mean_acceptance_length(self) -> float | None:
        return 1 + self.accepted_tokens / self.drafts if self.drafts else None

    def per_position_rates(self) -> list[float]:
        return [n / self.drafts for n in self.accepted_per_position] if self.drafts else []

    def __add__(self, other: SpeculationStats) -> SpeculationStats:
        width = max(len(self.accepted_per_position), len(other.accepted_per_position))
        pos = [
            (self.accepted_per_position[i] if i < len(self.accepted_per_position) else 0)
            + (other.accepted_per_position[i] if i < len(other.accepted_per_position) else 0)
            for i in range(width)
        ]
        return SpeculationStats(
            self.drafts + other.drafts,
            self.draft_tokens + other.draft_tokens,
            self.accepted_tokens + other.accepted_tokens,
            pos,
        )

    def __sub__(self, other: SpeculationStats) -> SpeculationStats:
        width = max(len(self.accepted_per_position), len(other.accepted_per_position))
        pos = [
            (self.accepted_per_position[i] if i < len(self.accepted_per_position) else 0)
            - (other.accepted_per_position[i] if i < len(other.accepted_per_position) else 0)
            for i in range(width)
        ]
        return SpeculationStats(
            self.drafts - other.drafts,
            self.draft_tokens - other.draft_tokens,
            self.accepted_tokens - other.accepted_tokens,
            pos,
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["acceptance_rate"] = self.acceptance_rate
        data["mean_acceptance_length"] = self.mean_acceptance_length
        return data

    @classmethod
    def from_response_metrics(cls, metrics: dict[str, Any] | None) -> SpeculationStats | None:
        """From `metrics.speculative_decoding` of a vLLM OpenAI response; None when the request had none."""
        if not metrics:
            return None
        histogram = list(metrics.get("acceptance_histogram") or [])
        per_position = [sum(histogram[j] for j in range(i + 1, len(histogram))) for i in range(len(histogram) - 1)]
        return cls(
            drafts=int(metrics.get("num_spec_steps", 0)),
            draft_tokens=int(metrics.get("num_draft_tokens", 0)),
            accepted_tokens=int(metrics.get("num_accepted_draft_tokens", 0)),
            accepted_per_position=per_position,
        )


def engine_totals(snapshot: list[Any]) -> SpeculationStats:
    """Sum vLLM's `vllm:spec_decode_*` counters over every engine in this process (one per replica)."""
    totals = SpeculationStats()
    for metric in snapshot:
        name = metric.name.removesuffix("_total")
        if name in _COUNTERS:
            attr = _COUNTERS[name]
            setattr(totals, attr, getattr(totals, attr) + int(metric.value))
        elif name == _PER_POSITION:
            totals = totals + SpeculationStats(accepted_per_position=[int(v) for v in metric.values])
    return totals


# vLLM's load counters and gauges (one engine per replica process), for live dashboards.
_LOAD = {
    "vllm:generation_tokens": "generation_tokens",
    "vllm:prompt_tokens": "prompt_tokens",
    "vllm:request_success": "requests_finished",
    "vllm:num_requests_running": "requests_running",
    "vllm:num_requests_waiting": "requests_waiting",
}


def load_totals(snapshot: list[Any]) -> dict[str, int]:
    """Token and request counters and the running/waiting gauges, summed over label sets (finish reasons)."""
    totals = dict.fromkeys(_LOAD.values(), 0)
    for metric in snapshot:
        key = _LOAD.get(metric.name.removesuffix("_total"))
        if key is not None and hasattr(metric, "value"):
            totals[key] += int(metric.value)
    return totals
