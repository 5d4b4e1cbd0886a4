"""Fair-share weights and fair queues through the admin API: the platform admin sets a tenant's weight (validated,
audited as `tenant.update`, 403 for a tenant-admin), and `GET /admin/api/pool` shows the polled gateway's queue
per tenant and profile — requests waiting now, the weight they wait with, recent waits — while one tenant floods
a saturated profile (control plane and gateway under uvicorn, a real OpenID provider, PostgreSQL, scripted
engine replicas with one slot)."""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "oidc"))
import idp_harness as h

from bastion.bench.doubles import ScriptedEngine, upstreams_for
from bastion.db import migrate

pytestmark = pytest.mark.integration
SERVICE_S = 0.5  # each request holds fast-agentic's one slot this long


@pytest.fixture(scope="session")
def idp(tmp_path_factory: pytest.TempPathFactory) -> h.TestIdp:
    return h.shared_idp(tmp_path_factory.mktemp("idp"))


@pytest.fixture(scope="module")
def stack(idp: h.TestIdp, pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    migrate.upgrade(pg_url)
    engine = ScriptedEngine(upstreams_for(["m1"], ongoing=1), delay_s=SERVICE_S, record_bodies=False)
    with h.control_and_gateway(tmp_path_factory.mktemp("control-queues"), pg_url, idp, engine) as urls:
        yield urls


def _admin(stack: tuple[str, str], idp: h.TestIdp, user: str = "pat") -> httpx.Client:
    return httpx.Client(base_url=stack[0], headers={"Authorization": f"Bearer {idp.token(user)}"}, timeout=30)


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"}
    return response.json()["error"]


@pytest.mark.timeout(120)
def test_weights_are_set_validated_and_audited(stack: tuple[str, str], idp: h.TestIdp) -> None:
    name = f"w-{uuid.uuid4().hex[:6]}"
    with _admin(stack, idp) as pat, _admin(stack, idp, "alice") as alice:
        created = pat.post("/admin/api/tenants", json={"name": name, "fair_share_weight": 2})
        assert created.status_code == 201 and created.json()["fair_share_weight"] == 2.0
        for bad in (0, 0.05, 101, True, "3"):
            _error(pat.patch(f"/admin/api/tenants/{name}", json={"fair_share_weight": bad}), 422)
        _error(pat.post("/admin/api/tenants", json={"name": f"{name}-x", "fair_share_weight": -1}), 422)
        _error(alice.patch(f"/admin/api/tenants/{name}", json={"fair_share_weight": 5}), 403)  # not a tenant-admin's
        changed = pat.patch(f"/admin/api/tenants/{name}", json={"fair_share_weight": 4.5})
        assert changed.status_code == 200 and changed.json()["fair_share_weight"] == 4.5
        assert pat.get(f"/admin/api/tenants/{name}").json()["fair_share_weight"] == 4.5
        cleared = pat.patch(f"/admin/api/tenants/{name}", json={"clear_fair_share_weight": True})
        assert cleared.json()["fair_share_weight"] is None  # back to the platform file's weight, else 1
        params = {"tenant": name, "kind": "admin", "actor": "oidc:pat"}
        events = pat.get("/admin/api/audit/events", params=params).json()
    updates = [
        e["payload"]
        for e in events
        if e["payload"]["action"] == "tenant.update" and e["tenant_id"] == created.json()["id"]
    ]
    changes = sorted((u["before"]["fair_share_weight"], u["after"]["fair_share_weight"]) for u in updates)
    assert changes == sorted([(2.0, 4.5), (4.5, None)]), changes


@pytest.mark.timeout(120)
def test_pool_shows_each_tenants_queue(stack: tuple[str, str], idp: h.TestIdp) -> None:
    gateway_url = stack[1]
    suffix = uuid.uuid4().hex[:6]
    heavy, light = f"heavy-{suffix}", f"light-{suffix}"
    with _admin(stack, idp) as pat:
        assert pat.post("/admin/api/tenants", json={"name": heavy, "fair_share_weight": 3}).status_code == 201
        assert pat.post("/admin/api/tenants", json={"name": light}).status_code == 201
        keys = {
            t: pat.post(f"/admin/api/tenants/{t}/keys", json={"name": "q"}).json()["secret"] for t in (heavy, light)
        }

        def chat(tenant: str) -> int:
            body = {"model": "m1@fast-agentic", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
            headers = {"Authorization": f"Bearer {keys[tenant]}"}
            return httpx.post(f"{gateway_url}/v1/chat/completions", json=body, headers=headers, timeout=60).status_code

        with ThreadPoolExecutor(8) as pool:
            results = [pool.submit(chat, heavy) for _ in range(5)]
            time.sleep(0.2)  # heavy's burst first, then light's two
            results += [pool.submit(chat, light) for _ in range(2)]
            seen: dict[str, dict] = {}
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not (seen.get(heavy, {}).get("waiting", 0) >= 1 and light in seen):
                body = pat.get("/admin/api/pool").json()
                seen = {q["tenant"]: q for q in body["queues"] if q["profile"] == "fast-agentic" and q["waiting"]}
                time.sleep(0.25)
            assert {r.result() for r in results} == {200}
        assert seen[heavy]["weight"] == 3.0 and seen[light]["weight"] == 1.0, seen  # light: no record, no file entry
        time.sleep(1.1)  # the control plane polls the gateway at most once a second
        after = {q["tenant"]: q for q in pat.get("/admin/api/pool").json()["queues"] if q["profile"] == "fast-agentic"}
    assert after[heavy]["waiting"] == 0 and after[heavy]["waited"] >= 3
    assert 0 < after[heavy]["mean_wait_s"] <= after[heavy]["max_wait_s"] < 10
    assert after[light]["waited"] >= 1 and after[light]["tenant_id"] != light  # ids are resolved to names
    print(f"waits: heavy max {after[heavy]['max_wait_s']:.2f} s, light max {after[light]['max_wait_s']:.2f} s")
