"""Verification of the database: every chain walked in sequence order, every checkpoint's signature checked.

For each chain the walk starts at its retention anchor (a signed checkpoint) or at genesis, and stops at the
first bad event, which it names with what went wrong:

- `modified`: the row's columns no longer hash to its stored hash (or differ from a signed checkpoint);
- `deleted`: a sequence number is missing (a gap), or the chain ends before a signed checkpoint;
- `inserted`: a row that links to no event of the chain, or that later rows link past;
- `reordered`: the row belongs elsewhere in the chain (its predecessor and the true successor both exist);
- `bad prev hash`: only the link to the predecessor was altered, or the link cannot be explained;
- `bad signature`: a checkpoint or retention anchor whose Ed25519 signature does not verify.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from bastion.audit.chain import GENESIS, row_hash
from bastion.audit.signing import Verifier
from bastion.audit.store import ANCHORS, CHECKPOINTS, chain_ids, chain_rows, find_one

MODIFIED, DELETED, INSERTED, REORDERED = "modified", "deleted", "inserted", "reordered"
BAD_PREV, BAD_SIGNATURE = "bad prev hash", "bad signature"


@dataclass(frozen=True)
class Problem:
    chain_id: str
    sequence: int
    what: str
    detail: str

    def __str__(self) -> str:
        return f"chain {self.chain_id} sequence {self.sequence}: {self.what} ({self.detail})"


@dataclass
class ChainResult:
    chain_id: str
    start_sequence: int = 0  # the anchor checkpoint verification started from; 0 = genesis
    last_sequence: int = 0
    events: int = 0
    checkpoints: int = 0
    problem: Problem | None = None


@dataclass
class VerifyReport:
    chains: list[ChainResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.problem is None for c in self.chains)

    @property
    def events(self) -> int:
        return sum(c.events for c in self.chains)

    @property
    def problems(self) -> list[Problem]:
        return [c.problem for c in self.chains if c.problem is not None]

    @property
    def first_problem(self) -> Problem | None:
        problems = self.problems
        return problems[0] if problems else None


async def verify_database(
    engine: AsyncEngine, verifier: Verifier, chains: list[str] | None = None, *, until: dict[str, int] | None = None
) -> VerifyReport:
    """Check every chain (or the given ones); `until` limits a chain's walk (retention checks only its prefix)."""
    report = VerifyReport()
    for chain_id in chains if chains is not None else await chain_ids(engine):
        report.chains.append(await verify_chain(engine, verifier, chain_id, until=(until or {}).get(chain_id)))
    return report


async def _checkpoints(engine: AsyncEngine, chain_id: str) -> tuple[Any, list[Any]]:
    async with engine.connect() as conn:
        anchor = (await conn.execute(select(ANCHORS).where(ANCHORS.c.chain_id == chain_id))).first()
        query = select(CHECKPOINTS).where(CHECKPOINTS.c.chain_id == chain_id).order_by(CHECKPOINTS.c.sequence)
        return anchor, list((await conn.execute(query)).all())


async def verify_chain(engine: AsyncEngine, verifier: Verifier, chain_id: str, until: int | None = None) -> ChainResult:
    result = ChainResult(chain_id)
    anchor, checkpoints = await _checkpoints(engine, chain_id)
    problems: list[Problem] = []
    for cp in checkpoints:
        if not verifier.verify_checkpoint(cp.key_id, cp.chain_id, cp.sequence, cp.hash, bytes(cp.signature)):
            problems.append(Problem(chain_id, cp.sequence, BAD_SIGNATURE, "checkpoint signature does not verify"))
            break
    result.checkpoints = len(checkpoints)
    signed = {cp.sequence: cp.hash for cp in checkpoints}
    prev, start = GENESIS, 0
    if anchor is not None:
        prev, start = anchor.hash, anchor.sequence
        if signed.get(start) != prev:
            problems.append(Problem(chain_id, start, BAD_SIGNATURE, "retention anchor is not a signed checkpoint"))
    result.start_sequence = result.last_sequence = start
    walk = await _walk(engine, chain_id, start, prev, signed, result, until)
    if walk is None and until is None:
        beyond = [seq for seq in signed if seq > result.last_sequence]
        if beyond:
            detail = f"chain ends at {result.last_sequence} but checkpoint {max(beyond)} was signed"
            walk = Problem(chain_id, result.last_sequence + 1, DELETED, detail)
    if walk is not None:
        problems.append(walk)
    result.problem = min(problems, key=lambda p: p.sequence) if problems else None
    return result


async def _walk(
    engine: AsyncEngine,
    chain_id: str,
    start: int,
    prev: str,
    signed: dict[int, str],
    result: ChainResult,
    until: int | None,
) -> Problem | None:
    expected, prev_link = start + 1, None
    async for row in chain_rows(engine, chain_id, after=start, until=until):
        if row["sequence"] > expected:
            return Problem(chain_id, expected, DELETED, f"sequence {expected} missing, next is {row['sequence']}")
        content_ok = row_hash(row["prev_hash"], row) == row["hash"]
        if row["prev_hash"] != prev:
            return await _explain(engine, chain_id, expected, row, prev, prev_link, content_ok)
        if not content_ok:
            return Problem(chain_id, expected, MODIFIED, "columns do not hash to the stored hash")
        if expected in signed and signed[expected] != row["hash"]:
            return Problem(chain_id, expected, MODIFIED, "differs from the signed checkpoint: the chain was rewritten")
        prev, prev_link = row["hash"], row["prev_hash"]
        result.last_sequence, result.events = expected, result.events + 1
        expected += 1
    return None


async def _explain(
    engine: AsyncEngine,
    chain_id: str,
    seq: int,
    row: dict[str, Any],
    prev: str,
    prev_link: str | None,
    content_ok: bool,
) -> Problem:
    """The link at `seq` is broken: look at which rows still link where, to say what happened."""
    if row_hash(prev, row) == row["hash"]:
        return Problem(chain_id, seq, BAD_PREV, "only the prev_hash column was altered")
    successor = await find_one(engine, chain_id, prev_hash=prev)  # the event that really follows seq - 1
    predecessor = await find_one(engine, chain_id, hash=row["prev_hash"])  # the event this row follows
    if successor and predecessor:
        return Problem(
            chain_id,
            seq,
            REORDERED,
            f"it follows {predecessor['sequence']}; the event following {seq - 1} is at {successor['sequence']}",
        )
    if successor:
        return Problem(
            chain_id, seq, INSERTED, f"links to no event; the event following {seq - 1} is at {successor['sequence']}"
        )
    if predecessor and prev_link is not None and row["prev_hash"] == prev_link:
        return Problem(chain_id, seq - 1, INSERTED, f"event {seq} links past it to {predecessor['sequence']}")
    if not predecessor and not content_ok:
        return Problem(chain_id, seq, DELETED, f"the event following {seq - 1} is gone and later events renumbered")
    return Problem(chain_id, seq, BAD_PREV, f"does not link to event {seq - 1} (rewritten, or this one forged)")
