"""The durable writer: `enqueue` only appends to a deque; one task seals, batches, inserts, spools and checkpoints.

Durability order: a sealed row is in the database, or fsync'd in the spool, or held in memory and retried.
Every chain's life is signed: its first row carries a signed genesis (inserted in the same transaction, or
spooled with it), the heads that reached the database are signed every `checkpoint_interval_s` or
`checkpoint_every` events, `close()` signs a `final` head, and a writer that replays a dead writer's spool
signs that chain's head as `replayed`. Each signed head also goes to the witness (off the database), if any.
While the spool holds anything, new rows go to the spool too, so replay keeps each chain in order. A row
already stored identically (a batch whose commit succeeded but whose acknowledgement was lost) is skipped; a
*different* event at an existing (chain, sequence) is a conflict: never dropped, kept fsync'd in
`<spool>/conflicts/<writer id>.jsonl`, counted (`conflicts`, a metric) and logged as an error naming it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from bastion.audit.chain import GENESIS, ChainHead, chain_id_for, new_writer_id
from bastion.audit.content_keys import TenantKeys
from bastion.audit.crypto import ContentCipher, encrypt_with
from bastion.audit.errors import AuditError
from bastion.audit.events import Event, EventBase
from bastion.audit.signing import FINAL_KIND, GENESIS_KIND, HEAD_KIND, REPLAYED_KIND, Signer, checkpoint_row
from bastion.audit.spool import Spool, adopt_orphans
from bastion.audit.store import GENESIS_KEY, insert_checkpoints, insert_events, writer_engine
from bastion.audit.witness import Witness

log = logging.getLogger(__name__)
_SEAL_CHUNK = 64  # events sealed between yields to the event loop, so a big batch never stalls requests


class AuditWriter:
    """One writer per process: its chains are `<writer id>:<tenant>`; call from the writer's event loop."""

    def __init__(
        self,
        engine: AsyncEngine | str,
        *,
        spool_dir: Path | None = None,
        signer: Signer | None = None,
        cipher: ContentCipher | None = None,
        writer_id: str | None = None,
        batch_size: int = 1000,
        max_queue: int = 100_000,
        checkpoint_every: int = 10_000,
        checkpoint_interval_s: float = 60.0,
        retry_interval_s: float = 1.0,
        db_timeout_s: float = 15.0,
        witness: Witness | None = None,
    ) -> None:
        self._owns_engine = isinstance(engine, str)
        self.engine = writer_engine(engine) if isinstance(engine, str) else engine
        self.writer_id = writer_id or new_writer_id()
        self.signer, self.cipher, self.witness = signer, cipher, witness
        # Content is encrypted with each tenant's data key, wrapped by the master key `cipher` (content_keys.py).
        self.keyring = TenantKeys(self.engine, cipher) if cipher is not None else None
        self.batch_size, self.max_queue = batch_size, max_queue
        self.checkpoint_every, self.checkpoint_interval_s = checkpoint_every, checkpoint_interval_s
        self.retry_interval_s, self.db_timeout_s = retry_interval_s, db_timeout_s
        self._spool_dir = Path(spool_dir) if spool_dir else None
        self._spool: Spool | None = None
        self._orphans: list[Spool] = []
        self._queue: deque[Any] = deque()
        self._pending: list[dict[str, Any]] = []  # sealed, not yet durable
        self._heads: dict[str, ChainHead] = {}
        self._in_db: dict[str, tuple[int, str]] = {}  # chain -> (sequence, hash) of its last row in the database
        self._signed: dict[str, int] = {}  # chain -> the last sequence a signed head covers
        self._replayed: dict[str, tuple[int, str]] = {}  # dead writers' chains replayed, head not yet signed
        self._final = False  # the final heads are being signed: no new events
        self.witness_failures = 0
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._checkpoint_waiters: list[asyncio.Future[None]] = []
        self._enqueued = self._durable = 0
        self.dropped = 0  # events that could not be serialized (a bug, logged without content)
        self.conflicts = 0  # sealed events whose (chain, sequence) already held another event: an alarm
        self.conflicted: list[dict[str, Any]] = []  # those rows, when there is no spool folder to keep them in
        self._conflict_spool: Spool | None = None
        self._db_ok = True
        self._next_retry = 0.0
        self._last_checkpoint = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._closing = self._closed = False

    # --- the request path ------------------------------------------------------------------------

    def enqueue(self, event: Event) -> None:
        """Append and return: no I/O, no hashing, no lock (p99 well under 50 µs)."""
        if self._closed or self._final:
            raise AuditError("audit writer is closed")
        if not isinstance(event, EventBase):
            raise TypeError("enqueue takes an audit event (InferenceEvent, AdminEvent, ...)")
        self._queue.append(event)
        self._enqueued += 1
        if not self._wake.is_set():
            self._wake.set()

    @property
    def healthy(self) -> bool:
        """False when new events could not be made durable: strict tenants' requests should be refused."""
        if self._task is None or self._task.done() or self._closing:
            return False
        if self.queue_depth >= self.max_queue:
            return False
        return self._db_ok or (self._spool is not None and self._spool.ok)

    @property
    def queue_depth(self) -> int:
        return len(self._queue) + len(self._pending)

    @property
    def spool_bytes(self) -> int:
        """Bytes waiting in spools for the database (metrics: non-zero means the database was unreachable)."""
        spools = [*self._orphans, *([self._spool] if self._spool else [])]
        return sum(max(s.size - s.offset, 0) for s in spools)

    @property
    def spooling(self) -> bool:
        return self._backlog()

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> AuditWriter:
        if self._task is not None:
            return self
        if self._spool_dir is not None:
            own = self._spool_dir / f"{self.writer_id}.jsonl"
            self._orphans = list(adopt_orphans(self._spool_dir, own))
            self._spool = Spool(own)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"audit-writer-{self.writer_id}")
        return self

    async def flush(self, timeout: float | None = None) -> None:
        """Return once every event enqueued so far is durable: in the database or in the fsync'd spool."""
        target = self._enqueued
        try:
            async with asyncio.timeout(timeout):
                while self._durable < target:
                    self._check_task()
                    self._progress.clear()
                    self._wake.set()
                    await self._progress.wait()
        except TimeoutError:
            raise AuditError(f"{target - self._durable} audit events not durable yet (database and spool)") from None

    async def drain(self, timeout: float = 30.0) -> None:
        """Flush, then wait until the spool is replayed too (everything in the database)."""
        try:
            async with asyncio.timeout(timeout):
                await self.flush()
                self._next_retry = 0.0
                while self._backlog():
                    self._check_task()
                    self._progress.clear()
                    self._wake.set()
                    await self._progress.wait()
        except TimeoutError:
            raise AuditError(
                f"audit database still unreachable after {timeout:.0f}s; events are in the spool"
            ) from None

    async def checkpoint(self, timeout: float | None = None, *, final: bool = False) -> None:
        """Sign every chain head now (`final`: and close the chains); needs the database (rows, then heads)."""
        if self.signer is None:
            raise AuditError("no audit signing key configured (audit.signing_key_file)")
        timeout = self.db_timeout_s if timeout is None else timeout
        await self.flush(timeout)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._final = self._final or final
        self._checkpoint_waiters.append(future)
        self._next_retry = 0.0
        self._wake.set()
        try:
            async with asyncio.timeout(timeout):
                await future
        except TimeoutError:
            raise AuditError("audit checkpoint not written: database unreachable") from None

    async def close(self, timeout: float | None = None) -> None:
        """Flush, replay and checkpoint what the database takes; whatever it cannot take stays in the spool."""
        if self._closed:
            return
        timeout = self.db_timeout_s if timeout is None else timeout
        if self._task is not None and not self._task.done():
            try:
                await self.drain(timeout)
                if self.signer is not None:
                    await self.checkpoint(timeout, final=True)
            except AuditError as exc:
                log.warning(
                    "audit: closing with %d spooled bytes (%s); the next writer replays them", self.spool_bytes, exc
                )
            self._closing = True
            self._wake.set()
            await self._task
        self._closed = True
        if self._pending or self._queue:
            log.error("audit: %d events could not be made durable (no spool configured)", self.queue_depth)
        for spool in [*self._orphans, *([self._spool] if self._spool else [])]:
            spool.close()
        if self._conflict_spool is not None:
            self._conflict_spool.close(remove_if_empty=False)
        if self._owns_engine:
            await self.engine.dispose()

    def _check_task(self) -> None:
        if self._task is None:
            raise AuditError("audit writer not started")
        if self._task.done():
            raise AuditError("audit writer stopped unexpectedly")

    # --- the writer task -------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self._step()
            except Exception:
                log.exception("audit writer step failed; retrying")
                await asyncio.sleep(self.retry_interval_s)
            self._progress.set()
            if self._closing and not self._queue:
                return
            can_seal = self._queue and len(self._pending) < self.batch_size
            if can_seal or (self._pending and self._db_due()):
                continue
            if self._pending:  # database down and nowhere to spool: wait for the next retry, not for events
                await asyncio.sleep(max(self._next_retry - time.monotonic(), 0.001))
                continue
            self._wake.clear()
            busy = self._backlog() or self._checkpoint_waiters
            timeout = self.retry_interval_s if busy else self._checkpoint_due_in()
            try:
                async with asyncio.timeout(max(timeout, 0.001)):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _step(self) -> None:
        """Insert the sealed batch while sealing the next one (the database works while Python hashes)."""
        batch: list[dict[str, Any]] = []
        inflight: asyncio.Future[bool] | None = None
        if self._pending and not self._backlog() and self._db_due():
            batch, self._pending = self._pending, []
            inflight = asyncio.ensure_future(self._insert(batch))
        await self._seal_more()
        if inflight is not None:
            if await inflight:
                self._durable += len(batch)
                self._landed(batch)
            else:
                self._pending = batch + self._pending  # the failed batch stays first: chains keep their order
        if self._backlog() and self._db_due():
            await self._replay()
        if self._pending and (self._backlog() or not self._db_ok):
            self._to_spool()
        if self.signer is None or not self._db_due():
            return
        if self._replayed:
            await self._sign_replayed()
        if self._checkpoint_waiters and not self._pending and not self._backlog():
            if await self._write_checkpoints(FINAL_KIND if self._final else HEAD_KIND):
                waiters, self._checkpoint_waiters = self._checkpoint_waiters, []
                for future in waiters:
                    if not future.done():
                        future.set_result(None)
        elif self._checkpoint_due_in() <= 0:  # what reached the database is signed even while more is pending
            await self._write_checkpoints(HEAD_KIND)

    async def _seal_more(self) -> None:
        while self._queue and len(self._pending) < self.batch_size:
            for _ in range(min(_SEAL_CHUNK, len(self._queue), self.batch_size - len(self._pending))):
                event = self._queue.popleft()
                try:
                    content = event.event_content
                    key = await self._data_key(event) if content is not None else None
                    self._pending.append(self._seal(event, content, key))
                except Exception as exc:  # an event that cannot be serialized: drop it, never the chain
                    self.dropped += 1
                    self._durable += 1
                    log.error("audit event (%s) dropped: %s", getattr(event, "kind", "?"), type(exc).__name__)
            await asyncio.sleep(0)

    def _db_due(self) -> bool:
        return self._db_ok or time.monotonic() >= self._next_retry

    async def _data_key(self, event: Any) -> tuple[str, bytes] | None:
        if self.keyring is None or event.tenant_id is None:
            return None
        cached = self.keyring.cached(event.tenant_id, event.occurred_at)
        if cached is not None or not self._db_ok:  # database down: never wait on it here (content dropped)
            return cached
        return await self.keyring.current(event.tenant_id, event.occurred_at)

    def _seal(self, event: Any, content: Any = None, key: tuple[str, bytes] | None = None) -> dict[str, Any]:
        row = event.record()
        chain_id = chain_id_for(self.writer_id, row["tenant_id"])
        head = self._heads.get(chain_id)
        opening = head is None
        if head is None:
            head = ChainHead(chain_id)
        row["content"] = None
        if content is not None:
            if key is not None:
                plain = content.model_dump(mode="json")
                row["content"] = encrypt_with(key[1], key[0], plain, chain_id, head.sequence + 1)
            elif self.cipher is None:
                row["payload"]["content_dropped"] = "no content key configured"
            else:
                row["payload"]["content_dropped"] = "tenant data key unavailable"
        sealed = head.seal(row)  # may raise: then the chain is not opened by this event
        if opening:
            self._heads[chain_id] = head
            if self.signer is not None:  # the chain opens with a signed genesis, stored with its first row
                sealed[GENESIS_KEY] = checkpoint_row(self.signer, chain_id, 0, GENESIS, GENESIS_KIND)
        return sealed

    def _backlog(self) -> bool:
        return bool(self._orphans) or (self._spool is not None and self._spool.pending)

    def _landed(self, rows: list[dict[str, Any]], *, replayed: bool = False) -> None:
        """Rows are in the database: their heads may now be signed; their geneses go to the witness."""
        heads = self._replayed if replayed else self._in_db
        geneses = []
        for row in rows:
            heads[row["chain_id"]] = (row["sequence"], row["hash"])
            genesis = row.get(GENESIS_KEY)
            if genesis is not None:
                geneses.append(genesis)
        if geneses:
            self._witness(geneses)

    def _witness(self, heads: list[dict[str, Any]]) -> None:
        if self.witness is None:
            return
        try:
            self.witness.append(heads)
        except Exception as exc:  # the database copy stands; verify --witness will name the missing heads
            self.witness_failures += 1
            log.error("audit witness write failed (%s): %d signed heads not witnessed", type(exc).__name__, len(heads))

    async def _db(self, fn: Any, rows: list[dict[str, Any]]) -> bool:
        try:
            async with asyncio.timeout(self.db_timeout_s), self.engine.begin() as conn:
                await fn(conn, rows)
        except Exception as exc:  # any failure means "not known to be committed": spool and replay later
            if self._db_ok:
                log.warning("audit database unavailable (%s); spooling", type(exc).__name__)
            self._db_ok = False
            self._next_retry = time.monotonic() + self.retry_interval_s
            return False
        if not self._db_ok:
            log.info("audit database reachable again")
        self._db_ok = True
        return True

    async def _insert(self, rows: list[dict[str, Any]]) -> bool:
        """Insert a batch with the geneses its rows carry, in one transaction (a chain is never in the database
        unopened); conflicting rows (another event at their chain and sequence) go to quarantine."""
        conflicts: list[dict[str, Any]] = []

        async def run(conn: Any, batch: list[dict[str, Any]]) -> None:
            conflicts[:] = await insert_events(conn, batch)
            geneses = [r[GENESIS_KEY] for r in batch if GENESIS_KEY in r]
            if geneses:
                await insert_checkpoints(conn, geneses)

        if not await self._db(run, rows):
            return False
        if conflicts:
            self._quarantine(conflicts)
        return True

    def _quarantine(self, rows: list[dict[str, Any]]) -> None:
        """Keep events the database would not take at their position: fsync'd for the operator, never dropped."""
        self.conflicts += len(rows)
        where = "in memory only (no spool folder)"
        try:
            if self._spool_dir is None:
                raise AuditError("no spool folder")
            if self._conflict_spool is None:
                self._conflict_spool = Spool(self._spool_dir / "conflicts" / f"{self.writer_id}.jsonl")
            self._conflict_spool.append(rows)
            where = str(self._conflict_spool.path)
        except AuditError:
            self.conflicted.extend(rows)
        for row in rows:
            log.error(
                "audit conflict: chain %s sequence %d already holds a different event; ours (hash %s) kept %s",
                row["chain_id"],
                row["sequence"],
                row["hash"],
                where,
            )

    def _to_spool(self) -> None:
        """Pending rows to the fsync'd spool; without a spool (or if it fails) they stay pending, in memory."""
        if self._spool is None:
            return
        try:
            self._spool.append(self._pending)
        except AuditError as exc:
            log.error("%s", exc)
            return
        self._durable += len(self._pending)
        self._pending = []

    async def _replay(self) -> None:
        """Orphan spools first (other writers' chains), then our own, in file order, a batch at a time."""
        for spool in [*self._orphans, *([self._spool] if self._spool else [])]:
            while spool.pending:
                rows, end = spool.read(self.batch_size)
                if rows and not await self._insert(rows):
                    return
                self._landed(rows, replayed=spool is not self._spool)
                spool.advance(end)
                if not rows:
                    break
            if spool is not self._spool:
                spool.close()
                self._orphans.remove(spool)

    def _checkpoint_due_in(self) -> float:
        if self.signer is None:
            return 3600.0
        signed = self._signed
        if any(seq - signed.get(chain, 0) >= self.checkpoint_every for chain, (seq, _) in self._in_db.items()):
            return 0.0
        return self._last_checkpoint + self.checkpoint_interval_s - time.monotonic()

    async def _write_checkpoints(self, kind: str) -> bool:
        """Sign the heads that are in the database (all of them for `final`, else those that moved)."""
        assert self.signer is not None
        heads = [(c, s, h) for c, (s, h) in self._in_db.items() if kind == FINAL_KIND or s > self._signed.get(c, 0)]
        rows = [checkpoint_row(self.signer, chain, seq, hash_hex, kind) for chain, seq, hash_hex in heads]
        if rows and not await self._db(insert_checkpoints, rows):
            return False
        for chain, seq, _ in heads:
            self._signed[chain] = seq
            if chain in self._heads:
                self._heads[chain].checkpointed = seq
        self._last_checkpoint = time.monotonic()
        self._witness(rows)
        return True

    async def _sign_replayed(self) -> None:
        """A dead writer's chains, once replayed, get a signed `replayed` head: no one will extend them."""
        assert self.signer is not None
        done = [(c, s, h) for c, (s, h) in self._replayed.items() if c not in self._heads]
        rows = [checkpoint_row(self.signer, chain, seq, hash_hex, REPLAYED_KIND) for chain, seq, hash_hex in done]
        if self._orphans or (rows and not await self._db(insert_checkpoints, rows)):
            return  # after every orphan spool is in, or at the next retry
        self._replayed.clear()
        self._witness(rows)
