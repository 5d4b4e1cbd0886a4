"""The gateway's request handling: policy (auth, limits, routing), relay to the engine, usage at the end.

One `GatewayService` per app instance. Per-request state lives in a RequestContext; shared state is the
authenticator cache, the limiter, in-flight counts per upstream (for overflow) and the batched recorders.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from bastion.background import stop_task
from bastion.gateway import anthropic, policy
from bastion.gateway.api_access import require_api
from bastion.gateway.engine_client import Endpoint, EngineClient, UpstreamInfo, UpstreamUnavailable, notice_replica
from bastion.gateway.errors import ApiError, is_error_body
from bastion.gateway.policy import RequestContext
from bastion.gateway.relay import (
    StreamTally,
    answer_texts,
    inspect_chunk,
    split_events,
    upstream_body,
    usage_of,
)
from bastion.gateway.upstream_choice import UpstreamChoice
from bastion.records import RequestRecord, RequestRecorder
from bastion.routing.profiles import RouteRequest, RoutingError, split_model
from bastion.telemetry.tracing import GatewayTracing, activated
from bastion.tenancy.authenticator import Authenticator
from bastion.tenancy.budgets import BudgetTracker
from bastion.tenancy.invalidation import InvalidationListener
from bastion.tenancy.limiter import Limiter
from bastion.tenancy.usage import UsageRecorder

log = logging.getLogger("bastion.gateway")
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
FLUSH_LOG_EVERY_S = 60.0
FLUSH_STOP_WAIT_S = 5.0  # at close, how long the flush in progress may take before it is cancelled
_NOOP = contextlib.nullcontext()  # the span of a step when tracing is off: shared, nothing allocated


@dataclass(frozen=True)
class GatewayParts:
    """What one GatewayService works with, built by the composer (`serve/gateway_app.py`)."""

    upstreams: UpstreamChoice  # affinity → routing → in-flight count → failover, over the engine client
    auth: Authenticator
    limiter: Limiter
    budgets: BudgetTracker
    usage: UsageRecorder  # always the first recorder: `/v1/usage` reads what it flushes
    recorders: Sequence[RequestRecorder] = ()  # metrics, the audit recorder, ...
    tracing: GatewayTracing | None = None
    listener: InvalidationListener | None = None  # key changes announced over Redis


class GatewayService:
    def __init__(self, parts: GatewayParts, *, max_body_bytes: int, flush_interval_s: float = 1.0) -> None:
        self.upstreams = parts.upstreams
        self.auth = parts.auth
        self.limiter = parts.limiter
        self.budgets = parts.budgets
        self.usage = parts.usage
        self.recorders = [parts.usage, *parts.recorders]
        self.tracing = parts.tracing
        self.listener = parts.listener
        self.max_body_bytes = max_body_bytes
        self.open_traces = 0  # requests whose trace is not finished yet
        self._flush_interval_s = flush_interval_s
        self._flush_failing: dict[str, float] = {}  # step → when its failure was last logged
        self._flusher: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def engine(self) -> EngineClient:
        return self.upstreams.engine

    @property
    def in_flight(self) -> dict[str, int]:
        """Requests in flight per upstream (routing's load signal, the in-flight gauge)."""
        return self.upstreams.in_flight

    # --- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        if self.listener is not None:
            self.listener.start()
        if (self._flusher is None or self._flusher.done()) and not self._closing.is_set():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        """Flush every interval until `aclose`. Never cancelled mid-flush: a flush holds the counters it writes."""
        while not self._closing.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._flush_interval_s):
                    await self._closing.wait()
            await self.flush()

    async def flush(self) -> None:
        for name, step in (("usage counters", self.usage.flush), ("last-used times", self.auth.flush_last_used)):
            try:
                await step()
            except Exception as exc:
                self._flush_failed(name, exc)
            else:
                if self._flush_failing.pop(name, None) is not None:
                    log.warning("flush of %s works again; what was kept has been written", name)

    def _flush_failed(self, name: str, exc: Exception) -> None:
        """Log the first failure with its traceback, then once a minute: the loop retries every second while the
        database is down, and what failed stays pending, so nothing is lost by logging less."""
        now = time.monotonic()
        last = self._flush_failing.get(name)
        if last is None:
            log.exception("flush of %s failed; kept for the next try", name)
        elif now - last >= FLUSH_LOG_EVERY_S:
            log.error("flush of %s still failing (%s); kept for the next try", name, type(exc).__name__)
        else:
            return
        self._flush_failing[name] = now

    async def aclose(self) -> None:
        if self.listener is not None:
            await self.listener.stop()
        self._closing.set()  # the flush loop ends after the flush it may be in
        if self._flusher is not None:
            await asyncio.wait({self._flusher}, timeout=FLUSH_STOP_WAIT_S)
            await stop_task(self._flusher)  # a flush stuck on a dead database: the final flush below keeps its data
            self._flusher = None
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.flush()
        await self.limiter.aclose()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- inference ------------------------------------------------------------------------------------

    async def inference(self, request: Request, endpoint: Endpoint, request_id: str) -> Response:
        self.start()
        ctx = RequestContext(request_id=request_id, endpoint=endpoint)
        try:
            if self.tracing is None:
                return await self._inference(request, endpoint, ctx)
            ctx.trace = self.tracing.begin(request.headers, endpoint, request_id)
            self.open_traces += 1
            with activated(ctx.trace.root):
                return await self._inference(request, endpoint, ctx)
        except ApiError as exc:
            ctx.status, ctx.error_code = exc.status, exc.code
            await self._finish(ctx)
            return exc.response()
        except Exception as exc:  # the type only: a message could quote the prompt
            log.error("request %s failed: %s", request_id, type(exc).__name__)
            ctx.status, ctx.error_code = 500, "internal_error"
            await self._finish(ctx)
            return ApiError(500, "The gateway failed to handle the request", code="internal_error").response()

    async def _inference(self, request: Request, endpoint: Endpoint, ctx: RequestContext) -> Response:
        """Authenticate → read and validate → resolve the model → count prompt tokens → place on an upstream →
        admit against limits → send (one failover if the upstream went away before answering)."""
        policy.check_declared_size(request, self.max_body_bytes)
        with _step(ctx, "authenticate"):
            principal = ctx.principal = await policy.authenticate(self.auth, request, "inference", ctx)
        require_api(principal, endpoint)
        ctx.session_id = policy.session_id(request)
        body = await policy.read_json(request, self.max_body_bytes)
        parsed = policy.validate(endpoint, body)
        if principal.log_content:  # the tenant opted in: the audit log stores it, encrypted
            ctx.prompt = body.get("messages") if endpoint == "chat" else body.get("prompt")
        ctx.stream = parsed.stream
        upstreams, explicit = self._resolve_model(ctx, request, parsed.model)
        # The one place the model name is set: engines know the plain name; streams always ask for usage.
        body = upstream_body(body, ctx.model, parsed.stream)
        with _step(ctx, "count_tokens"):
            ctx.prompt_tokens = await self._count_tokens(upstreams, endpoint, body)
        route = RouteRequest(
            model=ctx.model,
            prompt_tokens=ctx.prompt_tokens,
            max_tokens=parsed.completion_limit,
            has_tools=bool(getattr(parsed, "tools", None)),
            explicit_profile=explicit[0],
            explicit_source=explicit[1],
            tenant_default=principal.default_profile,
            allowed_profiles=principal.allowed_profiles,
        )
        try:
            with _step(ctx, "route"):
                tenant = (principal.tenant_id, principal.tenant_name, principal.fair_share_weight)
                ctx.placement = await self.upstreams.place_waiting(route, upstreams, ctx.session_id, body, tenant)
        except RoutingError as exc:
            headers = {"retry-after": str(exc.retry_after)} if exc.status == 429 else None
            raise ApiError(exc.status, str(exc), code=exc.code, param=exc.param, headers=headers) from None
        with _step(ctx, "limits"):
            reserve = policy.reservation(ctx.prompt_tokens, parsed.completion_limit, ctx.placement.decision.max_context)
            ctx.admission = await policy.admit(self.limiter, self.budgets, ctx, principal, ctx.prompt_tokens, reserve)
        keep_usage = bool(parsed.stream and parsed.stream_options and parsed.stream_options.include_usage)
        try:
            try:
                return await self._send(ctx, endpoint, body, keep_usage)
            except UpstreamUnavailable:  # gone before any token reached the client: one more try elsewhere
                ctx.placement = self.upstreams.failover(ctx.placement)
                return await self._send(ctx, endpoint, body, keep_usage)
        except UpstreamUnavailable:
            raise ApiError(
                503, "No replica can serve this request right now; retry shortly", code="no_upstream"
            ) from None
        except ApiError as exc:
            exc.headers.update(policy.rate_headers(ctx))
            raise

    def _resolve_model(
        self, ctx: RequestContext, request: Request, requested: str
    ) -> tuple[list[UpstreamInfo], tuple[str | None, str | None]]:
        """The model's upstreams and the explicit profile (name, source: alias or header); sets `ctx.model`, so
        only a configured name reaches usage rows and metric labels (never arbitrary text)."""
        base, alias_profile = split_model(requested)
        header_profile = policy.profile_header(request)
        if alias_profile and header_profile and alias_profile != header_profile:
            raise ApiError(400, f"Model alias asks for `{alias_profile}`, header for `{header_profile}`", param="model")
        upstreams = self.upstreams.upstreams_of(base)
        if not upstreams:
            raise ApiError(404, f"The model `{requested}` does not exist", code="model_not_found", param="model")
        ctx.model = base
        assert ctx.principal is not None
        if not ctx.principal.may_use_model(base):
            raise ApiError(403, f"You are not allowed to use the model `{base}`", code="model_not_allowed")
        if alias_profile:
            return upstreams, (alias_profile, "alias")
        return upstreams, (header_profile, "header" if header_profile else None)

    async def _send(self, ctx: RequestContext, endpoint: Endpoint, body: dict[str, Any], keep_usage: bool):
        assert ctx.decision is not None
        if ctx.trace is not None:
            body = ctx.trace.engine_body(ctx.decision.upstream, body)
        if ctx.stream:
            return await self._stream(ctx, endpoint, body, keep_usage)
        return await self._complete(ctx, endpoint, body)

    async def _count_tokens(self, upstreams: list[UpstreamInfo], endpoint: Endpoint, body: dict[str, Any]) -> int:
        for upstream in upstreams:
            try:
                return await self.engine.count_prompt_tokens(upstream.name, endpoint, body)
            except UpstreamUnavailable:
                continue
            except (ValueError, TypeError, KeyError) as exc:
                raise ApiError(400, f"The prompt could not be tokenized: {exc}", param="messages") from None
        raise ApiError(503, "No replica can serve this model right now; retry shortly", code="no_upstream")

    async def _complete(self, ctx: RequestContext, endpoint: Endpoint, body: dict[str, Any]) -> Response:
        assert ctx.decision is not None
        answer = await self.engine.complete(ctx.decision.upstream, endpoint, body, session_id=ctx.session_id)
        ctx.ttft = time.perf_counter()
        ctx.status, ctx.replica = answer.status, answer.replica
        if ctx.trace is not None:
            ctx.trace.engine_done(answer.status)
        headers = policy.rate_headers(ctx)
        if answer.status >= 400:
            out = answer.body if is_error_body(answer.body) else policy_error_body(answer.status)
            code = out["error"].get("code")  # a named code (engine_error) goes to the record; a bare status does not
            ctx.error_code = code if isinstance(code, str) and code else "upstream_error"
            if answer.status == 503:
                headers["retry-after"] = "1"
        else:
            prompt, completion, ctx.speculation = usage_of(answer.body)
            ctx.prompt_tokens = prompt if prompt is not None else ctx.prompt_tokens
            ctx.completion_tokens = completion or 0
            out = answer.body
            if ctx.prompt is not None:
                ctx.completion = answer_texts(answer.body)
        await self._finish(ctx)
        return JSONResponse(out, status_code=answer.status, headers=headers)

    async def _stream(self, ctx: RequestContext, endpoint: Endpoint, body: dict[str, Any], keep_usage: bool):
        assert ctx.decision is not None
        events = self.engine.stream(ctx.decision.upstream, endpoint, body, session_id=ctx.session_id).__aiter__()
        try:
            first = await events.__anext__()
            if (replica := notice_replica(first)) is not None:
                ctx.replica = replica
                first = await events.__anext__()
        except StopAsyncIteration:
            first = None
        ctx.ttft = time.perf_counter()
        refused = first_event_error(first)
        if refused is not None:  # refused before any token: answer with a status the SDK maps, not a 200 stream
            with contextlib.suppress(Exception):
                await events.aclose()  # type: ignore[attr-defined]
            raise refused
        tally = StreamTally(texts={} if ctx.prompt is not None else None)
        return StreamingResponse(
            self._relay(ctx, events, first, tally, keep_usage),
            media_type="text/event-stream",
            headers={**SSE_HEADERS, **policy.rate_headers(ctx)},
        )

    async def _relay(
        self, ctx: RequestContext, events: AsyncIterator[str], first: str | None, tally: StreamTally, keep: bool
    ) -> AsyncIterator[str]:
        detached = False
        inspect = anthropic.inspect_chunk if ctx.endpoint == "messages" else inspect_chunk
        try:
            if first is not None:
                out = inspect(first, tally, keep)
                if out is not None:
                    yield out
                async for event in events:
                    out = inspect(event, tally, keep)
                    if out is not None:
                        yield out
        except (asyncio.CancelledError, GeneratorExit):
            detached = True
            if not tally.done:  # a client that hangs up after [DONE] (SDKs do) had the whole answer
                ctx.status, ctx.error_code = 499, "client_disconnected"
            raise
        except UpstreamUnavailable:
            ctx.status, ctx.error_code = 503, "no_upstream"
            yield 'data: {"error": {"message": "The replica went away mid-stream", "type": "service_unavailable"}}\n\n'
        except Exception as exc:
            log.error("stream relay failed (request %s): %s", ctx.request_id, type(exc).__name__)
            ctx.status, ctx.error_code = 502, "upstream_error"
            yield 'data: {"error": {"message": "The stream failed upstream", "type": "server_error"}}\n\n'
        finally:
            if tally.error is not None and ctx.status < 400:
                ctx.status, ctx.error_code = 500, str(tally.error.get("code") or "upstream_error")
            if tally.prompt_tokens is not None:
                ctx.prompt_tokens = tally.prompt_tokens
            ctx.completion_tokens = tally.completion_tokens if tally.completion_tokens is not None else tally.chunks
            ctx.speculation = tally.speculation
            if tally.texts is not None:
                ctx.completion = tally.completion()
            if detached:  # this task is being cancelled: any await here could be cut short, so hand it off
                self._spawn(self._close_and_finish(events, ctx))
            else:
                await self._close_and_finish(events, ctx)

    async def _close_and_finish(self, events: AsyncIterator[str], ctx: RequestContext) -> None:
        with contextlib.suppress(Exception):
            await events.aclose()  # type: ignore[attr-defined]
        await self._finish(ctx)

    # --- the end of every request ------------------------------------------------------------------------

    async def _finish(self, ctx: RequestContext) -> None:
        """Free slots, settle reservations to the tokens used, hand the record over; never raises."""
        if ctx.finished:
            return
        ctx.finished = True
        if ctx.decision is not None:
            self.upstreams.release(ctx.decision.upstream)
        try:
            if ctx.admission is not None:
                tokens = ctx.prompt_tokens + ctx.completion_tokens
                await self.limiter.finish(ctx.admission, ctx.completion_tokens, used=tokens)  # budgets too
        except Exception:
            log.exception("limit release failed (request %s)", ctx.request_id)
        record = self.to_record(ctx)
        trace, ctx.trace = ctx.trace, None
        if trace is None:
            self.record(record)
            return
        with trace.step("audit.hand_off"):
            self.record(record)
        trace.finish(record)
        self.open_traces -= 1

    def to_record(self, ctx: RequestContext) -> RequestRecord:
        now = time.perf_counter()
        p, d = ctx.principal, ctx.decision
        return RequestRecord(
            request_id=ctx.request_id,
            tenant_id=p.tenant_id if p else None,
            key_id=p.key_id if p else None,
            endpoint=ctx.endpoint,
            model=ctx.model,
            profile=d.profile if d else None,
            upstream=d.upstream if d else None,
            routing_reason=d.reason if d else None,
            status=ctx.status,
            error_code=ctx.error_code,
            stream=ctx.stream,
            prompt_tokens=ctx.prompt_tokens if ctx.admission is not None else 0,
            completion_tokens=ctx.completion_tokens,
            started_at=ctx.started_at,
            latency_ms=(now - ctx.started) * 1000,
            ttft_ms=(ctx.ttft - ctx.started) * 1000 if ctx.ttft is not None else None,
            speculation=ctx.speculation,
            key_prefix=ctx.key_prefix,
            client_address=ctx.client_address,
            replica=f"{d.upstream}#{ctx.replica}" if d and ctx.replica else None,
            content={"prompt": ctx.prompt, "completion": ctx.completion} if ctx.prompt is not None else None,
        )

    def record(self, record: RequestRecord) -> None:
        for recorder in self.recorders:
            try:
                recorder.record(record)
            except Exception:
                log.exception("recorder %s failed", type(recorder).__name__)
        log.debug(
            "request %s tenant=%s endpoint=%s model=%s profile=%s status=%s latency_ms=%.1f",
            record.request_id,
            record.tenant_id,
            record.endpoint,
            record.model,
            record.profile,
            record.status,
            record.latency_ms,
        )


def _step(ctx: RequestContext, name: str) -> contextlib.AbstractContextManager[Any]:
    """A child span of the request when tracing is on; else a shared no-op."""
    return ctx.trace.step(name) if ctx.trace is not None else _NOOP


def first_event_error(event: str | None) -> ApiError | None:
    """An engine error sent as the first SSE event, as an ApiError with the engine's status (default 500)."""
    if event is None or '"error"' not in event or not event.startswith("data:"):
        return None
    event = split_events(event)[0]
    try:
        data = json.loads(event[5:])
    except ValueError:
        return None
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return None
    code = error.get("code")
    status = code if isinstance(code, int) and 400 <= code < 600 else 500
    return ApiError(
        status,
        str(error.get("message") or "The engine refused the request"),
        code=None if isinstance(code, int) else code,
        param=error.get("param"),
        type=error.get("type"),
    )


def policy_error_body(status: int) -> dict[str, Any]:
    return ApiError(status, "The engine could not complete the request", code="upstream_error").body()
