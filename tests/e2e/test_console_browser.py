"""The console in headless Chromium (Playwright): sign in through the OpenID provider's login page, create a
tenant and a key, call the gateway with that key, see the usage, run and download a signed audit export, log
out at the provider. Every page is screenshotted into test-artifacts/console/; CSP violations fail the test."""

from __future__ import annotations

import re
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "oidc"))
import idp_harness as h

from bastion.bench.doubles import TEST_PEPPER, ScriptedEngine, upstreams_for
from bastion.control.app import create_app
from bastion.serve.gateway_app import create_gateway_app as create_gateway

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "console"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


@pytest.fixture(scope="session")
def idp(tmp_path_factory: pytest.TempPathFactory) -> h.TestIdp:
    return h.shared_idp(tmp_path_factory.mktemp("idp"))


@pytest.fixture(scope="module")  # module: the sync API keeps an event loop running in this thread while open
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "chromium is required (scripts/install-tools.sh installs it)"
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def stack(idp: h.TestIdp, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """The control plane and the gateway (scripted engine) on one SQLite database, both under uvicorn."""
    tmp = tmp_path_factory.mktemp("console-e2e")
    url = f"sqlite+aiosqlite:///{tmp / 'bastion.db'}"
    h.migrate_db(url)
    config = h.platform_config(tmp, url, idp.issuer)
    control = create_app(config, settings=h.control_settings(config), pepper=TEST_PEPPER)
    engine = ScriptedEngine(upstreams_for(["m1"]), speculation={"num_draft_tokens": 8, "num_accepted_tokens": 6})
    gateway = create_gateway(config, engine, pepper=TEST_PEPPER, flush_interval_s=0.2)
    with h.ServerThread(control, idp.console_port()) as console, h.ServerThread(gateway, h.free_port()) as api:
        yield console.url, api.url


def test_console_end_to_end(stack: tuple[str, str], browser, idp: h.TestIdp) -> None:
    from playwright.sync_api import expect

    console_url, gateway_url = stack
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(15_000)
    problems: list[str] = []
    page.on(
        "console", lambda m: problems.append(m.text) if m.type == "error" and "Failed to load" not in m.text else None
    )
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on(
        "response",
        lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 and "favicon" not in r.url else None,
    )

    def shot(name: str) -> None:
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    # Sign in through the provider's own login page.
    page.goto(f"{console_url}/login")
    assert page.url.startswith(idp.issuer), page.url
    page.get_by_label("Username").fill("pat")
    page.get_by_label("Password").fill("wrong password")
    page.get_by_role("button", name="Sign In").click()
    assert page.locator("#error").inner_text() == "Invalid username or password."
    shot("01-provider-login")
    page.get_by_label("Username").fill("pat")
    page.get_by_label("Password").fill(h.PASSWORD)
    page.get_by_role("button", name="Sign In").click()
    page.wait_for_url(f"{console_url}/console/tenants")
    assert "pat (platform-admin)" in page.locator("#whoami").inner_text()
    assert page.context.cookies(console_url)[0]["httpOnly"] is True

    # Create a tenant (keyboard only: type and press Enter in the form).
    page.get_by_label("Name").fill("e2e-corp")
    page.get_by_label("Requests per minute (cap)").fill("120")
    page.get_by_label("Name").press("Enter")
    page.wait_for_load_state()
    assert page.locator("#tenants").get_by_role("link", name="e2e-corp").is_visible()
    shot("02-tenants")

    # Create a key: the secret is shown once, with a copy button.
    page.locator("#tenants").get_by_role("link", name="Keys").first.click()
    page.wait_for_url(f"{console_url}/console/tenants/e2e-corp/keys")
    page.get_by_label("Name").fill("browser-key")
    page.get_by_role("button", name="Create key").click()
    secret = page.get_by_label("Secret").input_value()
    assert secret.startswith("bst_")
    page.get_by_role("button", name="Copy").click()
    expect(page.locator("#copy-status")).to_have_text("Copied to the clipboard.")
    shot("03-key-created")
    page.goto(f"{console_url}/console/tenants/e2e-corp/keys")  # the list again: the secret is gone for good
    assert secret not in page.content() and page.locator("#keys tbody tr").count() == 1
    # The key's own limits, under the tenant's cap.
    page.get_by_label("Requests per minute (cap 120)").fill("60")
    page.get_by_role("button", name=re.compile(r"^Save limits of ")).click()
    page.wait_for_url(f"{console_url}/console/tenants/e2e-corp/keys")
    expect(page.get_by_label("Requests per minute (cap 120)")).to_have_value("60")

    # Call the gateway with the key, then see the usage.
    response = httpx.post(
        f"{gateway_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {secret}"},
        json={"model": "m1", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]
    deadline = time.monotonic() + 10
    while True:
        page.goto(f"{console_url}/console/usage?tenant=e2e-corp")
        cells = page.locator("#usage-table tbody tr").first.locator("td").all_inner_texts()
        if (len(cells) > 3 and cells[3] == "1") or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert cells[1] == "m1" and cells[3] == "1", cells
    page.wait_for_selector("#usage-chart[data-drawn='1']")
    shot("04-usage")

    # Audit: the admin actions are there; run a signed export and download it.
    page.goto(f"{console_url}/console/audit")
    page.get_by_label("Kind").select_option("admin")
    page.get_by_role("button", name="Search").click()
    page.wait_for_url("**/console/audit?*kind=admin*")  # htmx swapped the results in and pushed the URL
    assert "tenant.create" in page.locator("#audit-table").inner_text()
    assert "key.create" in page.locator("#audit-table").inner_text()
    page.get_by_role("button", name="Run export").click()
    page.wait_for_selector("#export-ready")
    shot("05-audit-export")
    with page.expect_download() as info:
        page.locator("#download-export").click()
    target = ARTIFACTS / "audit-export.zip"
    info.value.save_as(str(target))
    names = {n.split("/")[-1] for n in zipfile.ZipFile(target).namelist()}
    assert {"events.jsonl", "manifest.json", "manifest.sig"} <= names

    # Pool and profiles dashboard.
    page.goto(f"{console_url}/console/pool")
    assert "m1@fast-agentic" in page.locator("#deployments").inner_text()
    assert page.locator("#reference-plan tbody tr").count() >= 2
    page.wait_for_selector("#acceptance-chart[data-drawn='1']")
    shot("06-pool")

    assert page.evaluate("typeof window.htmx") == "object"
    assert not [p for p in problems if "Content Security Policy" in p or "Refused" in p], problems
    assert not problems, problems

    # Log out: the console session ends, then the provider's.
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url(f"{idp.issuer}/protocol/openid-connect/logout**")
    shot("07-provider-logout")
    page.get_by_role("button", name="Yes, sign me out").click()
    page.wait_for_url(f"{idp.issuer}/interaction/**")  # back at the provider's login: its session is gone too
    assert page.get_by_role("button", name="Sign In").is_visible()
    shot("08-logged-out")
    assert not [c for c in context.cookies(console_url) if c["name"] == "bastion_session"]
    context.close()
