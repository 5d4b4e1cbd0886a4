"""The gateway's hand-off to the audit log: each finished request becomes one audit event, enqueued only."""

from __future__ import annotations

import logging

from bastion.audit.events import AuthFailureEvent, InferenceEvent
from bastion.audit.events import SpeculationStats as AuditSpeculation
from bastion.audit.writer import AuditWriter
from bastion.tenancy.usage import RequestRecord

log = logging.getLogger(__name__)
_INFERENCE = {"chat", "completion"}


class AuditRecorder:
    """A RequestRecorder: inference requests and refused credentials; other endpoints are not audited."""

    def __init__(self, writer: AuditWriter, speculation_method: dict[str, str] | None = None) -> None:
        self.writer = writer
        self._methods = speculation_method or {}

    def record(self, record: RequestRecord) -> None:
        try:
            event = self._event(record)
            if event is not None:
                self.writer.enqueue(event)
        except Exception as exc:
            log.error("audit hand-off failed: %s", type(exc).__name__)

    def _event(self, r: RequestRecord) -> InferenceEvent | AuthFailureEvent | None:
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
            spec = AuditSpeculation(
                method=self._methods.get(r.profile or "", "unknown"),
                num_speculative_tokens=0,
                draft_tokens=r.speculation.num_draft_tokens,
                accepted_tokens=r.speculation.num_accepted_tokens,
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
        )
