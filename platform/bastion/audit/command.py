"""`bastion audit ...`: keys, verification, exports, retention, content. cli.py registers the group."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from bastion.commandline import ConfigOption, out
from bastion.config import load_config

err = Console(stderr=True)
audit_app = typer.Typer(help="Tamper-evident audit log: keys, verification, exports, retention.", no_args_is_help=True)


_OPERATOR: dict[str, Path | None] = {"key": None}
OperatorKeyOption = Annotated[
    Path | None,
    typer.Option(
        "--operator-key",
        help="your Ed25519 private key (PEM), whose public key audit.operators pins to your name; "
        "default ~/.config/bastion/operator.pem",
    ),
]


@audit_app.callback()
def audit_main(operator_key: OperatorKeyOption = None) -> None:
    """Actions are recorded as the operator the key proves (`bastion audit --operator-key FILE verify ...`)."""
    _OPERATOR["key"] = operator_key


def _actor(platform: Any) -> str:
    from bastion.audit import service

    return service.operator(platform, _OPERATOR["key"])


@audit_app.command("operator-keygen")
def audit_operator_keygen(
    private: Annotated[Path, typer.Option("--out", help="private key file to write (the public key: FILE.pub)")],
) -> None:
    """Create an operator's Ed25519 key pair: keep the private key, pin the public one in audit.operators."""
    from bastion.audit.signing import write_key_pair

    public = private.with_name(private.name + ".pub")
    key = write_key_pair(private, public)
    out.print(f"operator key {key}: private {private} (mode 0600), public {public}")


@audit_app.command("keygen")
def audit_keygen(out_dir: Annotated[Path, typer.Option("--out", help="folder for the new key files")]) -> None:
    """Create an Ed25519 signing key pair (private key mode 0600) and an AES-256 content key (0600)."""
    from bastion.audit.signing import keygen

    for role, path in keygen(out_dir).items():
        out.print(f"{role}: {path}")


@audit_app.command("verify")
def audit_verify(
    config: ConfigOption = None,
    export: Annotated[Path | None, typer.Option("--export", help="verify this export folder offline")] = None,
    public_key: Annotated[
        list[Path] | None,
        typer.Option(
            "--public-key",
            metavar="FILE",
            help="the Ed25519 public key (PEM) you trust; repeat for an export key. Without it, only keys whose "
            "fingerprints audit.trusted_key_fingerprints pins are trusted",
        ),
    ] = None,
    witness: Annotated[
        list[Path] | None,
        typer.Option(
            "--witness",
            metavar="SOURCE",
            help="off-box witness: a witness folder or a syslog/journal file (repeatable)",
        ),
    ] = None,
    max_unsigned_s: Annotated[
        float | None,
        typer.Option("--max-unsigned-s", help="fail chains whose events no signature covers are older than this"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="the full report as JSON on stdout")] = False,
) -> None:
    """Verify every chain, signed head and record in the database, or an export offline (--export DIR).

    Lists every problem (chain, sequence, kind) and each chain's unsigned events; exits 1 if any."""
    import asyncio
    import json

    from bastion.audit import service
    from bastion.audit.errors import AuditError

    if export is not None:
        from bastion.audit.exportcheck import verify_export
        from bastion.audit.keyring import Keyring
        from bastion.audit.signing import Verifier

        if not public_key:
            raise AuditError("--export needs --public-key FILE")
        keyring = Keyring.of(*(Verifier.from_file(p) for p in public_key))
        checked = verify_export(export, keyring)
        if as_json:
            sys.stdout.write(json.dumps({"ok": checked.ok, "trusted_keys": keyring.fingerprints, **vars(checked)}))
            sys.stdout.write("\n")
        else:
            _print_keys(keyring.fingerprints)
            if checked.unverified_source:
                _line("warning: exported with --allow-unverified: the database did not verify (see manifest)")
        if not checked.ok:
            for problem in checked.problems[1:] if not as_json else []:
                _line(f"problem: {problem}")
            raise AuditError(f"export does not verify: {checked.first_problem}")
        if not as_json:
            _line(f"ok: {checked.rows} events, {checked.checkpoints} signed checkpoints")
        return
    notes: list[str] = []
    platform = load_config(config)
    report = asyncio.run(
        service.verify(
            platform,
            public_key,
            actor=_actor(platform),
            witness=witness,
            max_unsigned_s=max_unsigned_s,
            notes=notes,
        )
    )
    for note in notes:
        err.print(f"note: {note}")
    if as_json:
        sys.stdout.write(json.dumps(report.to_json(), indent=2) + "\n")
    else:
        _print_keys(report.trusted_keys)
        for chain in report.chains:
            if chain.unsigned_events:
                _line(
                    f"chain {chain.chain_id}: {chain.unsigned_events} events no signature covers "
                    f"(since {chain.unsigned_since})"
                )
        for problem in report.problems:
            _line(f"problem: {problem}")
    if not report.ok:
        raise AuditError(f"audit log does not verify: {len(report.problems)} problems; first: {report.first_problem}")
    if not as_json:
        _line(f"ok: {len(report.chains)} chains, {report.events} events")


