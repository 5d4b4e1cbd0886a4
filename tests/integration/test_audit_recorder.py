"""The audit row of an inference request carries the request's real speculation: k and the acceptance rate at
each draft position as the engine reported them (its acceptance histogram), else the profile's configured k.
Through the gateway (scripted engine), the audit recorder and writer, into the database (SQLite)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

from bastion.audit.recorder import AuditRecorder
from bastion.audit.service import build_writer
from bastion.bench.doubles import ScriptedEngine, gateway_stack, platform_config, upstreams_for
from bastion.config.schema import ProfileConfig
from bastion.db import migrate
from bastion.db.models import AuditEvent

pytestmark = pytest.mark.integration
# 4 verification steps of k = 3 drafts: 1 step accepted none, 1 accepted one, 2 accepted all three (7 tokens).
WITH_HISTOGRAM = {
    "num_spec_steps": 4,
    "num_draft_tokens": 12,
    "num_accepted_draft_tokens": 7,
    "acceptance_histogram": [1, 1, 0, 2],
}
WITHOUT_HISTOGRAM = {"num_spec_steps": 4, "num_draft_tokens": 8, "num_accepted_draft_tokens": 5}
PROFILES = {
    "fast-agentic": ProfileConfig.model_validate({"speculative": {"method": "mtp", "num_speculative_tokens": 2}}),
    "deep-context": ProfileConfig.model_validate({}),
}


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    migrate.upgrade(sqlite_url)  # runs its own event loop: in a sync fixture, before the test's loop
    return sqlite_url


@pytest.mark.parametrize(
    ("reported", "expected"),
    [
        (
            WITH_HISTOGRAM,
            {"num_speculative_tokens": 3, "acceptance_by_position": [0.75, 0.5, 0.5], "draft_tokens": 12},
        ),
        (WITHOUT_HISTOGRAM, {"num_speculative_tokens": 2, "acceptance_by_position": [], "draft_tokens": 8}),
    ],
    ids=["engine-reports-positions", "profile-k-fallback"],
)
async def test_audit_row_has_the_requests_k_and_per_position_acceptance(
    tmp_path: Path, database_url: str, reported: dict, expected: dict
) -> None:
    config = platform_config(str(tmp_path), database_url, ["m1"])
    writer = await build_writer(config).start()
    engine = ScriptedEngine(upstreams_for(["m1"]), speculation=reported)
    try:
        async with gateway_stack(config, engine, recorders=[AuditRecorder(writer, PROFILES)]) as stack:
            name = f"t-{uuid.uuid4().hex[:8]}"
            await stack.tenants().create(name)
            token = (await stack.keys().create(name)).token
            body = {"model": "m1@fast-agentic", "messages": [{"role": "user", "content": "hi"}]}
            response = await stack.client.post(
                "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {token}"}
            )
            assert response.status_code == 200, response.text
            await writer.flush(timeout=10)
            async with stack.sessions() as session:
                rows = (await session.scalars(select(AuditEvent).where(AuditEvent.kind == "inference"))).all()
    finally:
        await writer.close(timeout=10)
    assert len(rows) == 1
    speculation = rows[0].payload["speculation"]
    assert speculation["method"] == "mtp" and speculation["accepted_tokens"] == reported["num_accepted_draft_tokens"]
    for key, value in expected.items():
        assert speculation[key] == pytest.approx(value), (key, speculation)
