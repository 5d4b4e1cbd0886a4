"""The off-box witness (PostgreSQL): what the table owner does to checkpoints and chains, invisible in the
database alone, is caught against a witness folder or a syslog stream (a real UDP syslog receiver)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from audit_support import as_owner, engine, event, keys, owner, platform_file, rewrite_from, signer, verify_json
from sqlalchemy.ext.asyncio import AsyncEngine

from bastion.audit import AuditWriter
from bastion.audit.keyring import Keyring
from bastion.audit.signing import Signer
from bastion.audit.verify import DELETED, MODIFIED, verify_database
from bastion.audit.witness import DirectorySink, SyslogSink, Witness, read_witness
from bastion.audit.witnesscheck import CHAIN_DELETED, CHECKPOINT_DELETED, check_witness

pytestmark = pytest.mark.integration
__all__ = ["engine", "keys", "owner", "signer"]  # fixtures


async def _write(engine: AsyncEngine, signer: Signer, witness: Witness, counts: dict[str, int]) -> str:
    """Events per tenant, a head every 5 events of a chain, final heads on close; returns the writer id."""
    writer = await AuditWriter(engine, signer=signer, witness=witness, checkpoint_every=5, batch_size=5).start()
    for tenant, n in counts.items():
        for i in range(n):
            writer.enqueue(event(i, tenant))
            if i % 5 == 4:
                await writer.flush()
                await writer.checkpoint()
    await writer.close()
    assert writer.witness_failures == 0
    return writer.writer_id


async def _check(engine: AsyncEngine, signer: Signer, source: Path) -> list[tuple[str, int, str]]:
    report = await verify_database(engine, signer.verifier)
    await check_witness(engine, Keyring.of(signer.verifier), read_witness(source), report)
    return sorted((p.chain_id, p.sequence, p.what) for p in report.problems)


async def test_owner_deleting_heads_cutting_and_rewriting_is_caught_by_the_folder_witness(
    engine: AsyncEngine, owner: AsyncEngine, signer: Signer, tmp_path: Path
) -> None:
    folder = tmp_path / "worm"
    writer_id = await _write(engine, signer, Witness([DirectorySink(folder)]), {"acme": 20, "globex": 6, "initech": 3})
    acme, globex, initech = (f"{writer_id}:{t}" for t in ("acme", "globex", "initech"))
    assert await _check(engine, signer, folder) == []
    lines = sum(1 for path in folder.glob("*.jsonl") for _ in path.open())
    assert lines == 3 + 4 + 1 + 3  # 3 geneses, acme heads at 5/10/15/20, globex at 5, and 3 final heads

    # acme: every signed head but the genesis deleted, then rewritten and re-hashed from 8 on.
    await as_owner(owner, "DELETE FROM audit_checkpoints WHERE chain_id = :c AND sequence > 0", params={"c": acme})
    await rewrite_from(owner, acme, 8)
    # globex: the tail cut, with the heads that covered it.
    await as_owner(
        owner,
        "DELETE FROM audit_events WHERE chain_id = :c AND sequence >= 4",
        "DELETE FROM audit_checkpoints WHERE chain_id = :c AND sequence >= 4",
        params={"c": globex},
    )
    # initech: the whole chain with every head.
    await as_owner(
        owner,
        "DELETE FROM audit_events WHERE chain_id = :c",
        "DELETE FROM audit_checkpoints WHERE chain_id = :c",
        params={"c": initech},
    )
    alone = await verify_database(engine, signer.verifier)
    assert alone.ok  # the database alone cannot tell: only unsigned events remain
    assert {c.chain_id: c.unsigned_events for c in alone.chains} == {acme: 20, globex: 3}

    assert await _check(engine, signer, folder) == sorted(
        [
            *((acme, seq, CHECKPOINT_DELETED) for seq in (5, 10, 15, 20)),  # 20: the head and the final head
            *((acme, seq, MODIFIED) for seq in (10, 15, 20)),
            (globex, 5, CHECKPOINT_DELETED),
            (globex, 5, DELETED),
            (globex, 6, CHECKPOINT_DELETED),
            (globex, 6, DELETED),
            (initech, 0, CHAIN_DELETED),
        ]
    )


class _SyslogReceiver(asyncio.DatagramProtocol):
    """A syslog collector on loopback UDP: every datagram as one line of a file, as rsyslog would store it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(data.decode("utf-8", "replace").rstrip("\x00\n") + "\n")


@pytest.mark.slow
async def test_syslog_witness_through_the_cli(
    engine: AsyncEngine, owner: AsyncEngine, signer: Signer, keys: dict[str, Path], pg_url: str, tmp_path: Path
) -> None:
    collected = tmp_path / "syslog.log"
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: _SyslogReceiver(collected), sock=sock
    )
    try:
        sink = SyslogSink(f"udp://127.0.0.1:{sock.getsockname()[1]}")
        writer_id = await _write(engine, signer, Witness([sink]), {"acme": 7})
        sink.close()
        await asyncio.sleep(0.2)
    finally:
        transport.close()
    chain = f"{writer_id}:acme"
    text = collected.read_text()
    assert text.count("bastion-audit-witness: ") == 3  # genesis, head at 5, final at 7
    config = platform_file(tmp_path, pg_url, {})
    args = ("--config", str(config), "--public-key", str(keys["public"]), "--witness", str(collected))
    code, report, err = verify_json(*args)
    assert code == 0 and report["ok"], (err, report.get("problems"))

    # The owner removes the final head and the two events after the head at 5.
    await as_owner(
        owner,
        "DELETE FROM audit_checkpoints WHERE chain_id = :c AND kind = 'final'",
        "DELETE FROM audit_events WHERE chain_id = :c AND sequence > 5",
        params={"c": chain},
    )
    code, report, err = verify_json(*args)
    assert code == 1
    assert [(p["chain_id"], p["sequence"], p["what"]) for p in report["problems"]] == [
        (chain, 7, CHECKPOINT_DELETED),
        (chain, 7, DELETED),
    ]