def _line(text: str) -> None:
    """One unwrapped plain line: auditors grep these and paste them into reports."""
    out.print(text, soft_wrap=True, markup=False, highlight=False)


def _print_keys(fingerprints: list[str]) -> None:
    for fingerprint in fingerprints:
        _line(f"trusted key: {fingerprint}")


@audit_app.command("fingerprint")
def audit_fingerprint(key: Annotated[Path, typer.Argument(help="public or private key file (PEM)")]) -> None:
    """Print a key's SHA-256 fingerprint, to pin in audit.trusted_key_fingerprints."""
    from bastion.audit.signing import Verifier

    _line(Verifier.from_file(key).fingerprint)


@audit_app.command("rotate-key")
def audit_rotate_key(
    new_key: Annotated[Path, typer.Option("--new-key", help="the new private signing key (bastion audit keygen)")],
    config: ConfigOption = None,
) -> None:
    """Hand over from the configured signing key to a new one: a record signed by both keys.

    Then point audit.signing_key_file at the new key and restart the writers; old signatures keep verifying."""
    import asyncio

    from bastion.audit import service

    platform = load_config(config)
    done = asyncio.run(service.rotate_key(platform, new_key, actor=_actor(platform)))
    _line(f"hand-over recorded: {done['old']} -> {done['new']}")
    _line("now point audit.signing_key_file at the new key and restart the writers")


@audit_app.command("export")
def audit_export(
    out_dir: Annotated[Path, typer.Option("--out", help="new (or empty) folder for the export")],
    fmt: Annotated[str, typer.Option("--format", help="csv, jsonl or parquet")] = "jsonl",
    tenant: Annotated[str | None, typer.Option("--tenant", help="tenant id (default: every tenant)")] = None,
    start: Annotated[str | None, typer.Option("--from", help="from this UTC date or ISO time (inclusive)")] = None,
    end: Annotated[str | None, typer.Option("--to", help="up to this UTC date or ISO time (exclusive)")] = None,
    content_for: Annotated[
        Path | None,
        typer.Option("--content-for", help="auditor's X25519 public key: seal the content keys to them (audited)"),
    ] = None,
    config: ConfigOption = None,
    allow_unverified: Annotated[
        bool, typer.Option("--allow-unverified", help="export even if the log does not verify (said in the manifest)")
    ] = False,
) -> None:
    """Export audit events with a signed manifest (verify it with `bastion audit verify --export`).

    Refuses a log that does not verify, unless --allow-unverified."""
    import asyncio

    from rich.progress import Progress

    from bastion.audit import service

    notes: list[str] = []
    with Progress(console=Console(stderr=True)) as progress:
        task = progress.add_task("exporting", total=None)
        platform = load_config(config)
        result = asyncio.run(
            service.export(
                platform,
                fmt,
                out_dir,
                tenant=tenant,
                start=service.parse_when(start, "--from"),
                end=service.parse_when(end, "--to"),
                on_total=lambda n: progress.update(task, total=n),
                on_progress=lambda n: progress.advance(task, n),
                allow_unverified=allow_unverified,
                notes=notes,
                actor=_actor(platform),
                content_for=content_for,
            )
        )
    for note in notes:
        err.print(f"note: {note}")
    if result.manifest.get("verification", {}).get("verified") is False:
        _line("warning: the log did not verify; the manifest says so (verification.problems)")
    out.print(f"{result.rows} events exported to {out_dir} (manifest sha256 {result.manifest_sha256})")


