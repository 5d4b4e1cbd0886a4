"""Wiring from the platform file: keys, the spool folder, a writer; the entry points the CLI and admin API use."""

from __future__ import annotations

import contextlib
import os
import pwd
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from bastion.audit import content_keys
from bastion.audit.content_export import write_content_keys
from bastion.audit.content_keys import decrypt_row
from bastion.audit.crypto import ContentCipher
from bastion.audit.errors import AuditError, AuditKeyError
from bastion.audit.events import AdminEvent, ExportEvent, VerifyEvent
from bastion.audit.export import ExportResult, count_rows, export_events
from bastion.audit.keyring import Keyring, handover_record
from bastion.audit.retention import RetentionResult, apply_retention, tenant_policies
from bastion.audit.signing import Signer, Verifier
from bastion.audit.store import EVENTS, chain_ids, insert_records
from bastion.audit.verify import VerifyReport, verify_database
from bastion.audit.witness import DirectorySink, Sink, SyslogSink, Witness, read_witness
from bastion.audit.witnesscheck import check_witness
from bastion.audit.writer import AuditWriter
from bastion.config import PlatformConfig
from bastion.db.models import Tenant
from bastion.db.session import create_engine


def spool_dir(config: PlatformConfig) -> Path:
    return config.data_dir / "audit-spool"


def load_signer(config: PlatformConfig) -> Signer:
    if config.audit.signing_key_file is None:
        raise AuditKeyError("audit.signing_key_file is not set (create keys with `bastion audit keygen --out DIR`)")
    return Signer.from_file(config.audit.signing_key_file)


def load_verifier(config: PlatformConfig, public_key: Path | None = None) -> Verifier:
    """The given public key, else the one derived from the platform file's signing key."""
    if public_key is not None:
        return Verifier.from_file(public_key)
    return load_signer(config).verifier


def trusted_keyring(config: PlatformConfig, public_keys: list[Path] | None = None) -> Keyring:
    """The keys verification trusts: the auditor's `--public-key` files, else the keys whose fingerprints the
    platform file pins (found in audit.public_key_file / signing_key_file). Anything else is refused."""
    if public_keys:
        return Keyring.of(*(Verifier.from_file(path) for path in public_keys))
    pinned = config.audit.trusted_key_fingerprints
    if not pinned:
        raise AuditKeyError(
            "no trusted audit key: pass --public-key FILE or pin audit.trusted_key_fingerprints in the platform file"
        )
    candidates = [p for p in (config.audit.public_key_file, config.audit.signing_key_file) if p is not None]
    found = [Verifier.from_file(path) for path in candidates]
    trusted = [v for v in found if v.fingerprint in pinned]
    if not trusted:
        named = ", ".join(v.fingerprint for v in found) or "none"
        raise AuditKeyError(f"refusing to verify: no configured key is pinned (keys found: {named})")
    return Keyring.of(*trusted)


def build_witness(config: PlatformConfig) -> Witness | None:
    sinks: list[Sink] = []
    if config.audit.witness_dir is not None:
        sinks.append(DirectorySink(config.audit.witness_dir))
    if config.audit.witness_syslog is not None:
        sinks.append(SyslogSink(config.audit.witness_syslog))
    return Witness(sinks) if sinks else None


def load_cipher(config: PlatformConfig) -> ContentCipher | None:
    path = config.audit.content_key_file
    return ContentCipher.from_file(path) if path is not None else None


def build_writer(config: PlatformConfig, engine: AsyncEngine | None = None, **options: Any) -> AuditWriter:
    """The gateway's writer: checkpoints signed when a signing key is configured, content encrypted when a
    content key is; without a content key, content is never stored even for tenants that opted in."""
    signer = load_signer(config) if config.audit.signing_key_file is not None else None
    options.setdefault("checkpoint_every", config.audit.checkpoint_every)
    options.setdefault("checkpoint_interval_s", config.audit.checkpoint_interval_s)
    return AuditWriter(
        engine if engine is not None else config.database.url,
        spool_dir=spool_dir(config),
        signer=signer,
        cipher=load_cipher(config),
        witness=build_witness(config),
        **options,
    )


async def may_write(engine: AsyncEngine) -> bool:
    """Whether the connected role may insert audit events (a select-only auditor may not; SQLite has no roles)."""
    if engine.dialect.name != "postgresql":
        return True
    async with engine.connect() as conn:
        return bool((await conn.execute(text("SELECT has_table_privilege('audit_events', 'INSERT')"))).scalar())


async def record(config: PlatformConfig, events: Iterable[Any], engine: AsyncEngine | None = None) -> bool:
    """Write a few events durably from a short-lived process (the CLI's export, verify and retention).

    False, and nothing written anywhere (no spool, no waiting for a database that will refuse), when the
    connected role may not write the audit log: a read-only auditor's own verification goes unrecorded."""
    if engine is not None and not await may_write(engine):
        return False
    writer = await build_writer(config, engine).start()
    try:
        for event in events:
            writer.enqueue(event)
    finally:
        await writer.close()
    return True


