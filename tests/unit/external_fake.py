"""A tiny OpenAI-compatible server for the external-replica unit tests (a test double: real HTTP on loopback,
scripted answers). It speaks like llama-server (`timings` with draft counts, /apply-template, /tokenize) or like
vLLM (`metrics.speculative_decoding`, /tokenize with `count`), can fail on demand, and can be stopped and
started again on the same port to play a dead upstream."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse


@dataclass
class Behaviour:
    style: str = "llama_cpp"  # llama_cpp | vllm | plain
    healthy: bool = True
    fail_status: int | None = None  # answer completions with this status
    fail_body: dict[str, Any] | None = None
    words: list[str] = field(default_factory=lambda: ["one", "two", "three"])
    requests: list[dict[str, Any]] = field(default_factory=list)
    auth: list[str | None] = field(default_factory=list)


def _spec(style: str) -> dict[str, Any]:
    if style == "llama_cpp":
        return {"timings": {"predicted_n": 3, "draft_n": 4, "draft_n_accepted": 3}}
    if style == "vllm":
        return {"metrics": {"speculative_decoding": {"num_draft_tokens": 6, "num_accepted_draft_tokens": 5}}}
    return {}


def build_app(b: Behaviour) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    @app.get("/v1/models")
    async def health() -> Response:
        if not b.healthy:
            return JSONResponse({"error": "loading"}, status_code=503)
        return JSONResponse({"object": "list", "data": [{"id": "served-name", "object": "model"}]})

    @app.post("/apply-template")
    async def apply_template(request: Request) -> Response:
        body = await request.json()
        return JSONResponse({"prompt": " ".join(m["content"] for m in body["messages"])})

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        body = await request.json()
        if b.style == "vllm":
            return JSONResponse({"count": 7, "tokens": list(range(7))})
        return JSONResponse({"tokens": list(range(len(body["content"].split()) + 1))})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await request.json()
        b.requests.append(body)
        b.auth.append(request.headers.get("authorization"))
        if b.fail_status is not None:
            return JSONResponse(b.fail_body or {"error": {"message": "boom"}}, status_code=b.fail_status)
        usage = {"prompt_tokens": 5, "completion_tokens": len(b.words), "total_tokens": 5 + len(b.words)}
        if not body.get("stream"):
            message = {"role": "assistant", "content": " ".join(b.words)}
            return JSONResponse(
                {
                    "id": "x",
                    "object": "chat.completion",
                    "model": body["model"],
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": usage,
                    **_spec(b.style),
                }
            )

        async def events():
            for word in b.words:
                chunk = {
                    "object": "chat.completion.chunk",
                    "model": body["model"],
                    "choices": [{"delta": {"content": word}}],
                }
                yield f"data: {json.dumps(chunk)}\n\n"
                await asyncio.sleep(0.01)
            last = {"object": "chat.completion.chunk", "model": body["model"], "choices": [], "usage": usage}
            if b.style == "llama_cpp":  # timings on the finishing chunk, usage on its own (as llama-server does)
                finish = {"choices": [{"delta": {}, "finish_reason": "stop"}], "model": body["model"], **_spec(b.style)}
                yield f"data: {json.dumps(finish)}\n\n"
            else:
                last.update(_spec(b.style))
            yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


class FakeUpstream:
    """Serve `build_app` on 127.0.0.1:port in a thread; `stop()` and `start()` again to play a crash."""

    def __init__(self, port: int, behaviour: Behaviour | None = None) -> None:
        self.port = port
        self.behaviour = behaviour or Behaviour()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeUpstream:
        config = uvicorn.Config(
            build_app(self.behaviour), host="127.0.0.1", port=self.port, log_level="error", lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake upstream did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._server.force_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self._server = self._thread = None