@audit_app.command("retention")
def audit_retention(config: ConfigOption = None) -> None:
    """Delete audit events past each tenant's retention, up to signed checkpoints; the deletion is audited."""
    import asyncio

    from bastion.audit import service

    platform = load_config(config)
    results = asyncio.run(service.retention(platform, actor=_actor(platform)))
    for r in results:
        out.print(f"{r.chain_id}: deleted {r.deleted} events up to sequence {r.up_to_sequence}")
    out.print(f"retention: {sum(r.deleted for r in results)} events deleted")


@audit_app.command("auditor-keygen")
def audit_auditor_keygen(
    private: Annotated[Path, typer.Option("--out", help="private key file to write (the public key: FILE.pub)")],
) -> None:
    """Create an auditor's X25519 key pair: exports made `--content-for FILE.pub` carry content only for them."""
    from bastion.audit.content_export import auditor_keygen

    public, fp = auditor_keygen(private)
    out.print(f"auditor key {fp}: private {private} (mode 0600), public {public}")


@audit_app.command("content")
def audit_content(
    chain: Annotated[str, typer.Option("--chain", help="chain id of the event")],
    sequence: Annotated[int, typer.Option("--sequence", help="sequence of the event in its chain")],
    export: Annotated[Path | None, typer.Option("--export", help="read from this export (offline)")] = None,
    auditor_key: Annotated[
        Path | None, typer.Option("--auditor-key", help="with --export: your X25519 private key")
    ] = None,
    public_key: Annotated[
        Path | None, typer.Option("--public-key", help="with --export: check the content keys' signature")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Decrypt one event's stored prompt and completion (auditors only); the reading is itself audited, or,
    offline, from an export made `--content-for` your key (that export was audited)."""
    import asyncio
    import json

    from bastion.audit import service

    if export is not None:
        from bastion.audit.content_export import read_exported_content
        from bastion.audit.errors import AuditError

        if auditor_key is None:
            raise AuditError("--export needs --auditor-key FILE")
        content = read_exported_content(export, auditor_key, chain, sequence, public_key)
        sys.stdout.write(json.dumps(content, ensure_ascii=False, indent=2) + "\n")
        return

    platform = load_config(config)
    content = asyncio.run(service.read_content(platform, chain, sequence, actor=_actor(platform)))
    sys.stdout.write(json.dumps(content, ensure_ascii=False, indent=2) + "\n")


@audit_app.command("erase")
def audit_erase(
    tenant: Annotated[str, typer.Option("--tenant", help="tenant name or id whose stored content is erased")],
    before: Annotated[
        str | None, typer.Option("--before", help="erase only content of UTC days before this date (YYYY-MM-DD)")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Erase a tenant's stored prompts and completions by destroying its data keys (crypto-shredding).

    The content becomes unreadable for everyone; every chain and checkpoint still verifies (rows keep their
    ciphertext). The erasure is itself an audited event. Run it as the table owner or a bastion_retention member.
    """
    import asyncio

    from bastion.audit import service

    when = service.parse_when(before, "--before")
    day = when.date() if when is not None else None
    platform = load_config(config)
    destroyed = asyncio.run(service.erase(platform, tenant, day, actor=_actor(platform)))
    scope = f"before {day.isoformat()}" if day else "all days"
    out.print(f"erased: {destroyed} data keys of tenant {tenant} ({scope}); that content is unreadable now")
