"""The audit event schema and its canonical JSON form.

Events are pydantic models the gateway and the admin API build; `Event.record()` splits one into the table's
columns and a payload. Content (prompts and completions) travels beside the event, never inside the payload,
so it can only reach the database encrypted (see crypto.py).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
KINDS = ("inference", "auth_failure", "admin", "export", "verify", "retention", "engine_guard")
# Column fields: stored in their own columns, so they are left out of the payload.
_COLUMNS = {"kind", "occurred_at", "tenant_id", "actor", "request_id", "content"}
_SECRET_NAMES = {"secret", "password", "api_key", "token", "client_secret", "secret_hash", "pepper", "private_key"}


def utcnow() -> datetime:
    return datetime.now(UTC)


def format_time(value: datetime) -> str:
    """The one timestamp form hashed, exported and compared: UTC, microseconds, `Z`."""
    if value.tzinfo is None:
        raise ValueError("naive datetime; audit times are UTC with a time zone")
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    # Same text as strftime(TIME_FORMAT), several times faster (this runs for every event).
    return value.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, TIME_FORMAT).replace(tzinfo=UTC)


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8, no NaN: the same bytes for the same value on every machine."""
    return _ENCODER.encode(value).encode()


_SCALARS = {str, int, float, bool}


def _plain(value: Any) -> Any:
    """JSON-ready values without pydantic's serializer (several times faster; this runs once per event)."""
    if value is None or type(value) in _SCALARS:
        return value
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, BaseModel):
        return {k: _plain(v) for k, v in value.__dict__.items() if v is not None}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value)


def redact(value: Any) -> Any:
    """Replace values under secret-looking keys so admin before/after snapshots never carry a secret."""
    if isinstance(value, dict):
        return {k: "[redacted]" if str(k).lower() in _SECRET_NAMES else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


class EventContent(BaseModel):
    """A prompt and its completion: stored only for tenants that opted in, and then only encrypted."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    prompt: Any = None
    completion: Any = None

    def __repr__(self) -> str:  # never print content, even in a debugger or a traceback
        return "EventContent(<hidden>)"

    __str__ = __repr__


class AuditSpeculation(BaseModel):
    """A request's speculation as the audit row keeps it: `records.SpeculationStats` (same names for the same
    counts) plus the profile's method, k, and acceptance per draft position as rates (accepted at i ÷ drafts)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    method: str
    num_speculative_tokens: int = Field(ge=0)
    draft_tokens: int = Field(ge=0)
    accepted_tokens: int = Field(ge=0)
    acceptance_by_position: list[float] = Field(default_factory=list)


class EventBase(BaseModel):
    """Fields every event has; subclasses add their own. Frozen: an event does not change once enqueued."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    occurred_at: datetime = Field(default_factory=utcnow)
    tenant_id: str | None = Field(default=None, max_length=32)
    request_id: str | None = Field(default=None, max_length=64)
    trace_id: str | None = None
    client_address: str | None = None
    actor_field: ClassVar[str | None] = None

    @field_validator("tenant_id", "request_id", "actor", check_fields=False)
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        # Text columns: PostgreSQL refuses NUL, and a row the database refuses would stall the writer's batch.
        if value is not None and "\x00" in value:
            raise ValueError("must not contain NUL characters")
        return value

    @field_validator("occurred_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("occurred_at must carry a time zone")
        return value.astimezone(UTC)

    def record(self) -> dict[str, Any]:
        """Columns plus payload, as the writer stores them (content handled separately)."""
        payload = {k: _plain(v) for k, v in self.__dict__.items() if v is not None and k not in _COLUMNS}
        actor = getattr(self, "actor", None)
        return {
            "kind": self.kind,  # type: ignore[attr-defined]
            "occurred_at": self.occurred_at,
            "tenant_id": self.tenant_id,
            "actor": actor,
            "request_id": self.request_id,
            "payload": payload,
        }

    @property
    def event_content(self) -> EventContent | None:
        return getattr(self, "content", None)


class InferenceEvent(EventBase):
    """One inference request, written when it completes (or fails)."""

    kind: Literal["inference"] = "inference"
    key_id: str | None = None
    model: str
    profile: str
    routing_reason: str | None = None
    replica: str | None = None
    status: int = Field(description="HTTP status returned to the client")
    error: str | None = Field(default=None, description="an error class, never a message with user text")
    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)
    latency_ms: float = Field(default=0.0, ge=0)
    ttft_ms: float | None = Field(default=None, ge=0)
    stream: bool = False
    speculation: AuditSpeculation | None = None
    content: EventContent | None = Field(default=None, repr=False)


class AuthFailureEvent(EventBase):
    """A refused credential: the key's public prefix at most, never the secret."""

    kind: Literal["auth_failure"] = "auth_failure"
    reason: str
    key_prefix: str | None = Field(default=None, max_length=32)
    key_id: str | None = None
    path: str | None = None


class AdminEvent(EventBase):
    """An administrator's change: who (from the identity token), what, and the values before and after."""

    kind: Literal["admin"] = "admin"
    actor: str = Field(max_length=128)
    action: str
    target_type: str
    target_id: str | None = None
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None

    @field_validator("before", "after")
    @classmethod
    def _redact(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if value is None else redact(value)


class ExportEvent(EventBase):
    kind: Literal["export"] = "export"
    actor: str = Field(max_length=128)
    format: str
    time_from: datetime | None = None
    time_to: datetime | None = None
    rows: int = Field(ge=0)
    manifest_sha256: str


class VerifyEvent(EventBase):
    kind: Literal["verify"] = "verify"
    actor: str = Field(max_length=128)
    target: Literal["database", "export"]
    ok: bool
    chains: int = Field(default=0, ge=0)
    events: int = Field(default=0, ge=0)
    first_error: str | None = None


class RetentionEvent(EventBase):
    """A retention deletion: which chain prefix went, up to which signed checkpoint."""

    kind: Literal["retention"] = "retention"
    actor: str = Field(max_length=128)
    chain_id: str
    up_to_sequence: int = Field(ge=0)
    checkpoint_hash: str
    deleted: int = Field(ge=0)
    days: int = Field(ge=1)
    cutoff: datetime


class EngineGuardEvent(EventBase):
    """A speculating replica failed its speculation guard and left routing (written by the gateway, which sees
    every replica's verdict; engine/guard.py)."""

    kind: Literal["engine_guard"] = "engine_guard"
    deployment: str
    model: str
    profile: str
    replica: str
    trigger: str | None = None
    reason: str
    greedy_match: float | None = None
    sampled_mean: dict[str, float] = Field(default_factory=dict)
    baseline_mean: dict[str, float] = Field(default_factory=dict)
    checked_at: str | None = None


Event = Annotated[
    InferenceEvent | AuthFailureEvent | AdminEvent | ExportEvent | VerifyEvent | RetentionEvent | EngineGuardEvent,
    Field(discriminator="kind"),
]
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)