UNRECORDED = "not recorded in the audit log: the database role may not write it (a select-only auditor)"


@contextlib.asynccontextmanager
async def _database(config: PlatformConfig) -> AsyncIterator[AsyncEngine]:
    """An engine for one command; database failures become one readable line (no URL, no password)."""
    engine = create_engine(config.database.url)
    try:
        yield engine
    except OSError as exc:
        raise AuditError(f"database unreachable: {exc.strerror or type(exc).__name__}") from None
    except SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc
        first = (str(cause).splitlines() or [""])[0]
        raise AuditError(f"database error: {type(cause).__name__}: {first}") from None
    finally:
        await engine.dispose()


DEFAULT_OPERATOR_KEY = Path("~/.config/bastion/operator.pem")


def operator(config: PlatformConfig, key_file: Path | None = None) -> str:
    """Who runs this CLI action, proven: the operator whose public key is pinned in `audit.operators` and whose
    private key (`--operator-key`, else ~/.config/bastion/operator.pem) signs a fresh challenge here. Recorded
    as `operator:<name>#<key id>`. With no operators pinned and no key, the OS account (from the process's uid,
    not an environment variable) is recorded as `cli-unverified:<account>`."""
    path = key_file or DEFAULT_OPERATOR_KEY.expanduser()
    pinned = config.audit.operators
    if key_file is None and not path.exists():
        if pinned:
            raise AuditKeyError(
                "this platform names its operators (audit.operators): prove who you are with --operator-key FILE"
            )
        return cli_actor()
    signer = Signer.from_file(path)
    challenge = os.urandom(32)
    signature = signer.sign(challenge)
    for name, public in sorted(pinned.items()):
        verifier = Verifier.from_file(public)
        if verifier.key_id == signer.key_id and verifier.verify(signature, challenge):
            return f"operator:{name}#{signer.key_id}"[:128]
    raise AuditKeyError(f"operator key {signer.key_id} is not pinned in audit.operators of the platform file")


def cli_actor() -> str:
    """The OS account of this process by its uid (unverified: anyone with that account can be it)."""
    try:
        account = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        account = f"uid {os.getuid()}"
    return f"cli-unverified:{account}"[:128]


async def verify(
    config: PlatformConfig,
    public_keys: list[Path] | None = None,
    actor: str | None = None,
    *,
    witness: list[Path] | None = None,
    max_unsigned_s: float | None = None,
    notes: list[str] | None = None,
) -> VerifyReport:
    """Verify every chain, signed head and record with the trusted keys (and against witnesses); audit the
    verification itself when this host may write (else a line in `notes`): works with the select-only
    `bastion_auditor` role."""
    actor = actor or operator(config)  # first: an unproven operator changes nothing
    keyring = trusted_keyring(config, public_keys)
    witnessed = [head for source in witness or [] for head in read_witness(source)]
    async with _database(config) as engine:
        policies = await tenant_policies(engine, config.audit.retention_days)
        report = await verify_database(engine, keyring, max_unsigned_s=max_unsigned_s, policies=policies)
        if witness:
            await check_witness(engine, keyring, witnessed, report)
        first = report.first_problem
        event = VerifyEvent(
            actor=actor,
            target="database",
            ok=report.ok,
            chains=len(report.chains),
            events=report.events,
            first_error=str(first) if first else None,
        )
        if config.audit.signing_key_file is None:  # an auditor's host holds no signing key: nothing to write
            if notes is not None:
                notes.append("this verification was not recorded in the audit log: this host holds no signing key")
        elif not await record(config, [event], engine) and notes is not None:
            notes.append(f"this verification was {UNRECORDED}")
    return report


async def export(
    config: PlatformConfig,
    fmt: str,
    out_dir: Path,
    *,
    tenant: str | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    actor: str | None = None,
    on_total: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    allow_unverified: bool = False,
    notes: list[str] | None = None,
    content_for: Path | None = None,
) -> ExportResult:
    """Verify what is exported (refuse a log that does not verify unless allowed), export, sign the manifest,
    and audit the export (when the role may write, else a line in `notes`).

    `content_for` (an auditor's X25519 public key) adds the data keys the rows need, sealed to that auditor;
    that needs the master content key and a role that may write the log (it is audited, or not done)."""
    actor = actor or operator(config)  # first: an unproven operator changes nothing
    signer = load_signer(config)
    manifest_signer = Signer.from_file(config.audit.export_key_file) if config.audit.export_key_file else signer
    keyring = trusted_keyring(config) if config.audit.trusted_key_fingerprints else Keyring.of(signer.verifier)
    master = load_cipher(config) if content_for is not None else None
    if content_for is not None and master is None:
        raise AuditKeyError("--content-for needs audit.content_key_file (the master content key)")
    async with _database(config) as engine:
        if content_for is not None and not await may_write(engine):
            raise AuditError(f"content export refused: it must be audited, and it would be {UNRECORDED}")
        chains = await chain_ids(engine, tenant)
        checked = await verify_database(engine, keyring, chains)
        problems = [str(p) for p in checked.problems]
        if problems and not allow_unverified:
            raise AuditError(
                f"export refused: the log does not verify ({len(problems)} problems; first: {problems[0]}); "
                "--allow-unverified exports anyway and says so in the manifest"
            )
        verification = {"verified": not problems, "problems": problems[:1000], "problem_count": len(problems)}
        if on_total is not None:
            on_total(await count_rows(engine, tenant, start, end))
        result = await export_events(
            engine,
            out_dir,
            fmt,
            manifest_signer,
            tenant=tenant,
            start=start,
            end=end,
            on_progress=on_progress,
            verification=verification,
        )
        event = ExportEvent(
            tenant_id=tenant,
            actor=actor,
            format=fmt,
            time_from=start,
            time_to=end,
            rows=result.rows,
            manifest_sha256=result.manifest_sha256,
        )
        events: list[Any] = [event]
        if content_for is not None and master is not None:
            sealed = await write_content_keys(engine, out_dir, fmt, master, content_for, signer)
            events.append(
                AdminEvent(
                    tenant_id=tenant,
                    actor=actor,
                    action="audit.content.export",
                    target_type="export",
                    target_id=result.manifest_sha256,
                    after=sealed,
                )
            )
        if not await record(config, events, engine) and notes is not None:
            notes.append(f"this export was {UNRECORDED}")
    return result


