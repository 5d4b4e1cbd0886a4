"""Bad input over real HTTP (uvicorn on 127.0.0.1, PostgreSQL, Redis): oversize bodies however they are sent,
malformed JSON and invalid UTF-8, a max_tokens past every profile's context, an unknown model, and CR/LF in
header values, which are refused or never reflected. The in-process variants live in test_gateway_api.py."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from apitest_support import Gateway, flush_redis, fresh_pg, h, served_gateway, tenant_with_key

from bastion.bench.doubles import ScriptedEngine, gateway_stack, platform_config, upstreams_for
from bastion.control.app import create_app as create_control_app

pytestmark = pytest.mark.integration
LIMIT = 4096
CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, str]]:
    with fresh_pg() as url:
        token = tenant_with_key(url, "bad-input")
        with served_gateway(tmp_path_factory.mktemp("bad-input"), url, flush_redis(11), max_body_bytes=LIMIT) as gw:
            yield gw, token


@pytest.fixture
def client(gateway: tuple[Gateway, str]) -> Iterator[httpx.Client]:
    gw, token = gateway
    with httpx.Client(base_url=gw.url, headers={"authorization": f"Bearer {token}"}, timeout=10) as c:
        yield c


def error_of(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code, error
    return error


def test_body_over_the_limit_is_413_declared_or_chunked(client: httpx.Client) -> None:
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * (2 * LIMIT)}]}
    error_of(client.post("/v1/chat/completions", json=big), 413, "request_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the bytes read so far decide
        yield b'{"model": "m1", "messages": [{"role": "user", "content": "'
        for _ in range(8):
            yield b"y" * 1024
        yield b'"}]}'

    response = client.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    error_of(response, 413, "request_too_large")
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200  # a normal body still works


def test_malformed_json_and_invalid_utf8_are_400(client: httpx.Client) -> None:
    headers = {"content-type": "application/json"}
    cases = {
        b"{not json": "invalid_json",
        b'{"model": "m1", "messages": [}': "invalid_json",
        b"\xff\xfe\x00{}": "invalid_encoding",
        b'{"model": "m1\xc3\x28"}': "invalid_encoding",
        b"[1, 2]": "invalid_json",
        b"": "invalid_json",
    }
    for body, code in cases.items():
        error_of(client.post("/v1/chat/completions", content=body, headers=headers), 400, code)
        error_of(client.post("/v1/completions", content=body, headers=headers), 400, code)


def test_max_tokens_beyond_the_context_names_the_limit(client: httpx.Client) -> None:
    error = error_of(client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 100_000}), 400)
    assert error["code"] == "context_length_exceeded" and "8192" in error["message"]  # the deep profile's context
    error = error_of(client.post("/v1/completions", json={"model": "m1", "prompt": "a", "max_tokens": 9000}), 400)
    assert "8192" in error["message"]


def test_unknown_model_is_404(client: httpx.Client) -> None:
    error = error_of(client.post("/v1/chat/completions", json={**CHAT, "model": "no-such-model"}), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    error = error_of(client.post("/v1/chat/completions", json={**CHAT, "model": "m1@no-such-profile"}), 404)
    assert error["code"] == "model_not_found"
    unknown = client.post("/v1/chat/completions", json=CHAT, headers={"x-bastion-profile": "no-such-profile"})
    assert error_of(unknown, 404)["code"] == "model_not_found"


def _raw_request(url: str, head: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


@pytest.mark.parametrize("header", ["X-Session-Id", "X-Bastion-Profile", "X-Request-Id", "Authorization"])
def test_bare_cr_or_lf_in_a_header_value_is_refused_on_the_wire(gateway: tuple[Gateway, str], header: str) -> None:
    gw, token = gateway
    body = json.dumps(CHAT).encode()
    for evil in (b"a\rX-Injected: 1", b"a\nX-Injected: 1"):
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
            + f"Authorization: Bearer {token}\r\n".encode() * (header != "Authorization")
            + header.encode()
            + b": "
            + evil
            + b"\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        answer = _raw_request(gw.url, head)
        status_line, _, rest = answer.partition(b"\r\n")
        headers = rest.split(b"\r\n\r\n", 1)[0].lower()
        # The HTTP parser refuses it (400) before the app; or, for a bare LF it reads as a line end, the injected
        # line is a header of the request (never of the answer) and the bad value is refused or ignored.
        assert status_line.split()[1] in (b"400", b"401", b"200"), answer[:300]
        assert b"x-injected" not in headers


@pytest.mark.parametrize(
    ("header", "value", "status"),
    [
        ("x-session-id", "abc\r\nX-Injected: 1", 400),
        ("x-session-id", "s" * 1000, 400),
        ("x-session-id", "caf\u00e9", 400),
        ("x-bastion-profile", "fast-agentic\r\nX-Injected: 1", 400),
        ("x-request-id", "id\r\nX-Injected: 1", 200),
        ("x-request-id", "r" * 500, 200),
    ],
)
async def test_header_values_with_control_characters_in_process(
    tmp_path: Path, gateway: tuple[Gateway, str], header: str, value: str, status: int
) -> None:
    """Straight into the ASGI app (no HTTP parser in the way): the gateway itself refuses the value (400) or, for
    the request id, replaces it; no answer header carries the client's bytes."""
    config = platform_config(str(tmp_path), gateway[0].database_url, ["m1", "m2"])
    async with gateway_stack(config, ScriptedEngine(upstreams_for(["m1", "m2"]))) as stack:
        token = gateway[1]
        status_code, answer_headers, body = await _asgi_post(
            stack.app, "/v1/chat/completions", _headers(token, header, value), json.dumps(CHAT)
        )
    assert status_code == status, body
    for name, got in answer_headers:
        assert b"\r" not in got and b"\n" not in got and name != b"x-injected"
    rid = dict(answer_headers)[b"x-request-id"].decode()
    assert rid != value and len(rid) <= 128
    if status == 400:
        assert json.loads(body)["error"]["type"] == "invalid_request_error"


