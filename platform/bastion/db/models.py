"""SQLAlchemy tables. One schema for SQLite (embedded) and PostgreSQL (production); Alembic owns its history."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# Stable constraint names so Alembic autogenerate and SQLite batch migrations agree on both databases.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on both databases (SQLite drops the zone; this restores it)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; Bastion stores UTC with a time zone")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar = {datetime: UTCDateTime(), dict[str, Any]: JSON(), int: Integer()}


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="active")  # active | suspended
    allowed_models: Mapped[list[str]] = mapped_column(JSON, default=list)  # empty: every model
    allowed_profiles: Mapped[list[str]] = mapped_column(JSON, default=list)  # empty: tenant defaults
    allowed_apis: Mapped[list[str]] = mapped_column(JSON, default=list, server_default="[]")  # empty: every API
    default_profile: Mapped[str | None] = mapped_column(String(64))
    log_content: Mapped[bool] = mapped_column(Boolean, default=False)
    audit_strict: Mapped[bool] = mapped_column(Boolean, default=False)
    retention_days: Mapped[int | None]
    # Share of a full profile's fair queue (console, admin API, CLI); None: `gateway.tenant_weights`, else 1.
    fair_share_weight: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    keys: Mapped[list[ApiKey]] = relationship(back_populates="tenant", cascade="all, delete-orphan")


class ApiKey(Base):
    """An API key: only an HMAC of its secret is stored; `prefix` is the part shown to people."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64), default="")
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    secret_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    scopes: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    replaced_by: Mapped[str | None] = mapped_column(String(32))

    tenant: Mapped[Tenant] = relationship(back_populates="keys")


class Limit(Base):
    """Limits for a tenant (key_id NULL) or for one of its keys; NULL fields mean no limit."""

    __tablename__ = "limits"
    __table_args__ = (UniqueConstraint("tenant_id", "key_id", name="uq_limits_tenant_key"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"))
    requests_per_minute: Mapped[int | None]
    tokens_per_minute: Mapped[int | None]
    concurrent_requests: Mapped[int | None]
    daily_token_budget: Mapped[int | None] = mapped_column(BigInteger)
    monthly_token_budget: Mapped[int | None] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class UsageCounter(Base):
    """Token and request totals per tenant, model, profile and period (a day `2026-11-29` or a month `2026-11`)."""

    __tablename__ = "usage_counters"
    __table_args__ = (UniqueConstraint("tenant_id", "period", "model", "profile", name="uq_usage_counters_bucket"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    period: Mapped[str] = mapped_column(String(10))
    model: Mapped[str] = mapped_column(String(64))
    profile: Mapped[str] = mapped_column(String(64))
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    draft_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    accepted_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class KeyUsageCounter(Base):
    """Request and token totals per API key and period: what per-key daily/monthly budgets are checked against."""

    __tablename__ = "key_usage_counters"
    __table_args__ = (UniqueConstraint("key_id", "period", name="uq_key_usage_counters_key_period"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"))
    period: Mapped[str] = mapped_column(String(10))
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class AuditEvent(Base):
    """One link of an append-only hash chain: hash = SHA-256(prev_hash ‖ canonical JSON of the event)."""

    __tablename__ = "audit_events"
    __table_args__ = (
        UniqueConstraint("chain_id", "sequence", name="uq_audit_events_chain_sequence"),
        Index("ix_audit_events_tenant_time", "tenant_id", "occurred_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    chain_id: Mapped[str] = mapped_column(String(64))
    sequence: Mapped[int] = mapped_column(BigInteger)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    occurred_at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))  # inference | auth_failure | admin | export | verify | retention
    tenant_id: Mapped[str | None] = mapped_column(String(32))
    actor: Mapped[str | None] = mapped_column(String(128))
    request_id: Mapped[str | None] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    content: Mapped[bytes | None] = mapped_column(LargeBinary)  # AES-GCM ciphertext when the tenant opted in


class AuditCheckpoint(Base):
    """An Ed25519 signature over a chain head, so retention can delete what a signature covers."""

    __tablename__ = "audit_checkpoints"
    __table_args__ = (
        UniqueConstraint("chain_id", "sequence", "kind", name="uq_audit_checkpoints_chain_sequence_kind"),
    )

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    chain_id: Mapped[str] = mapped_column(String(64))
    sequence: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16), default="head", server_default="head-v1")  # genesis|head|final|…
    signed_at: Mapped[datetime] = mapped_column(default=utcnow)
    key_id: Mapped[str] = mapped_column(String(64))
    signature: Mapped[bytes] = mapped_column(LargeBinary)


class AuditAnchor(Base):
    """Where verification of a chain starts once retention deleted its prefix: a signed checkpoint's head."""

    __tablename__ = "audit_anchors"

    chain_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    sequence: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))
    checkpoint_id: Mapped[int]
    deleted: Mapped[int] = mapped_column(BigInteger, default=0)  # rows retention removed from this chain so far
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class AuditRecord(Base):
    """A signed statement about the log itself: a retention prune, or a key hand-over (docs/audit.md)."""

    __tablename__ = "audit_records"
    __table_args__ = (Index("ix_audit_records_kind_chain", "kind", "chain_id"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32))  # retention | key_handover
    chain_id: Mapped[str | None] = mapped_column(String(64))
    key_id: Mapped[str] = mapped_column(String(64))
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    signed_at: Mapped[datetime] = mapped_column(default=utcnow)
    signature: Mapped[bytes] = mapped_column(LargeBinary)
    co_signature: Mapped[bytes | None] = mapped_column(LargeBinary)  # a hand-over's signature by the new key


class AuditContentKey(Base):
    """A tenant's data key for one UTC day of stored content, wrapped by the master content key.

    Not append-only: erasure (crypto-shredding) empties `wrapped`, which makes that day's content unreadable
    while every chain still verifies (rows hash the ciphertext, not the plaintext)."""

    __tablename__ = "audit_content_keys"
    __table_args__ = (Index("ix_audit_content_keys_tenant_day", "tenant_id", "day"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # 16 random bytes, hex; in each ciphertext
    tenant_id: Mapped[str] = mapped_column(String(32))
    day: Mapped[str] = mapped_column(String(10))  # YYYY-MM-DD (UTC) of the events it encrypts
    wrapped: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # None once erased
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    erased_at: Mapped[datetime | None] = mapped_column(nullable=True)
