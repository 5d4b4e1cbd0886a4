"""Fair-share weights and fair queues in the console, in headless Chromium: the platform admin sets a tenant's
weight on the tenants page, then watches the pool page's fair-queue table while that tenant floods a saturated
profile (control plane and gateway under uvicorn, the real OpenID provider, SQLite, scripted engine replicas
with one slot). Pages are screenshotted into test-artifacts/console/."""

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
from test_console_browser import ARTIFACTS, browser, idp  # noqa: F401 - the same Chromium and provider fixtures

from bastion.bench.doubles import ScriptedEngine, upstreams_for

pytestmark = pytest.mark.e2e
SERVICE_S = 0.6  # each request holds fast-agentic's one slot this long


@pytest.fixture(scope="module")
def stack(idp: h.TestIdp, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:  # noqa: F811
    tmp = tmp_path_factory.mktemp("console-queues")
    url = f"sqlite+aiosqlite:///{tmp / 'bastion.db'}"
    h.migrate_db(url)
    engine = ScriptedEngine(upstreams_for(["m1"], ongoing=1), delay_s=SERVICE_S, record_bodies=False)
    with h.control_and_gateway(tmp, url, idp, engine) as urls:
        yield urls


@pytest.mark.timeout(180)
def test_console_sets_weights_and_shows_queues(stack: tuple[str, str], browser, idp: h.TestIdp) -> None:  # noqa: F811
    from playwright.sync_api import expect

    console_url, gateway_url = stack
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    suffix = uuid.uuid4().hex[:6]
    heavy, light = f"heavy-{suffix}", f"light-{suffix}"
    api = httpx.Client(base_url=console_url, headers={"Authorization": f"Bearer {idp.token('pat')}"}, timeout=30)
    keys = {}
    for tenant in (heavy, light):
        assert api.post("/admin/api/tenants", json={"name": tenant}).status_code == 201
        keys[tenant] = api.post(f"/admin/api/tenants/{tenant}/keys", json={"name": "q"}).json()["secret"]

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(15_000)
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on(
        "response",
        lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 and "favicon" not in r.url else None,
    )
    page.goto(f"{console_url}/login")
    page.get_by_label("Username").fill("pat")
    page.get_by_label("Password").fill(h.PASSWORD)
    page.get_by_role("button", name="Sign In").click()
    page.wait_for_url(f"{console_url}/console/tenants")

    # The weight: the platform file's (1) until set on the tenant; set it from the tenants page.
    row = page.locator("#tenants tr", has_text=heavy)
    assert "(platform file)" in row.locator("td.weight").inner_text()
    page.get_by_label(f"Fair-share weight of {heavy}").fill("3")
    page.get_by_role("button", name=f"Set weight of {heavy}").click()
    page.wait_for_url(f"{console_url}/console/tenants")
    expect(page.get_by_label(f"Fair-share weight of {heavy}")).to_have_value("3")
    assert "(platform file)" not in page.locator("#tenants tr", has_text=heavy).locator("td.weight").inner_text()
    assert api.get(f"/admin/api/tenants/{heavy}").json()["fair_share_weight"] == 3.0
    page.screenshot(path=str(ARTIFACTS / "10-tenant-weight.png"), full_page=True)

    def chat(tenant: str) -> int:
        body = {"model": "m1@fast-agentic", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
        headers = {"Authorization": f"Bearer {keys[tenant]}"}
        return httpx.post(f"{gateway_url}/v1/chat/completions", json=body, headers=headers, timeout=60).status_code

    with ThreadPoolExecutor(8) as pool:
        results = [pool.submit(chat, heavy) for _ in range(5)] + [pool.submit(chat, light) for _ in range(2)]
        deadline = time.monotonic() + 10
        while True:  # the pool page while heavy's burst waits: its row, with the weight it waits with
            page.goto(f"{console_url}/console/pool")
            waiting = page.locator(f"#queues tr[data-tenant='{heavy}'][data-profile='fast-agentic'] td.waiting")
            if (waiting.count() and int(waiting.inner_text()) >= 1) or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert waiting.count() and int(waiting.inner_text()) >= 1
        heavy_row = page.locator(f"#queues tr[data-tenant='{heavy}']")
        assert heavy_row.locator("td").nth(3).inner_text() == "3"
        page.screenshot(path=str(ARTIFACTS / "11-pool-queues-waiting.png"), full_page=True)
        assert {r.result() for r in results} == {200}

    time.sleep(1.1)  # the control plane polls the gateway at most once a second
    page.goto(f"{console_url}/console/pool")
    heavy_row = page.locator(f"#queues tr[data-tenant='{heavy}'][data-profile='fast-agentic']")
    assert heavy_row.locator("td.waiting").inner_text() == "0"
    assert int(heavy_row.locator("td.waited").inner_text()) >= 3
    assert heavy_row.locator("td.max-wait").inner_text().endswith(" ms")
    assert page.locator(f"#queues tr[data-tenant='{light}'][data-profile='fast-agentic']").count() == 1
    page.screenshot(path=str(ARTIFACTS / "12-pool-queues-after.png"), full_page=True)
    assert not problems, problems
    context.close()
    api.close()
