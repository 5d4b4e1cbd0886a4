"""A replica's totals from vLLM's own counters: speculation (`vllm:spec_decode_*`, summed into the one
`SpeculationStats` of `bastion/records.py`, which also holds per-request figures and how the two reconcile)
and load (tokens, finished, running and waiting requests) for live dashboards.
"""

from __future__ import annotations

from typing import Any

from bastion.records import SpeculationStats

_COUNTERS = {
    "vllm:spec_decode_num_drafts": "drafts",
    "vllm:spec_decode_num_draft_tokens": "draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "accepted_tokens",
}
_PER_POSITION = "vllm:spec_decode_num_accepted_tokens_per_pos"


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