async def retention(config: PlatformConfig, actor: str | None = None) -> list[RetentionResult]:
    """Apply every tenant's retention (tenant setting, else audit.retention_days) and audit each deletion."""
    actor = actor or operator(config)  # first: an unproven operator changes nothing
    signer = load_signer(config)
    async with _database(config) as engine:
        policies = await tenant_policies(engine, config.audit.retention_days)
        results = await apply_retention(engine, signer, policies, actor=actor)
        await record(config, [r.event(actor) for r in results], engine)
    return results


async def rotate_key(config: PlatformConfig, new_key: Path, actor: str | None = None) -> dict[str, Any]:
    """Record the hand-over from the configured signing key to `new_key`, signed by both (then point
    audit.signing_key_file at the new key and restart the writers)."""
    old, new = load_signer(config), Signer.from_file(new_key)
    row = handover_record(old, new, actor or operator(config))
    async with _database(config) as engine, engine.begin() as conn:
        await insert_records(conn, [row])
    return {"old": old.verifier.fingerprint, "new": new.verifier.fingerprint}


def parse_when(text: str | None, option: str) -> datetime | None:
    """`2026-11-29` or an ISO time; without a zone it is UTC."""
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise AuditError(f"{option}: not a date or ISO time: {text!r}") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


async def read_content(config: PlatformConfig, chain_id: str, sequence: int, actor: str | None = None) -> Any:
    """Decrypt one event's content for an auditor; the reading is itself audited (who, which event)."""
    actor = actor or operator(config)  # first: an unproven operator changes nothing
    cipher = load_cipher(config)
    if cipher is None:
        raise AuditKeyError("audit.content_key_file is not set")
    async with _database(config) as engine:
        async with engine.connect() as conn:
            query = select(EVENTS).where(EVENTS.c.chain_id == chain_id, EVENTS.c.sequence == sequence)
            row = (await conn.execute(query)).mappings().first()
        if row is None:
            raise AuditError(f"no audit event {chain_id}#{sequence}")
        event = AdminEvent(
            tenant_id=row["tenant_id"],
            actor=actor,
            action="audit.content.read",
            target_type="audit_event",
            target_id=f"{chain_id}#{sequence}",
        )
        if not await record(config, [event], engine):  # content is never read unaudited
            raise AuditError(f"content not read: the reading must be audited, and it would be {UNRECORDED}")
        return await decrypt_row(engine, dict(row), cipher)


async def erase(config: PlatformConfig, tenant: str, before: date | None = None, actor: str | None = None) -> int:
    """Crypto-shred a tenant's stored content (all of it, or the days before `before`); audited. Every chain
    still verifies: rows hold ciphertext, and only the tenant's data keys are destroyed."""
    actor = actor or operator(config)  # first: an unproven operator changes nothing
    async with _database(config) as engine:
        async with engine.connect() as conn:
            query = select(Tenant.id).where((Tenant.id == tenant) | (Tenant.name == tenant))
            tenant_id = (await conn.execute(query)).scalar_one_or_none()
        if tenant_id is None:
            raise AuditError(f"no tenant {tenant!r}")
        if not await may_write(engine):
            raise AuditError("erase refused: an erasure must be audited, and this role may not write the log")
        destroyed = await content_keys.erase(engine, tenant_id, before)
        event = AdminEvent(
            tenant_id=tenant_id,
            actor=actor,
            action="audit.content.erase",
            target_type="tenant",
            target_id=tenant_id,
            after={"before": before.isoformat() if before else None, "data_keys_destroyed": destroyed},
        )
        if not await record(config, [event], engine):
            raise AuditError(f"erased {destroyed} data keys, but the erasure could not be audited: {UNRECORDED}")
    return destroyed
