"""An EngineClient over external replicas: OpenAI-compatible servers outside Ray (llama-server, Ollama, vLLM).

One shared httpx.AsyncClient (a keep-alive pool; HTTP/2 when the `h2` package is installed and the upstream
speaks it over TLS) serves every request; a second small one runs the health checks, so probes never queue
behind long streams. Each upstream has a health task (routing/health.py): an upstream that stops answering is
out of rotation within ~1.5 s with the defaults, and at once when a request cannot connect. The tenant never
sees an upstream's URL, key or stack trace: errors are mapped (external_protocol.map_error).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from bastion.background import stop_task
from bastion.config.external import ExternalReplicaConfig
from bastion.gateway.engine_client import Endpoint, UpstreamInfo, UpstreamResponse, UpstreamUnavailable
from bastion.gateway.errors import error_body
from bastion.gateway.external_protocol import estimate_tokens, map_error, speculation_of, with_speculation
from bastion.routing.health import HealthState, probe

log = logging.getLogger("bastion.gateway.external")
_PATHS = {"chat": "/chat/completions", "completion": "/completions"}
_UNREACHABLE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError)
_BUSY = {429, 502, 503, 504}  # the upstream cannot take it now: another replica may


def _has_h2() -> bool:
    try:
        import h2  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class ExternalUpstream:
    cfg: ExternalReplicaConfig
    info: UpstreamInfo
    headers: dict[str, str]
    health: HealthState
    secrets: tuple[str, ...] = ()
    ongoing: int = 0
    tokenize: str = "estimate"  # vllm | llama_cpp | estimate; falls back to estimate if the endpoint is missing
    timeout: httpx.Timeout = field(default_factory=lambda: httpx.Timeout(300.0))


class ExternalEngineClient:
    """EngineClient for the platform file's `external_replicas`. Call `start()` in the serving event loop (or let
    the first request do it) and `aclose()` at shutdown."""

    def __init__(self, replicas: list[ExternalReplicaConfig]) -> None:
        self._ups: dict[str, ExternalUpstream] = {}
        for cfg in replicas:
            key = cfg.read_api_key()
            info = UpstreamInfo(cfg.name, cfg.model, cfg.profile, cfg.max_context, cfg.max_ongoing_requests)
            self._ups[cfg.name] = ExternalUpstream(
                cfg=cfg,
                info=info,
                headers={"authorization": f"Bearer {key}"} if key else {},
                health=HealthState(cfg.health.failures_to_eject, cfg.health.successes_to_restore),
                secrets=(key,) if key else (),
                tokenize=cfg.kind if cfg.kind in ("vllm", "llama_cpp") else "estimate",
                timeout=httpx.Timeout(cfg.timeouts.read_s, connect=cfg.timeouts.connect_s, pool=cfg.timeouts.connect_s),
            )
        self._http: httpx.AsyncClient | None = None
        self._probe_http: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # --- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Create the connection pools and one health task per upstream (idempotent; needs a running loop)."""
        if self._http is not None or not self._ups:
            return
        total = sum(u.cfg.max_ongoing_requests for u in self._ups.values())
        limits = httpx.Limits(max_connections=total + 8, max_keepalive_connections=total, keepalive_expiry=60)
        self._http = httpx.AsyncClient(limits=limits, http2=_has_h2(), follow_redirects=False, trust_env=False)
        self._probe_http = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=2 * len(self._ups) + 2), trust_env=False
        )
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._watch(up), name=f"health:{name}") for name, up in self._ups.items()]

    def _ensure_started(self) -> None:
        if self._http is None:
            with contextlib.suppress(RuntimeError):  # no running loop: start() is called later
                self.start()

    async def aclose(self) -> None:
        for task in self._tasks:
            await stop_task(task)
        self._tasks = []
        for client in (self._http, self._probe_http):
            if client is not None:
                await client.aclose()
        self._http = self._probe_http = None

    async def _watch(self, up: ExternalUpstream) -> None:
        assert self._probe_http is not None
        while True:
            try:
                ok, reason = await probe(self._probe_http, up.cfg.health_url, up.cfg.health.timeout_s, up.headers)
            except Exception as exc:  # the watcher must outlive any surprise: a dead watcher never ejects
                ok, reason = False, type(exc).__name__
            if up.health.observe(ok, reason):
                self._log_change(up)
            await asyncio.sleep(up.cfg.health.interval_s)

    def _eject(self, up: ExternalUpstream, reason: str) -> None:
        if up.health.eject(reason):
            self._log_change(up)

    @staticmethod
    def _log_change(up: ExternalUpstream) -> None:
        if up.health.healthy:
            log.info("external replica %s is back in rotation", up.cfg.name)
        else:
            log.warning("external replica %s taken out of rotation: %s", up.cfg.name, up.health.reason)

    # --- what the gateway sees ---------------------------------------------------------------------------

    def upstreams(self) -> list[UpstreamInfo]:
        """Upstreams in rotation; an ejected one stays listed only while no healthy upstream serves its model and
        profile, so requests for it get a quick 503 (or fail over) instead of "model does not exist"."""
        self._ensure_started()
        healthy = {(u.cfg.model, u.cfg.profile) for u in self._ups.values() if u.health.in_rotation}
        return [
            u.info for u in self._ups.values() if u.health.in_rotation or (u.cfg.model, u.cfg.profile) not in healthy
        ]

    def states(self) -> list[dict[str, Any]]:
        """Each upstream's rotation state (for the pool view and metrics): no URL, no key."""
        return [
            {
                "name": u.cfg.name,
                "model": u.cfg.model,
                "profile": u.cfg.profile,
                "kind": u.cfg.kind,
                "state": u.health.state,
                "reason": u.health.reason,
                "ongoing": u.ongoing,
                "max_ongoing_requests": u.cfg.max_ongoing_requests,
            }
            for u in self._ups.values()
        ]

    def __contains__(self, upstream: str) -> bool:
        return upstream in self._ups

    def _take(self, upstream: str) -> ExternalUpstream:
        """The upstream for a request, or UpstreamUnavailable when it is ejected or at its concurrency limit."""
        self._ensure_started()
        up = self._ups.get(upstream)
        if up is None or not up.health.in_rotation or up.ongoing >= up.cfg.max_ongoing_requests:
            raise UpstreamUnavailable(upstream)
        return up

    def _body(self, up: ExternalUpstream, body: dict[str, Any]) -> dict[str, Any]:
        return {**body, "model": up.cfg.served_model} if up.cfg.upstream_model else body

    def _rename(self, up: ExternalUpstream, text: str) -> str:
        """The upstream's own model name in an answer replaced by the one the tenant asked for."""
        if not up.cfg.upstream_model:
            return text
        served, model = json.dumps(up.cfg.served_model), json.dumps(up.cfg.model)
        return text.replace(f'"model":{served}', f'"model":{model}').replace(f'"model": {served}', f'"model": {model}')

    # --- token counting ----------------------------------------------------------------------------------

    async def count_prompt_tokens(self, upstream: str, endpoint: Endpoint, body: dict[str, Any]) -> int:
        up = self._ups.get(upstream)
        if up is None or not up.health.in_rotation:
            raise UpstreamUnavailable(upstream)
        self._ensure_started()
        if up.tokenize == "estimate":
            return estimate_tokens(endpoint, body)
        try:
            count = await (self._tokenize_vllm if up.tokenize == "vllm" else self._tokenize_llama)(up, endpoint, body)
        except _UNREACHABLE as exc:
            self._eject(up, type(exc).__name__)
            raise UpstreamUnavailable(upstream) from None
        except httpx.HTTPError as exc:
            log.warning("token count on %s failed (%s): estimating", upstream, type(exc).__name__)
            return estimate_tokens(endpoint, body)
        if count is None:  # no such endpoint there: estimate from now on
            log.warning("external replica %s has no usable tokenizer endpoint: estimating prompt tokens", upstream)
            up.tokenize = "estimate"
            return estimate_tokens(endpoint, body)
        return count

    async def _post_json(self, up: ExternalUpstream, url: str, payload: dict[str, Any]) -> tuple[int, Any]:
        assert self._http is not None
        response = await self._http.post(url, json=payload, headers=up.headers, timeout=up.timeout)
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, None

    async def _tokenize_vllm(self, up: ExternalUpstream, endpoint: Endpoint, body: dict[str, Any]) -> int | None:
        """vLLM's /tokenize applies the chat template (and tools) as generation would."""
        if endpoint == "chat":
            keep = ("messages", "tools", "chat_template_kwargs", "add_generation_prompt")
            payload = {k: body[k] for k in keep if k in body}
            payload.setdefault("add_generation_prompt", True)
        else:
            payload = {"prompt": body.get("prompt")}
        status, data = await self._post_json(
            up, up.cfg.root_url + "/tokenize", {"model": up.cfg.served_model, **payload}
        )
        if status == 400:
            raise ValueError("the upstream could not tokenize the prompt")
        if status != 200 or not isinstance(data, dict) or not isinstance(data.get("count"), int):
            return None
        return data["count"]

    async def _tokenize_llama(self, up: ExternalUpstream, endpoint: Endpoint, body: dict[str, Any]) -> int | None:
        """llama-server: /apply-template renders the chat, /tokenize counts it."""
        prompt = body.get("prompt")
        if endpoint == "chat":
            status, data = await self._post_json(
                up, up.cfg.root_url + "/apply-template", {"messages": body["messages"]}
            )
            if status != 200 or not isinstance(data, dict) or not isinstance(data.get("prompt"), str):
                return None
            prompt = data["prompt"]
        if not isinstance(prompt, str):
            return None
        status, data = await self._post_json(
            up, up.cfg.root_url + "/tokenize", {"content": prompt, "add_special": True}
        )
        if status != 200 or not isinstance(data, dict) or not isinstance(data.get("tokens"), list):
            return None
        return len(data["tokens"])

    # --- inference ---------------------------------------------------------------------------------------

    async def complete(
        self, upstream: str, endpoint: Endpoint, body: dict[str, Any], *, session_id: str | None = None
    ) -> UpstreamResponse:
        up = self._take(upstream)
        assert self._http is not None
        up.ongoing += 1
        try:
            response = await self._http.post(
                up.cfg.base_url + _PATHS[endpoint], json=self._body(up, body), headers=up.headers, timeout=up.timeout
            )
        except _UNREACHABLE as exc:
            self._eject(up, type(exc).__name__)
            raise UpstreamUnavailable(upstream) from None
        except httpx.TimeoutException:
            return UpstreamResponse(
                504, error_body(504, "The upstream replica did not answer in time", "upstream_timeout")
            )
        except httpx.HTTPError as exc:
            log.error("external replica %s failed: %s", upstream, type(exc).__name__)
            return UpstreamResponse(502, error_body(502, "The upstream replica failed", "upstream_error"))
        finally:
            up.ongoing -= 1
        if response.status_code in _BUSY:
            raise UpstreamUnavailable(upstream)
        if response.status_code >= 400:
            self._log_refusal(up, response.status_code)
            return UpstreamResponse(*map_error(response.status_code, response.content, up.secrets))
        try:
            data = json.loads(self._rename(up, response.text))
        except ValueError:
            return UpstreamResponse(
                502, error_body(502, "The upstream replica sent an invalid answer", "upstream_error")
            )
        return UpstreamResponse(200, with_speculation(data, speculation_of(data, up.cfg.speculation)))

    def _log_refusal(self, up: ExternalUpstream, status: int) -> None:
        level = logging.ERROR if status in (401, 403, 404) else logging.INFO
        log.log(level, "external replica %s answered HTTP %s", up.cfg.name, status)

    async def stream(
        self, upstream: str, endpoint: Endpoint, body: dict[str, Any], *, session_id: str | None = None
    ) -> AsyncIterator[str]:
        up = self._take(upstream)
        assert self._http is not None
        up.ongoing += 1
        started = False
        try:
            request = self._http.build_request(
                "POST",
                up.cfg.base_url + _PATHS[endpoint],
                json=self._body(up, body),
                headers=up.headers,
                timeout=up.timeout,
            )
            try:
                response = await self._http.send(request, stream=True)
            except _UNREACHABLE as exc:
                self._eject(up, type(exc).__name__)
                raise UpstreamUnavailable(upstream) from None
            try:
                if response.status_code in _BUSY:
                    raise UpstreamUnavailable(upstream)
                if response.status_code >= 400:
                    self._log_refusal(up, response.status_code)
                    status, error = map_error(response.status_code, await response.aread(), up.secrets)
                    error["error"]["code"] = status  # first_event_error reads an int code as the HTTP status
                    yield f"data: {json.dumps(error)}\n\n"
                    return
                async for event in self._events(up, response):
                    started = True
                    yield event
            finally:
                await response.aclose()
        except UpstreamUnavailable:
            raise
        except (httpx.HTTPError, OSError) as exc:
            if not started and isinstance(exc, _UNREACHABLE):
                self._eject(up, type(exc).__name__)
                raise UpstreamUnavailable(upstream) from None
            if isinstance(exc, _UNREACHABLE):
                self._eject(up, type(exc).__name__)
            log.error("external replica %s failed mid-stream: %s", upstream, type(exc).__name__)
            error = error_body(502, "The upstream replica failed mid-stream; retry the request", "upstream_error")
            yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n"
        finally:
            up.ongoing -= 1

    async def _events(self, up: ExternalUpstream, response: httpx.Response) -> AsyncIterator[str]:
        """SSE events re-emitted as `data: ...\\n\\n`; speculation from llama-server's `timings` is moved into the
        usage chunk in vLLM's shape so the relay reads every kind alike."""
        source, pending = up.cfg.speculation, None
        data: list[str] = []
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                data.append(line[5:].lstrip())
                continue
            if line or not data:
                continue  # comments, `event:` lines, stray blank lines
            payload, data = "\n".join(data), []
            if payload != "[DONE]" and source != "none" and ('"timings"' in payload or '"usage"' in payload):
                payload, pending = self._account(payload, source, pending)
            yield f"data: {self._rename(up, payload)}\n\n"
            if payload == "[DONE]":
                return  # do not wait for the upstream to close: the client may hang up as soon as it has [DONE]
        if data:
            yield f"data: {self._rename(up, chr(10).join(data))}\n\n"

    @staticmethod
    def _account(payload: str, source: str, pending: dict[str, Any] | None) -> tuple[str, dict[str, Any] | None]:
        try:
            chunk = json.loads(payload)
        except ValueError:
            return payload, pending
        if not isinstance(chunk, dict):
            return payload, pending
        pending = speculation_of(chunk, source) or pending
        if isinstance(chunk.get("usage"), dict) and pending is not None:
            updated = with_speculation(chunk, pending)
            if updated is not chunk:
                return json.dumps(updated, separators=(",", ":")), pending
        return payload, pending

    # --- engine metrics (vLLM's /metrics, for /metrics/engines) -----------------------------------------------

    async def engine_metrics(self) -> list[tuple[UpstreamInfo, str]]:
        self._ensure_started()
        out = []
        for up in self._ups.values():
            if up.cfg.kind != "vllm" or not up.health.in_rotation or self._probe_http is None:
                continue
            try:
                response = await self._probe_http.get(up.cfg.root_url + "/metrics", headers=up.headers, timeout=2.0)
            except httpx.HTTPError as exc:
                log.warning("metrics of %s unavailable: %s", up.cfg.name, type(exc).__name__)
                continue
            if response.status_code == 200:
                out.append((up.info, response.text))
        return out
