"""EngineReplica: one vLLM AsyncLLM in this process, served through vLLM's own OpenAI layer.

Bodies go in as OpenAI JSON and come out as OpenAI JSON or SSE lines, so the gateway relays them untouched.
The replica owns the engine and nothing else: no tenants, no auth, no database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import ValidationError

from bastion.background import stop_task
from bastion.engine.engine_args import EngineSpec, check_mtp
from bastion.engine.guard import SpeculationGuard, Verdict
from bastion.engine.manifest import verify_manifest
from bastion.engine.speculation import engine_totals, load_totals
from bastion.engine.tracing import ReplicaTracing, request_timings, split_trace
from bastion.records import SpeculationStats

log = logging.getLogger(__name__)
Endpoint = Literal["chat", "completion", "messages"]  # messages: Anthropic's, through vLLM's own layer
_DONE = object()
# Stream messages sooner than this after the previous one wait for those that follow (at most this long): fewer,
# larger messages across each hop. The first token never waits (`coalesce`).
STREAM_COALESCE_S = 0.02


def error_body(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


class InvalidRequest(ValueError):
    """The body is not a valid OpenAI request; carries the OpenAI error body."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.body = error_body(400, message, param=param)


def _invalid(exc: Exception) -> InvalidRequest:
    if isinstance(exc, ValidationError) and exc.errors():
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        return InvalidRequest(f"{param}: {first['msg']}" if param else first["msg"], param)
    # vLLM's own validators raise TypeError/ValueError on some shapes (e.g. `messages` not a list).
    return InvalidRequest(f"invalid request: {str(exc).splitlines()[0][:200]}", None)


