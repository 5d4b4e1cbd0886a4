"""Tamper-evident audit log: event schema, hash chains, signed checkpoints, durable writer, export, retention.

The gateway builds an event (`InferenceEvent`, `AuthFailureEvent`, `AdminEvent`, ...) and calls
`AuditWriter.enqueue(event)`; everything else (hashing, encryption, batching, spooling) happens off the
request path in the writer's task.
"""

from bastion.audit.errors import AuditError, AuditKeyError
from bastion.audit.events import (
    AdminEvent,
    AuditSpeculation,
    AuthFailureEvent,
    EngineGuardEvent,
    Event,
    EventBase,
    EventContent,
    ExportEvent,
    InferenceEvent,
    RetentionEvent,
    VerifyEvent,
)
from bastion.audit.writer import AuditWriter

__all__ = [
    "AdminEvent",
    "AuditError",
    "AuditKeyError",
    "AuditSpeculation",
    "AuditWriter",
    "AuthFailureEvent",
    "EngineGuardEvent",
    "Event",
    "EventBase",
    "EventContent",
    "ExportEvent",
    "InferenceEvent",
    "RetentionEvent",
    "VerifyEvent",
]
