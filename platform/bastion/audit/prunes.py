"""Signed retention records: what a prune deleted, under which policy, by whom; checked against every anchor.

A retention run writes one `retention` record per chain it prunes, in the transaction that deletes the rows
and moves the anchor, signed with the writers' key. Verification accepts an anchor only when the newest
trusted record of that chain names exactly that anchor, the deleted events were older than the record's
cut-off, the cut-off is the policy's (pruned_at minus days), and the policy is not shorter than the one the
platform file and the tenants table set now.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from bastion.audit.events import format_time, parse_time
from bastion.audit.keyring import Keyring
from bastion.audit.signing import Signer, record_message

RETENTION = "retention"


def retention_record(
    signer: Signer,
    *,
    chain_id: str,
    tenant_id: str | None,
    days: int,
    cutoff: datetime,
    pruned_at: datetime,
    from_sequence: int,
    to_sequence: int,
    deleted: int,
    total_deleted: int,
    last_deleted_at: datetime,
    checkpoint_hash: str,
    actor: str,
) -> dict[str, Any]:
    body = {
        "chain_id": chain_id,
        "tenant_id": tenant_id,
        "policy_days": days,
        "cutoff": format_time(cutoff),
        "pruned_at": format_time(pruned_at),
        "from_sequence": from_sequence,
        "to_sequence": to_sequence,
        "deleted": deleted,
        "total_deleted": total_deleted,
        "last_deleted_at": format_time(last_deleted_at),
        "checkpoint_hash": checkpoint_hash,
        "actor": actor,
    }
    return {
        "kind": RETENTION,
        "chain_id": chain_id,
        "key_id": signer.key_id,
        "body": body,
        "signed_at": pruned_at,
        "signature": signer.sign(record_message(RETENTION, body)),
    }


def check_anchor(
    anchor: Any, records: list[Any], keyring: Keyring, policy_days: int | None, now: datetime
) -> str | None:
    """Why this anchor is not a proven retention, or None. `records`: the chain's retention records, oldest first."""
    trusted = [r for r in records if keyring.verify_record(r)]
    if len(trusted) < len(records):
        return "a retention record's signature does not verify"
    if not trusted:
        return "no signed retention record for this anchor (rows deleted outside retention)"
    body = trusted[-1].body
    if (body["to_sequence"], body["checkpoint_hash"]) != (anchor.sequence, anchor.hash):
        return f"anchor at {anchor.sequence} but the last signed retention record ends at {body['to_sequence']}"
    if body["total_deleted"] != anchor.deleted:
        return f"anchor counts {anchor.deleted} deleted rows, the signed record {body['total_deleted']}"
    cutoff, pruned = parse_time(body["cutoff"]), parse_time(body["pruned_at"])
    if cutoff != pruned - timedelta(days=int(body["policy_days"])) or pruned > now:
        return f"cut-off {body['cutoff']} is not pruned_at minus {body['policy_days']} days"
    if parse_time(body["last_deleted_at"]) >= cutoff:
        return f"deleted events up to {body['last_deleted_at']}, newer than the cut-off {body['cutoff']}"
    if policy_days is not None and int(body["policy_days"]) < policy_days:
        return f"pruned after {body['policy_days']} days; the policy keeps {policy_days} days"
    previous = 0
    for record in trusted:  # each prune continues where the last one stopped
        if record.body["from_sequence"] != previous + 1:
            return f"retention record {record.id} starts at {record.body['from_sequence']}, not {previous + 1}"
        previous = record.body["to_sequence"]
    return None
