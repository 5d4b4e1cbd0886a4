"""Verification of the database: every chain walked in sequence order, every signed head and record checked.

For each chain the walk starts at its retention anchor (a signed head named by a signed retention record) or
at genesis, and lists every problem it finds (the walk re-synchronises after each one):

- `modified`: the row's columns no longer hash to its stored hash (or differ from a signed head);
- `deleted`: a sequence number is missing (a gap), or the chain ends before a signed head;
- `inserted`: a row that links to no event of the chain, or that later rows link past;
- `reordered`: the row belongs elsewhere in the chain (its predecessor and the true successor both exist);
- `bad prev hash`: only the link to the predecessor was altered, or the link cannot be explained;
- `bad signature`: a signed head, anchor or record whose signature does not verify with a trusted key;
- `no genesis`: the chain has no signed genesis (it was not opened by a writer holding a trusted key);
- `after final`: events after the chain's signed final head (its writer had closed it);
- `unsigned`: events no signature covers, older than the `max_unsigned_s` bound;
- `retention`: an anchor without a matching signed retention record, or one the policy does not allow.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from bastion.audit.chain import GENESIS, SYSTEM_TENANT, hashes_to_stored, row_hash
from bastion.audit.events import format_time, utcnow
from bastion.audit.keyring import HANDOVER, Keyring
from bastion.audit.prunes import RETENTION, check_anchor
from bastion.audit.signing import GENESIS_KIND, LEGACY_KIND, TERMINAL_KINDS, Verifier
from bastion.audit.store import ANCHORS, RECORDS, chain_ids, chain_rows, find_one, signed_heads, signed_records

MODIFIED, DELETED, INSERTED, REORDERED = "modified", "deleted", "inserted", "reordered"
BAD_PREV, BAD_SIGNATURE = "bad prev hash", "bad signature"
NO_GENESIS, AFTER_FINAL, UNSIGNED, RETENTION_PROBLEM = "no genesis", "after final", "unsigned", "retention"
_RESYNC_WINDOW = 16  # after a broken link, rows linking to any of the last few rows are not reported again


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
    start_sequence: int = 0  # the anchor verification started from; 0 = genesis
    last_sequence: int = 0
    events: int = 0
    checkpoints: int = 0  # signed heads of every kind, the genesis included
    signed_sequence: int = 0  # the highest sequence a trusted signature covers
    unsigned_events: int = 0  # events after it
    unsigned_since: str | None = None  # the time of the first of them
    legacy: bool = False  # opened before signed genesis records existed (only v1 checkpoints)
    final_sequence: int | None = None  # where a signed final (or replayed) head closed the chain
    problems: list[Problem] = field(default_factory=list)

    @property
    def problem(self) -> Problem | None:
        return min(self.problems, key=lambda p: p.sequence) if self.problems else None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["problems"] = [asdict(p) for p in self.problems]
        return out


@dataclass
class VerifyReport:
    chains: list[ChainResult] = field(default_factory=list)
    trusted_keys: list[str] = field(default_factory=list)  # fingerprints, pinned or introduced by hand-over
    extra: list[Problem] = field(default_factory=list)  # problems outside any chain (hand-overs, witness)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def events(self) -> int:
        return sum(c.events for c in self.chains)

    @property
    def problems(self) -> list[Problem]:
        return [p for c in self.chains for p in sorted(c.problems, key=lambda p: p.sequence)] + self.extra

    @property
    def first_problem(self) -> Problem | None:
        problems = self.problems
        return problems[0] if problems else None

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "trusted_keys": self.trusted_keys,
            "chains": len(self.chains),
            "events": self.events,
            "problems": [asdict(p) for p in self.problems],
            "per_chain": [c.to_json() for c in self.chains],
        }


@dataclass
class Options:
    until: dict[str, int] | None = None  # verify only a chain's prefix (retention's own check)
    max_unsigned_s: float | None = None
    policies: dict[str | None, int] | None = None  # tenant -> retention days now (None: the system chain)
    now: datetime | None = None


def _ring(verifier: Verifier | Keyring) -> Keyring:
    return verifier if isinstance(verifier, Keyring) else Keyring.of(verifier)


async def verify_database(
    engine: AsyncEngine,
    verifier: Verifier | Keyring,
    chains: list[str] | None = None,
    *,
    until: dict[str, int] | None = None,
    max_unsigned_s: float | None = None,
    policies: dict[str | None, int] | None = None,
) -> VerifyReport:
    """Check every chain (or the given ones) with the trusted keys and those their hand-overs introduce."""
    keyring = _ring(verifier)
    report = VerifyReport()
    for text in keyring.follow_handovers(await signed_records(engine, HANDOVER)):
        report.extra.append(Problem("-", 0, BAD_SIGNATURE, text))
    report.trusted_keys = keyring.fingerprints
    options = Options(until, max_unsigned_s, policies, utcnow())
    for chain_id in chains if chains is not None else await chain_ids(engine):
        report.chains.append(await verify_chain(engine, keyring, chain_id, options=options))
    return report


def tenant_of(chain_id: str) -> str | None:
    tenant = chain_id.rsplit(":", 1)[-1]
    return None if tenant == SYSTEM_TENANT else tenant


async def verify_chain(
    engine: AsyncEngine,
    verifier: Verifier | Keyring,
    chain_id: str,
    until: int | None = None,
    *,
    options: Options | None = None,
) -> ChainResult:
    keyring, options = _ring(verifier), options or Options()
    until = until if until is not None else (options.until or {}).get(chain_id)
    result = ChainResult(chain_id)
    heads = await signed_heads(engine, chain_id)
    async with engine.connect() as conn:
        anchor = (await conn.execute(select(ANCHORS).where(ANCHORS.c.chain_id == chain_id))).first()
    valid = []
    for head in heads:
        if keyring.verify_head(head):
            valid.append(head)
        else:
            detail = f"{head.kind} head signed by key {head.key_id} does not verify with a trusted key"
            result.problems.append(Problem(chain_id, head.sequence, BAD_SIGNATURE, detail))
    result.checkpoints = len(heads)
    _lifecycle(result, valid)
    signed: dict[int, str] = {h.sequence: h.hash for h in valid if h.kind != GENESIS_KIND}
    prev, start = GENESIS, 0
    if anchor is not None:
        prev, start = anchor.hash, anchor.sequence
        if signed.get(start) != prev:
            result.problems.append(Problem(chain_id, start, BAD_SIGNATURE, "retention anchor is not a signed head"))
        records = [r for r in await signed_records(engine, RETENTION) if r.chain_id == chain_id]
        policy = (options.policies or {}).get(tenant_of(chain_id))
        why = check_anchor(anchor, records, keyring, policy, options.now or utcnow())
        if why is not None:
            result.problems.append(Problem(chain_id, start, RETENTION_PROBLEM, why))
    result.start_sequence = result.last_sequence = start
    covered = max([start, *(h.sequence for h in valid)])
    walker = _Walker(engine, chain_id, signed, result, covered)
    await walker.walk(start, prev, until)
    if until is None:
        _tail(result, signed, covered, walker.unsigned_since, options)
    return result


def _lifecycle(result: ChainResult, valid: list[Any]) -> None:
    """A trusted genesis opens the chain (or it is a legacy chain); a trusted final head closes it."""
    chain_id = result.chain_id
    genesis = [h for h in valid if h.kind == GENESIS_KIND and h.sequence == 0 and h.hash == GENESIS]
    if not genesis:
        if any(h.kind == LEGACY_KIND for h in valid):
            result.legacy = True
        else:
            detail = "no signed genesis: the chain was not opened by a writer holding a trusted key"
            result.problems.append(Problem(chain_id, 0, NO_GENESIS, detail))
    finals = [h.sequence for h in valid if h.kind in TERMINAL_KINDS]
    result.final_sequence = min(finals) if finals else None


def _tail(result: ChainResult, signed: dict[int, str], covered: int, since: datetime | None, options: Options) -> None:
    chain_id = result.chain_id
    beyond = [seq for seq in signed if seq > result.last_sequence]
    if beyond:
        detail = f"chain ends at {result.last_sequence} but a head at {max(beyond)} was signed (tail cut)"
        result.problems.append(Problem(chain_id, result.last_sequence + 1, DELETED, detail))
    final = result.final_sequence
    if final is not None and result.last_sequence > final:
        detail = f"{result.last_sequence - final} events after the signed final head at {final}"
        result.problems.append(Problem(chain_id, final + 1, AFTER_FINAL, detail))
    result.signed_sequence = min(covered, result.last_sequence) if result.last_sequence else covered
    result.unsigned_events = max(result.last_sequence - covered, 0)
    result.unsigned_since = format_time(since) if since is not None and result.unsigned_events else None
    bound = options.max_unsigned_s
    if bound is not None and result.unsigned_events and since is not None:
        age = ((options.now or utcnow()) - since).total_seconds()
        if age > bound:
            detail = f"{result.unsigned_events} events no signature covers, the first {age:.0f}s old (bound {bound:g}s)"
            result.problems.append(Problem(chain_id, covered + 1, UNSIGNED, detail))


class _Walker:
    """Walks one chain's rows; after a problem it re-synchronises on the stored hash and goes on."""

    def __init__(
        self, engine: AsyncEngine, chain_id: str, signed: dict[int, str], result: ChainResult, covered: int
    ) -> None:
        self.engine, self.chain_id, self.signed, self.result = engine, chain_id, signed, result
        self.covered = covered
        self.unsigned_since: datetime | None = None
        self._recent: deque[str] = deque(maxlen=_RESYNC_WINDOW)
        self._quiet_until = 0  # link problems up to this sequence are echoes of one already reported

    def _report(self, problem: Problem) -> None:
        self.result.problems.append(problem)

    async def walk(self, start: int, prev: str, until: int | None) -> None:
        expected, prev_link = start + 1, None
        last_good_signed = start
        async for row in chain_rows(self.engine, self.chain_id, after=start, until=until):
            seq = row["sequence"]
            gap = seq > expected
            if gap:
                self._report(Problem(self.chain_id, expected, DELETED, f"sequence {expected} missing, next is {seq}"))
                self._quiet_until = seq + _RESYNC_WINDOW
            content_ok = hashes_to_stored(row)
            if row["prev_hash"] != prev and not gap:
                echo = seq <= self._quiet_until and row["prev_hash"] in self._recent
                if not echo:
                    self._report(await _explain(self.engine, self.chain_id, seq, row, prev, prev_link, content_ok))
                    self._quiet_until = seq + _RESYNC_WINDOW
                    content_ok = True  # one problem per row
            if not content_ok:
                self._report(Problem(self.chain_id, seq, MODIFIED, "columns do not hash to the stored hash"))
            if seq in self.signed:
                if self.signed[seq] != row["hash"]:
                    detail = (
                        "differs from the signed head: the chain was rewritten (and re-hashed) somewhere after "
                        f"sequence {last_good_signed}, the last signed head that still matches"
                    )
                    self._report(Problem(self.chain_id, seq, MODIFIED, detail))
                else:
                    last_good_signed = seq
            if seq == self.covered + 1:
                self.unsigned_since = row["occurred_at"]
            self._recent.append(row["hash"])
            prev, prev_link = row["hash"], row["prev_hash"]
            self.result.last_sequence, self.result.events = seq, self.result.events + 1
            expected = seq + 1


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


__all__ = ["RECORDS", "ChainResult", "Options", "Problem", "VerifyReport", "verify_chain", "verify_database"]
