"""The audit log's recorder: each finished request (a RequestRecord from the gateway) becomes one audit event,
enqueued only, so the request path never waits for the database.

The speculation figures come from the record as the engine reported them: drafted and accepted tokens, k (the
drafts per step, from the engine's per-position counts) and the acceptance rate at each draft position. When an
engine does not report per-position counts (an external replica, a scripted engine), k is the profile's
configured `num_speculative_tokens` and the per-position list stays empty.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from bastion.audit.events import AuditSpeculation, AuthFailureEvent, EventContent, InferenceEvent
from bastion.audit.writer import AuditWriter
from bastion.config.schema import ProfileConfig
from bastion.records import RequestRecord

log = logging.getLogger(__name__)
_INFERENCE = {"chat", "completion", "messages"}


class AuditRecorder:
    """A RequestRecorder: inference requests and refused credentials; other endpoints are not audited.

    `profiles` (the platform file's) name each profile's speculation method and configured k."""

    def __init__(self, writer: AuditWriter, profiles: Mapping[str, ProfileConfig] | None = None) -> None:
        self.writer = writer
        self._speculation = {
            name: (p.speculative.method, getattr(p.speculative, "num_speculative_tokens", 0))
            for name, p in (profiles or {}).items()
        }

    def record(self, record: RequestRecord) -> None:
        try:
            event = self.event(record)
            if event is not None:
                self.writer.enqueue(event)
        except Exception as exc:
            log.error("audit hand-off failed: %s", type(exc).__name__)

    def event(self, r: RequestRecord) -> InferenceEvent | AuthFailureEvent | None:
        if r.status == 401:
            return AuthFailureEvent(
                reason=r.error_code or "unauthorized",
                key_prefix=r.key_prefix,
                client_address=r.client_address,
                request_id=r.request_id,
                path=r.endpoint,
            )
        if r.endpoint not in _INFERENCE or r.tenant_id is None:
            return None
        spec = None
        if r.speculation is not None:
            method, configured_k = self._speculation.get(r.profile or "", ("unknown", 0))
            spec = AuditSpeculation(
                method=method,
                num_speculative_tokens=r.speculation.num_speculative_tokens or configured_k,
                draft_tokens=r.speculation.draft_tokens,
                accepted_tokens=r.speculation.accepted_tokens,
                acceptance_by_position=[round(rate, 6) for rate in r.speculation.per_position_rates()],
            )
        return InferenceEvent(
            tenant_id=r.tenant_id,
            key_id=r.key_id,
            model=r.model or "",
            profile=r.profile or "",
            routing_reason=r.routing_reason,
            replica=r.replica or r.upstream,
            status=r.status,
            error=r.error_code,
            prompt_tokens=r.prompt_tokens,
            completion_tokens=r.completion_tokens,
            latency_ms=r.latency_ms,
            ttft_ms=r.ttft_ms,
            stream=r.stream,
            speculation=spec,
            client_address=r.client_address,
            request_id=r.request_id,
            content=EventContent(**r.content) if r.content is not None else None,  # tenants with log_content
        )
