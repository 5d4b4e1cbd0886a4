"""What Bastion records about a request, in one vocabulary: the gateway builds a `RequestRecord`, and usage
counters (`tenancy/usage.py`), metrics and traces (`telemetry/`) and the audit log (`audit/recorder.py`) all
read that one record. Speculation statistics have one type, `SpeculationStats`, for a single request (from
vLLM's `metrics.speculative_decoding`) and for a replica's totals (`engine/speculation.py` sums vLLM's counters
into it), so the same names mean the same counts everywhere.

Bottom of the dependency rule: imports nothing of Bastion's, so every package may use it (the engine included).

How per-request and replica figures reconcile: vLLM counts every verification step of every request in
`vllm:spec_decode_*`; a request's `metrics.speculative_decoding` covers that request's steps alone, so over a
quiet replica the per-request sums of `drafts`, `draft_tokens` and `accepted_tokens` equal the change in the
counters. Per-position acceptance follows from the acceptance histogram: position i was accepted in every step
that accepted more than i drafts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Protocol


def _number(data: dict[str, Any], *names: str) -> float | None:
    for name in names:
        value = data.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value
    return None


def _shifted(a: list[int], b: list[int], sign: int) -> list[int]:
    width = max(len(a), len(b))
    return [(a[i] if i < len(a) else 0) + sign * (b[i] if i < len(b) else 0) for i in range(width)]


@dataclass
class SpeculationStats:
    """Drafts (verification steps), drafted and accepted tokens, and accepted tokens per draft position."""

    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    @property
    def num_speculative_tokens(self) -> int:
        """k, the drafts per step, as the engine reported it (its per-position list); 0 when it did not say."""
        return len(self.accepted_per_position)

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def mean_acceptance_length(self) -> float | None:
        return 1 + self.accepted_tokens / self.drafts if self.drafts else None

    def per_position_rates(self) -> list[float]:
        return [n / self.drafts for n in self.accepted_per_position] if self.drafts else []

    def __add__(self, other: SpeculationStats) -> SpeculationStats:
        return SpeculationStats(
            self.drafts + other.drafts,
            self.draft_tokens + other.draft_tokens,
            self.accepted_tokens + other.accepted_tokens,
            _shifted(self.accepted_per_position, other.accepted_per_position, 1),
        )

    def __sub__(self, other: SpeculationStats) -> SpeculationStats:
        return SpeculationStats(
            self.drafts - other.drafts,
            self.draft_tokens - other.draft_tokens,
            self.accepted_tokens - other.accepted_tokens,
            _shifted(self.accepted_per_position, other.accepted_per_position, -1),
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["acceptance_rate"] = self.acceptance_rate
        data["mean_acceptance_length"] = self.mean_acceptance_length
        return data

    @classmethod
    def from_response_metrics(cls, metrics: Any) -> SpeculationStats | None:
        """From `metrics.speculative_decoding` of an OpenAI-style response (vLLM's, or an external replica's in
        the same shape); None when the request had none. Lenient: a value that is not a number counts as 0, and
        the accepted count may be spelled `num_accepted_draft_tokens` (vLLM) or `num_accepted_tokens`."""
        if not isinstance(metrics, dict) or not metrics:
            return None
        histogram = metrics.get("acceptance_histogram")
        counts = [int(n) for n in histogram if isinstance(n, int)] if isinstance(histogram, list) else []
        per_position = [sum(counts[i + 1 :]) for i in range(len(counts) - 1)]
        return cls(
            drafts=int(_number(metrics, "num_spec_steps") or 0),
            draft_tokens=int(_number(metrics, "num_draft_tokens") or 0),
            accepted_tokens=int(_number(metrics, "num_accepted_draft_tokens", "num_accepted_tokens") or 0),
            accepted_per_position=per_position,
        )


@dataclass(frozen=True)
class RequestRecord:
    """Everything Bastion keeps about one request: no secrets, and no prompt or completion text except in
    `content`, set only for tenants that opted in (`log_content`), read only by the audit recorder (which
    stores it encrypted), and left out of repr."""

    request_id: str
    tenant_id: str | None
    key_id: str | None
    endpoint: str  # chat | completion | models | usage
    model: str | None
    profile: str | None
    upstream: str | None
    routing_reason: str | None
    status: int
    error_code: str | None
    stream: bool
    prompt_tokens: int
    completion_tokens: int
    started_at: datetime
    latency_ms: float
    ttft_ms: float | None = None
    speculation: SpeculationStats | None = None
    key_prefix: str | None = None  # the public part of the presented key, also when it was refused
    client_address: str | None = None
    replica: str | None = None  # `upstream#replica-id` when the upstream named the replica that served it
    extra: dict[str, Any] = field(default_factory=dict)
    content: dict[str, Any] | None = field(default=None, repr=False, compare=False)  # {"prompt", "completion"}

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class RequestRecorder(Protocol):
    def record(self, record: RequestRecord) -> None:
        """Take the record without blocking (queue it); never raise into the request."""
        ...