def _headers(token: str, header: str, value: str) -> list[tuple[bytes, bytes]]:
    return [
        (b"authorization", f"Bearer {token}".encode()),
        (b"content-type", b"application/json"),
        (header.encode(), value.encode("utf-8")),
    ]


async def _asgi_post(app, path: str, headers: list[tuple[bytes, bytes]], body: str):
    """One request through the ASGI interface by hand (httpx would refuse to send such header values)."""
    data = body.encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [*headers, (b"content-length", str(len(data)).encode())],
        "client": ("127.0.0.9", 50000),
        "server": ("127.0.0.1", 80),
    }
    sent = [{"type": "http.request", "body": data, "more_body": False}]
    out: list[dict] = []

    async def receive() -> dict:
        return sent.pop(0) if sent else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        out.append(message)

    await app(scope, receive, send)
    start = next(m for m in out if m["type"] == "http.response.start")
    content = b"".join(m.get("body", b"") for m in out if m["type"] == "http.response.body")
    return start["status"], start["headers"], content


async def test_admin_api_invalid_utf8_body_is_a_json_400(tmp_path: Path, gateway: tuple[Gateway, str]) -> None:
    """The admin API answers an undecodable body with its own JSON error (schemathesis found a bare 400)."""
    config = h.platform_config(tmp_path, gateway[0].database_url, None)
    app = create_control_app(config, settings=h.control_settings(config), announce_local_password=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://control.test") as client:
        for body in (b"\xff\xfe{", b'{"name": "a\xc3\x28"}'):
            response = await client.post(
                "/admin/api/tenants", content=body, headers={"content-type": "application/json"}
            )
            assert response.status_code == 400, response.text
            assert response.json()["error"]["code"] == "invalid_body"


async def test_console_form_with_an_out_of_range_limit_is_422(tmp_path: Path, gateway: tuple[Gateway, str]) -> None:
    """A number past the database column's range is bad input (422), not a database error or a 500."""
    import re

    from bastion.control.local_admin import ensure_local_admin

    config = h.platform_config(tmp_path, gateway[0].database_url, None)
    password = ensure_local_admin(config.data_dir)
    app = create_control_app(config, settings=h.control_settings(config), announce_local_password=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://control.test") as browser:
        page = await browser.get("/login")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
        login = await browser.post("/login", data={"username": "admin", "password": password, "csrf_token": csrf})
        assert login.status_code == 303, login.text
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', (await browser.get("/console/tenants")).text).group(1)
        assert (await browser.post("/console/tenants", data={"name": "huge", "csrf_token": csrf})).status_code == 303
        await browser.post("/console/tenants/huge/keys", data={"name": "k", "csrf_token": csrf})
        key = (await browser.get("/admin/api/tenants/huge/keys")).json()[0]["id"]
        form = {"csrf_token": csrf, "requests_per_minute": str(2**40)}
        answer = await browser.post(f"/console/tenants/huge/keys/{key}/limits", data=form)
        assert answer.status_code == 422, answer.text
        api = await browser.put(
            "/admin/api/tenants/huge/limits", json={"tokens_per_minute": 2**40}, headers={"x-csrf-token": csrf}
        )
        assert api.status_code == 422 and api.json()["error"]["code"] == "invalid_value"
