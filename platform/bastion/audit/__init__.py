"""Tamper-evident audit log: event schema, hash chains, signed checkpoints, durable writer, export, retention.

The gateway builds an event (`InferenceEvent`, `AuthFailureEvent`, `AdminEvent`, ...) and calls
`AuditWriter.enqueue(event)`; everything else (hashing, encryption, batching, spooling) happens off the
request path in the writer's task.
"""

from bastion.audit.errors import AuditError, AuditKeyError
from bastion.audit.events import (
    AdminEvent,
    AuthFailureEvent,
    EngineGuardEvent,
    Event,
    EventBase,
    EventContent,
    ExportEvent,
    InferenceEvent,
    RetentionEvent,
    SpeculationStats,
    VerifyEvent,
)
from bastion.audit.writer import AuditWriter

__all__ = [
    "AdminEvent",
    "AuditError",
    "AuditKeyError",
    "AuditWriter",
    "AuthFailureEvent",
    "EngineGuardEvent",
    "Event",
    "EventBase",
    "EventContent",
    "ExportEvent",
    "InferenceEvent",
    "RetentionEvent",
    "SpeculationStats",
    "VerifyEvent",
]
