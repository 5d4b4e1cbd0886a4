"""`bastion bench audit`: events per second written in batches, the cost of `enqueue` on the request path, and
events per second verified.

Run it against a scratch database: it writes real, verifiable audit events for a tenant named `bench`, signed
(genesis, a head every 10,000 events, final head) with a throw-away key and witnessed in a temporary folder,
as a production writer does.
"""

from __future__ import annotations

import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bastion.audit.chain import chain_id_for
from bastion.audit.events import AuditSpeculation, InferenceEvent
from bastion.audit.signing import Signer
from bastion.audit.verify import verify_database
from bastion.audit.witness import DirectorySink, Witness
from bastion.audit.writer import AuditWriter
from bastion.db.session import create_engine


def _event(i: int) -> InferenceEvent:
    return InferenceEvent(
        tenant_id="bench",
        key_id="k" * 16,
        model="bench-model",
        profile="fast-agentic",
        routing_reason="tools",
        replica="replica-0",
        status=200,
        prompt_tokens=512,
        completion_tokens=128,
        latency_ms=812.5,
        ttft_ms=41.2,
        speculation=AuditSpeculation(method="mtp", num_speculative_tokens=2, draft_tokens=170, accepted_tokens=120),
        client_address="10.0.0.7",
        request_id=f"bench-{i}",
        trace_id=f"{i:032x}",
    )


def _percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0


async def bench_audit(database_url: str, events: int = 50_000, batch_size: int = 2000) -> dict[str, Any]:
    """Enqueue `events` events as fast as possible, then time until all are in the database."""
    clock = time.perf_counter_ns
    prepared, build = [], []
    for i in range(events):  # building the event is the gateway's cost, reported apart from enqueue's
        t0 = clock()
        prepared.append(_event(i))
        build.append(clock() - t0)
    signer = Signer(Ed25519PrivateKey.generate())
    with tempfile.TemporaryDirectory() as spool:
        witness = Witness([DirectorySink(Path(spool) / "witness")])
        writer = AuditWriter(database_url, spool_dir=Path(spool), batch_size=batch_size, signer=signer, witness=witness)
        costs: list[int] = []
        # The request path's cost alone: enqueue with the writer idle (it only appends to a deque).
        for event in prepared[: min(events, 20_000)]:
            t0 = clock()
            writer.enqueue(event)
            costs.append(clock() - t0)
        await writer.start()
        started = time.perf_counter()
        for event in prepared[len(costs) :]:
            writer.enqueue(event)
        await writer.drain(timeout=600)
        elapsed = time.perf_counter() - started
        await writer.close()
    engine = create_engine(database_url)
    try:
        started = time.perf_counter()
        report = await verify_database(engine, signer.verifier, [chain_id_for(writer.writer_id, "bench")])
        verify_s = time.perf_counter() - started
    finally:
        await engine.dispose()
    if not report.ok or report.events != events:
        raise RuntimeError(f"bench chain does not verify: {report.first_problem}")
    return {
        "events": events,
        "batch_size": batch_size,
        "database": database_url.split("://", 1)[0],
        "seconds": round(elapsed, 3),
        "events_per_second": round(events / elapsed),
        "verify_seconds": round(verify_s, 3),
        "verified_events_per_second": round(events / verify_s),
        "signed_heads": report.chains[0].checkpoints,
        "enqueue_p50_us": _percentile(costs, 0.50),
        "enqueue_p99_us": _percentile(costs, 0.99),
        "enqueue_max_us": round(max(costs) / 1000.0, 3),
        "enqueue_mean_us": round(statistics.fmean(costs) / 1000.0, 3),
        "build_event_p50_us": _percentile(build, 0.50),
        "build_event_p99_us": _percentile(build, 0.99),
        "python": platform.python_version(),
    }
