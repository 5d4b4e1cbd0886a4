"""Streaming chat measured from the client, and CPU per request per process group, for `bastion bench e2e`.

The client is aiohttp (a third of httpx's CPU per request: it shares two cores with what it measures) and parses
only what it must: the time of each content event, the usage chunk, an error. Per stream: time to first token,
whole-stream time, completion tokens, and decode rate = (tokens − 1) / (last token − first token), so prefill and
the path's fixed cost are left out. CPU is read with psutil from every process under this one (the servers it
started, Ray's processes and the engines under them), grouped by role, before and after each round.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import psutil

from bastion.bench.load import _label


@dataclass
class StreamResult:
    ok: bool
    error: str | None = None
    ttft_ms: float | None = None
    total_ms: float = 0.0
    tokens: int = 0
    decode_tok_s: float | None = None
    request_id: str = ""


def chat_body(model: str, max_tokens: int, *, greedy: bool = False, ignore_eos: bool = False) -> dict[str, Any]:
    """A streaming chat request with usage; each request's prompt differs (no prefix cache hit across requests
    beyond the shared opening, as with real users)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": f"Count to ten. Request {uuid.uuid4().hex[:8]}."}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if greedy:
        body["temperature"] = 0.0
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM's extension: every answer has max_tokens tokens
    return body


async def one_stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> StreamResult:
    started = time.perf_counter()
    first = last = None
    events = 0
    usage_tokens = None
    request_id = ""
    try:
        async with session.post(url, data=json.dumps(body).encode()) as response:
            request_id = (response.headers.get("x-request-id") or "").split(",")[0].strip()
            if response.status != 200:
                await response.read()
                return StreamResult(False, f"http_{response.status}", request_id=request_id)
            done = False
            async for raw in response.content:
                if not raw.startswith(b"data: "):
                    continue
                if raw.startswith(b"data: [DONE]"):
                    done = True
                    continue
                if b'"content"' in raw and b'"content":""' not in raw and b'"content": ""' not in raw:
                    now = time.perf_counter()
                    first = first if first is not None else now
                    last = now
                    events += 1
                if b'"usage"' in raw or b'"error"' in raw:
                    data = json.loads(raw[6:])
                    if isinstance(data.get("error"), dict):
                        return StreamResult(False, str(data["error"].get("code") or "stream_error"))
                    if isinstance(data.get("usage"), dict):
                        usage_tokens = data["usage"].get("completion_tokens")
            if not done:
                return StreamResult(False, "no_done", request_id=request_id)
    except (TimeoutError, aiohttp.ClientError) as exc:
        return StreamResult(False, type(exc).__name__, request_id=request_id)
    end = time.perf_counter()
    tokens = int(usage_tokens) if isinstance(usage_tokens, int) else events
    decode = (tokens - 1) / (last - first) if first is not None and last is not None and last > first else None
    return StreamResult(
        True,
        ttft_ms=(first - started) * 1000 if first is not None else None,
        total_ms=(end - started) * 1000,
        tokens=tokens,
        decode_tok_s=decode,
        request_id=request_id,
    )


async def stream_round(
    session: aiohttp.ClientSession,
    url: str,
    make_body: Callable[[], dict[str, Any]],
    *,
    concurrency: int,
    requests: int,
    deadline: float,
) -> list[StreamResult]:
    """`concurrency` clients back to back until `requests` have started or the monotonic `deadline` passes."""
    results: list[StreamResult] = []
    left = requests

    async def worker() -> None:
        nonlocal left
        while left > 0 and time.monotonic() < deadline:
            left -= 1
            results.append(await one_stream(session, url, make_body()))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def client_session(base_url: str, concurrency: int, token: str | None) -> aiohttp.ClientSession:
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    return aiohttp.ClientSession(
        base_url=base_url,
        # Idle between its path's rounds, a connection would outlive the server's keep-alive (uvicorn: 5 s) and fail
        # on reuse: the client lets go first.
        connector=aiohttp.TCPConnector(limit=concurrency + 4, keepalive_timeout=2.0),
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=300),
    )


# --- summaries -----------------------------------------------------------------------------------------


def _cut(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 2)
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1], 2)


