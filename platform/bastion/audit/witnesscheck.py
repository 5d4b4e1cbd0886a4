"""The database checked against an off-box witness (`bastion audit verify --witness SOURCE`).

Every witnessed head whose signature a trusted key made must still be in the database, its chain must still
reach it (unless a proven retention anchor lies past it), and the row at that sequence must have the witnessed
hash. Heads in the database that the witness never saw are reported too: a witness that missed them was
failing, or they were added later.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from bastion.audit.keyring import Keyring
from bastion.audit.store import ANCHORS, signed_heads
from bastion.audit.verify import BAD_SIGNATURE, DELETED, MODIFIED, Problem, VerifyReport
from bastion.audit.witness import db_hashes

CHECKPOINT_DELETED, CHAIN_DELETED, UNWITNESSED = "checkpoint deleted", "chain deleted", "unwitnessed"


async def check_witness(
    engine: AsyncEngine, keyring: Keyring, witnessed: list[SimpleNamespace], report: VerifyReport
) -> None:
    problems: list[Problem] = []
    by_chain: dict[str, list[SimpleNamespace]] = defaultdict(list)
    for head in witnessed:
        if keyring.verify_head(head):
            by_chain[head.chain_id].append(head)
        else:
            detail = f"witnessed {head.kind} head does not verify with a trusted key (ignored)"
            problems.append(Problem(head.chain_id, head.sequence, BAD_SIGNATURE, detail))
    in_db = {(h.chain_id, h.sequence, h.kind, h.hash) for h in await signed_heads(engine)}
    async with engine.connect() as conn:
        anchors = {a.chain_id: a.sequence for a in (await conn.execute(select(ANCHORS))).all()}
    results = {c.chain_id: c for c in report.chains}
    for chain_id, heads in sorted(by_chain.items()):
        result = results.get(chain_id)
        if result is None:
            detail = f"the witness holds {len(heads)} signed heads of a chain the database no longer has"
            problems.append(Problem(chain_id, 0, CHAIN_DELETED, detail))
            continue
        sequences = sorted({h.sequence for h in heads if h.sequence > anchors.get(chain_id, 0)})
        hashes = await db_hashes(engine, chain_id, sequences) if sequences else {}
        for head in sorted(heads, key=lambda h: (h.sequence, h.kind)):
            if (chain_id, head.sequence, head.kind, head.hash) not in in_db:
                detail = f"the witness holds a signed {head.kind} head the database lacks"
                problems.append(Problem(chain_id, head.sequence, CHECKPOINT_DELETED, detail))
            if head.sequence not in hashes:
                if head.sequence in sequences:
                    detail = f"witnessed head at {head.sequence}; the chain now ends at {result.last_sequence}"
                    problems.append(Problem(chain_id, head.sequence, DELETED, detail))
            elif hashes[head.sequence] != head.hash:
                detail = "the row differs from the witnessed signed head: the chain was rewritten"
                problems.append(Problem(chain_id, head.sequence, MODIFIED, detail))
    seen = {(h.chain_id, h.sequence, h.kind, h.hash) for h in witnessed}
    for chain_id, sequence, kind, _hash_hex in sorted(in_db - seen):
        detail = f"signed {kind} head not in the witness (the witness failed, or the head was added later)"
        problems.append(Problem(chain_id, sequence, UNWITNESSED, detail))
    report.extra.extend(_dedupe(problems))


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen: set[tuple[str, int, str]] = set()
    out = []
    for p in problems:
        if (p.chain_id, p.sequence, p.what) not in seen:
            seen.add((p.chain_id, p.sequence, p.what))
            out.append(p)
    return out