class EngineReplica:
    """Start with `await EngineReplica.create(spec)`; stop with `await replica.drain(grace_s)`."""

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        self.engine: Any = None
        self._chat: Any = None
        self._completion: Any = None
        self._messages: Any = None  # vLLM's AnthropicServingMessages
        self._tokenize: Any = None
        self._in_flight = 0
        self._draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        self.started_at: float | None = None
        self.tracing: ReplicaTracing | None = None  # set by the deployment when traces are exported
        self._drift: Any = None  # DriftMonitor, made at the first scrape of a speculative replica
        self.guard: SpeculationGuard | None = None  # speculating replicas: canary rounds (engine/guard.py)
        self.guard_failed: Verdict | None = None  # set once a round fails: the replica leaves routing for good
        self._guard_task: asyncio.Task | None = None

    @classmethod
    async def create(cls, spec: EngineSpec) -> EngineReplica:
        replica = cls(spec)
        await replica.start()
        return replica

    # --- lifecycle ------------------------------------------------------------------------------

    def preflight(self) -> None:
        """Checks that need no engine: the files match their manifest; MTP only on a checkpoint that has it."""
        from pathlib import Path

        if self.spec.verify_manifest:
            verify_manifest(Path(self.spec.path), self.spec.model)
        spec_cfg = self.spec.engine_kwargs.get("speculative_config") or {}
        if spec_cfg.get("method") == "mtp":
            check_mtp(self.spec.model, self.spec.profile, Path(self.spec.path))
        if spec_cfg:
            from bastion.engine.guard_replica import preflight_guard

            preflight_guard(self.spec, spec_cfg)

    async def start(self) -> None:
        self.preflight()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.spec.engine_kwargs))
        self._build_openai_layer(self.spec.tool_parser)
        if self.spec.guard is not None:
            await self._start_guard()
        self.started_at = time.time()
        log.info("engine ready: %s@%s", self.spec.model, self.spec.profile)

    async def _start_guard(self) -> None:
        """The first canary round runs before the replica is ready; a failure keeps it out of routing."""
        from pathlib import Path

        from bastion.engine.guard_replica import make_guard

        assert self.spec.guard is not None
        self.guard = make_guard(self.spec.guard, Path(self.spec.path))
        self.on_guard_verdict(await self.guard.check(self.engine, "start"))
        self._guard_task = asyncio.create_task(self.guard.watch(lambda: self.engine, self.on_guard_verdict))

    def on_guard_verdict(self, verdict: Verdict) -> None:
        if not verdict.ok and self.guard_failed is None:
            self.guard_failed = verdict
            log.error(
                "speculation guard failed on %s@%s: the replica leaves routing (%s)",
                self.spec.model,
                self.spec.profile,
                verdict.reason,
            )

    async def guard_check(self, trigger: str = "manual") -> dict[str, Any]:
        """A canary round now (EngineDeployment.guard_check); a failure takes the replica out of routing."""
        if self.guard is None or self.engine is None:
            return {"ok": None, "reason": "this replica does not speculate or its guard is off"}
        verdict = await self.guard.check(self.engine, trigger)
        self.on_guard_verdict(verdict)
        return verdict.to_dict()

    @property
    def routable(self) -> bool:
        return not self._draining and self.guard_failed is None

    def _build_openai_layer(self, tool_parser: str | None) -> None:
        from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
        from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
        from vllm.entrypoints.openai.models.protocol import BaseModelPath
        from vllm.entrypoints.openai.models.serving import OpenAIServingModels
        from vllm.entrypoints.serve.tokenize.serving import ServingTokenization
        from vllm.renderers.online_renderer import OnlineRenderer

        models = OpenAIServingModels(self.engine, [BaseModelPath(self.spec.served_name, self.spec.path)])
        renderer = OnlineRenderer(
            self.engine.model_config,
            self.engine.renderer,
            request_logger=None,
            chat_template=None,
            chat_template_content_format="auto",
            enable_auto_tools=tool_parser is not None,
            tool_parser=tool_parser,
        )
        renderer.warmup()
        common = {"online_renderer": renderer, "request_logger": None, "enable_per_request_metrics": True}
        chat_like = {
            "chat_template": None,
            "chat_template_content_format": "auto",
            "enable_auto_tools": tool_parser is not None,
            "tool_parser": tool_parser,
        }
        self._chat = OpenAIServingChat(self.engine, models, "assistant", **chat_like, **common)
        self._completion = OpenAIServingCompletion(self.engine, models, **common)
        from vllm.entrypoints.anthropic.serving import AnthropicServingMessages

        # Anthropic's Messages: vLLM's layer over the same chat path (it takes no per-request metrics flag).
        self._messages = AnthropicServingMessages(
            self.engine, models, "assistant", **chat_like, online_renderer=renderer, request_logger=None
        )
        self._tokenize = ServingTokenization(
            models, renderer, request_logger=None, chat_template=None, chat_template_content_format="auto"
        )

    async def check_health(self) -> None:
        """Raise when the engine is dead, so Serve replaces this replica."""
        if self.engine is None:
            raise RuntimeError("engine not started")
        await self.engine.check_health()

    async def drain(self, grace_s: float) -> None:
        """Refuse new requests, let in-flight ones finish within the grace period, then stop the engine."""
        self._draining = True
        if self._guard_task is not None:
            self._guard_task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout=grace_s)
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    # --- requests -------------------------------------------------------------------------------

    def _request(self, endpoint: Endpoint, body: dict[str, Any]) -> Any:
        if endpoint == "chat":
            from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as Request

        elif endpoint == "messages":
            from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest as Request

        else:
            from vllm.entrypoints.openai.completion.protocol import CompletionRequest as Request
        try:
            return Request.model_validate({**body, "model": self.spec.served_name})
        except (ValueError, TypeError) as exc:
            raise _invalid(exc) from None

    async def _call(self, endpoint: Endpoint, body: dict[str, Any]) -> Any:
        request = self._request(endpoint, body)
        if endpoint == "chat":
            return await self._chat.create_chat_completion(request, None)
        if endpoint == "messages":
            return await self._messages.create_messages(request, None)
        return await self._completion.create_completion(request, None)

    @contextlib.contextmanager
    def _tracked(self):
        if self._draining:
            raise ReplicaDraining(f"{self.spec.model}@{self.spec.profile} is draining")
        if self.guard_failed is not None:
            raise SpeculationGuardFailed(
                f"{self.spec.model}@{self.spec.profile} failed its speculation guard: {self.guard_failed.reason}"
            )
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    def _span_attributes(self, endpoint: Endpoint) -> dict[str, Any]:
        return {"bastion.model": self.spec.model, "bastion.profile": self.spec.profile, "bastion.endpoint": endpoint}

    async def complete(self, endpoint: Endpoint, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """A non-streaming request: (HTTP status, OpenAI body)."""
        body, carrier = split_trace(body)
        if carrier is None or self.tracing is None:
            return await self._complete(endpoint, body)
        with self.tracing.span("engine.replica.complete", carrier, self._span_attributes(endpoint)) as span:
            status, data = await self._complete(endpoint, body)
            span.set_attribute("http.response.status_code", status)
            request_timings(span, data.get("metrics"))
            return status, data

    async def _complete(self, endpoint: Endpoint, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self._tracked():
            try:
                result = await self._call(endpoint, {**body, "stream": False})
            except InvalidRequest as exc:
                return 400, exc.body
            data = result.model_dump(mode="json", exclude_none=True)
            if "error" in data:
                return int(data["error"].get("code") or 400), data
            if self.guard is not None:
                self.guard.note_request(body, data)
            return 200, data

    def stream(self, endpoint: Endpoint, body: dict[str, Any]) -> AsyncIterator[str]:
        """A streaming request as SSE text. Lines ready together are sent together: each message through a
        Ray handle costs ~0.6 ms, so coalescing keeps the relay cheap under load without adding latency."""
        body, carrier = split_trace(body)
        if carrier is None or self.tracing is None:
            return self._stream(endpoint, body)
        return self._traced_stream(endpoint, body, carrier)

    async def _traced_stream(self, endpoint: Endpoint, body: dict[str, Any], carrier: dict[str, str]):
        assert self.tracing is not None
        with self.tracing.span("engine.replica.stream", carrier, self._span_attributes(endpoint)) as span:
            first = True
            async for batch in self._stream(endpoint, body):
                if first:
                    span.add_event("first_chunk")
                    first = False
                yield batch

    async def _stream(self, endpoint: Endpoint, body: dict[str, Any]) -> AsyncIterator[str]:
        with self._tracked():
            try:
                result = await self._call(endpoint, {**body, "stream": True})
            except InvalidRequest as exc:
                yield f"data: {_json(exc.body)}\n\n"
                return
            if not hasattr(result, "__aiter__"):
                yield f"data: {_json(result.model_dump(mode='json', exclude_none=True))}\n\n"
                return
            async for batch in coalesce(result):
                yield batch
            if self.guard is not None:
                self.guard.note_request(body, None)

    async def count_prompt_tokens(self, endpoint: Endpoint, body: dict[str, Any]) -> int:
        """Prompt tokens as the chat template and tokenizer count them (vLLM's /tokenize logic)."""
        from vllm.entrypoints.serve.tokenize.protocol import TokenizeChatRequest, TokenizeCompletionRequest

        if endpoint == "messages":
            return await self._count_message_tokens(body)
        if endpoint == "chat":
            fields = {k: body[k] for k in ("messages", "tools", "add_generation_prompt") if k in body}
            request: Any = TokenizeChatRequest.model_validate({**fields, "model": self.spec.served_name})
        else:
            prompt = body.get("prompt", "")
            request = TokenizeCompletionRequest.model_validate({"prompt": prompt, "model": self.spec.served_name})
        result = await self._tokenize.create_tokenize(request, None)
        data = result.model_dump()
        if "error" in data:
            raise ValueError(data["error"]["message"])
        return int(data["count"])

    async def _count_message_tokens(self, body: dict[str, Any]) -> int:
        """An Anthropic body's prompt tokens: vLLM's own count_tokens (the chat template over the converted body)."""
        from vllm.entrypoints.anthropic.protocol import AnthropicCountTokensRequest

        fields = {k: body[k] for k in ("messages", "system", "tools", "tool_choice") if k in body}
        try:
            request = AnthropicCountTokensRequest.model_validate({**fields, "model": self.spec.served_name})
        except (ValueError, TypeError) as exc:
            raise ValueError(str(_invalid(exc))) from None
        data = (await self._messages.count_tokens(request, None)).model_dump()
        if "error" in data:
            raise ValueError(data["error"]["message"])
        return int(data["input_tokens"])

    # --- statistics -----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Replica state for routing and dashboards: load, vLLM's token/request counters (cumulative: readers
        derive rates from two samples and their `time`) and its speculation counters."""
        from vllm.v1.metrics.reader import get_metrics_snapshot

        snapshot = get_metrics_snapshot()
        speculation = engine_totals(snapshot) if self.spec.speculative else SpeculationStats()
        return {
            "model": self.spec.model,
            "profile": self.spec.profile,
            "time": time.time(),
            "in_flight": self._in_flight,
            "draining": self._draining,
            "routable": self.routable,
            **load_totals(snapshot),
            "speculation": speculation.to_dict(),
            "guard": self.guard.summary() if self.guard is not None else None,
        }

    def metrics(self) -> str:
        """Prometheus text of this replica process: vLLM's own registry (KV cache usage, queue, speculation
        counters, ...) and the replica's load. One engine per process, so the default registry is this engine's."""
        from prometheus_client import REGISTRY, generate_latest

        labels = f'model="{self.spec.model}",profile="{self.spec.profile}"'
        own = (
            "# HELP bastion_engine_in_flight Requests in this engine replica\n"
            "# TYPE bastion_engine_in_flight gauge\n"
            f"bastion_engine_in_flight{{{labels}}} {self._in_flight}\n"
            "# HELP bastion_engine_draining 1 while the replica drains before shutdown\n"
            "# TYPE bastion_engine_draining gauge\n"
            f"bastion_engine_draining{{{labels}}} {int(self._draining)}\n"
        )
        guard = self.guard.exposition(self.spec.model, self.spec.profile, self.routable) if self.guard else ""
        return generate_latest(REGISTRY).decode() + own + guard + self._drift_metrics()

    def _drift_metrics(self) -> str:
        if not self.spec.speculative:
            return ""
        from vllm.v1.metrics.reader import get_metrics_snapshot

        return self.drift_metrics(engine_totals(get_metrics_snapshot()))

    def drift_metrics(self, totals: SpeculationStats) -> str:
        """Live acceptance (recent window of these cumulative counters) against the baseline stored with the
        weights (engine/mtp/drift.py); called per scrape, so the window advances with the scrapes."""
        from pathlib import Path

        from bastion.engine.mtp.drift import DriftMonitor, drift_exposition

        if self._drift is None:
            try:
                self._drift = DriftMonitor.from_folder(Path(self.spec.path), **self.spec.drift)
            except (OSError, ValueError, TypeError) as exc:
                log.warning("acceptance baseline unreadable in %s: %s", self.spec.path, type(exc).__name__)
                self._drift = DriftMonitor({}, **self.spec.drift)
        return drift_exposition(self._drift.observe(self.spec.profile, totals), self.spec.model)


class ReplicaDraining(RuntimeError):
    """The replica is shutting down and takes no new requests."""


class SpeculationGuardFailed(ReplicaDraining):
    """The replica failed its speculation guard: out of routing (the gateway fails over) until it restarts."""


def _json(data: dict[str, Any]) -> str:
    import json

    return json.dumps(data, separators=(",", ":"))


async def coalesce(source: AsyncIterator[str], window_s: float = STREAM_COALESCE_S) -> AsyncIterator[str]:
    """Yield what the source produced since the last yield, as one string: each message through a Ray handle (and
    again from the gateway to the client's connection) has a fixed cost. The first message goes at once; a later
    one that comes sooner than `window_s` after the previous send waits at most the rest of the window for those
    that follow (the end of the stream or an error ends the wait). Messages spaced wider than the window, as a
    CPU engine's tokens are, go at once."""
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for item in source:
                queue.put_nowait(item)
        except Exception as exc:
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(_DONE)

    def final(item: Any) -> bool:
        return item is _DONE or isinstance(item, Exception)

    task = asyncio.create_task(pump())
    last_sent: float | None = None
    try:
        while True:
            items = [await queue.get()]
            wait = last_sent + window_s - time.monotonic() if last_sent is not None and window_s > 0 else 0.0
            if wait > 0 and not final(items[-1]):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        while not final(items[-1]):
                            items.append(await queue.get())
            while not queue.empty():
                items.append(queue.get_nowait())
            done = any(i is _DONE for i in items)
            errors = [i for i in items if isinstance(i, Exception)]
            text = "".join(i for i in items if isinstance(i, str))
            if errors:
                log.error("stream failed: %s", type(errors[0]).__name__)
                text += f"data: {_json(error_body(500, 'the engine failed mid-stream', 'engine_error'))}\n\n"
            if text:
                yield text
                last_sent = time.monotonic()
            if done or errors:
                return
    finally:
        await stop_task(task)