@dataclass
class PathTally:
    """One path's pooled rounds at one level."""

    results: list[StreamResult] = field(default_factory=list)
    elapsed_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)

    def add(self, results: list[StreamResult], elapsed_s: float, cpu_s: dict[str, float]) -> None:
        self.results += results
        self.elapsed_s += elapsed_s
        for group, seconds in cpu_s.items():
            self.cpu_s[group] = self.cpu_s.get(group, 0.0) + seconds

    def summary(self, groups: list[str]) -> dict[str, Any]:
        """Figures of the path; `groups`: the process groups that serve it (their CPU is the path's cost)."""
        ok = [r for r in self.results if r.ok]
        errors: dict[str, int] = {}
        for r in self.results:
            if not r.ok:
                errors[r.error or "error"] = errors.get(r.error or "error", 0) + 1
        ttfts = [r.ttft_ms for r in ok if r.ttft_ms is not None]
        totals = [r.total_ms for r in ok]
        decode = [r.decode_tok_s for r in ok if r.decode_tok_s is not None]
        tokens = sum(r.tokens for r in ok)
        n = max(len(self.results), 1)
        cpu = {g: round(self.cpu_s.get(g, 0.0) * 1000 / n, 3) for g in sorted(self.cpu_s) if self.cpu_s[g] > 0}
        return {
            "requests": len(self.results),
            "errors": sum(errors.values()),
            "error_kinds": errors,
            "seconds": round(self.elapsed_s, 2),
            "ttft_ms": {"p50": _cut(ttfts, 50), "p99": _cut(ttfts, 99)},
            "stream_ms": {"p50": _cut(totals, 50), "p99": _cut(totals, 99)},
            "requests_per_s": round(len(ok) / self.elapsed_s, 2) if self.elapsed_s else 0.0,
            "tokens_per_s": round(tokens / self.elapsed_s, 2) if self.elapsed_s else 0.0,
            "decode_tok_s_p50": _cut(decode, 50),
            "tokens_per_request": round(tokens / len(ok), 1) if ok else 0,
            "cpu_ms_per_request": cpu,
            "path_cpu_ms_per_request": round(sum(cpu.get(g, 0.0) for g in groups), 3),
            "request_ids": [r.request_id for r in self.results if r.request_id],
        }


# --- CPU per process group -----------------------------------------------------------------------------

CLIENT = "client"
RAY_OTHER = "ray (gcs, raylet, idle workers)"
_RAY_ROLES = (
    ("ray::ProxyActor", "serve proxy"),
    ("ray::ServeController", "serve controller"),
)


def ray_role(label: str, gateway_deployment: str = "gateway") -> str | None:
    """The group of a Ray worker by its title (`ray::ServeReplica:<app>:<deployment>`), None if not a role."""
    for prefix, role in _RAY_ROLES:
        if label.startswith(prefix):
            return role
    if label.startswith("ray::ServeReplica:"):
        deployment = label.rsplit(":", 1)[-1]
        return "gateway replica" if deployment == gateway_deployment else "engine replicas"
    return None


class CpuGroups:
    """User + system CPU seconds of every process under this one, summed per group. `roots`: pid → group for
    servers this process started (their children count with them); Ray workers go by title; Ray's other
    processes into one group; this process itself is the client. A process that ends between two samples takes
    its CPU with it (rare in a bounded round: no group here restarts)."""

    def __init__(self, roots: dict[int, str] | None = None) -> None:
        self.roots = dict(roots or {})
        self._me = psutil.Process()

    def snapshot(self) -> dict[int, tuple[str, float]]:
        """pid → (group, CPU seconds so far)."""
        out: dict[int, tuple[str, float]] = {}
        procs = {p.pid: p for p in self._me.children(recursive=True)}
        groups: dict[int, str] = {self._me.pid: CLIENT}

        def group_of(pid: int) -> str:
            if pid in groups:
                return groups[pid]
            proc = procs.get(pid)
            group = self.roots.get(pid)
            if group is None and proc is not None:
                group = ray_role(_label(proc))
                if group is None:
                    try:
                        parent = proc.ppid()
                    except psutil.Error:
                        parent = self._me.pid
                    group = RAY_OTHER if parent == self._me.pid or parent not in procs else group_of(parent)
            groups[pid] = group or RAY_OTHER
            return groups[pid]

        for pid, proc in [(self._me.pid, self._me), *procs.items()]:
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            out[pid] = (group_of(pid), times.user + times.system)
        return out


def cpu_delta(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per group between two snapshots, process by process (a process counts in its group at the end:
    a Ray worker that took a role in between brings only its CPU since the first snapshot; one that started in
    between, all of its CPU)."""
    out: dict[str, float] = {}
    for pid, (group, seconds) in after.items():
        used = seconds - before[pid][1] if pid in before else seconds
        out[group] = out.get(group, 0.0) + max(used, 0.0)
    return out
