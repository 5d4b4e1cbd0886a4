"""`bastion bench load`: a bounded load and soak run through Ray Serve, on loopback only.

Phase `scripted`: the real gateway ingress, router and audit writer over scripted engine replicas
(`bench/scripted.py`), many concurrent streams. Phase `real`: the platform application from the platform file
(vLLM's CPU engine) at low concurrency. Each phase runs for a set time and stops by itself, then reports
errors (goal 0), latency percentiles, the resident memory of every process (the driver and every Ray process)
after warm-up and at the end (goal: growth under 10 %), and audit rows against requests (goal: equal).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from bastion.config import load_config
from bastion.serve.loopback import start_local_ray

APP = "bench-load"


@dataclass
class Memory:
    """Resident memory of one process after warm-up and at the end of a phase."""

    process: str
    pid: int
    warm_mb: float
    end_mb: float

    @property
    def growth_pct(self) -> float:
        return (self.end_mb - self.warm_mb) / self.warm_mb * 100 if self.warm_mb else 0.0


@dataclass
class PhaseReport:
    name: str
    concurrency: int
    seconds: float
    requests: int = 0  # in the measured window (after warm-up)
    warmup_requests: int = 0
    errors: int = 0  # warm-up included
    error_kinds: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)  # p50/p95/p99 of whole streams
    ttft_ms: dict[str, float] = field(default_factory=dict)
    tokens: int = 0
    memory: list[Memory] = field(default_factory=list)
    audited_requests: int = 0  # every request that got an answer, warm-up included
    audit_rows: int = 0  # their rows in the audit log (goal: equal)

    @property
    def max_growth_pct(self) -> float:
        return max((m.growth_pct for m in self.memory), default=0.0)

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["memory"] = [{**asdict(m), "growth_pct": round(m.growth_pct, 2)} for m in self.memory]
        out.update(max_growth_pct=round(self.max_growth_pct, 2), requests_per_s=round(self.requests_per_s, 1))
        return out


# --- processes and memory ------------------------------------------------------------------------------


def _label(proc: psutil.Process) -> str:
    """A readable name: Ray sets worker titles (`ray::ServeReplica:app:deployment`), else the program name."""
    try:
        cmd = proc.cmdline()
        title = cmd[0] if cmd else proc.name()
        if title.startswith("ray::"):
            return title.split(" ")[0]
        return proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "gone"


def processes() -> list[psutil.Process]:
    """This process and every process it started (Ray's GCS, raylet, workers and their children)."""
    me = psutil.Process()
    return [me, *me.children(recursive=True)]


def rss_mb() -> dict[int, tuple[str, float]]:
    """Resident memory of each live process; a zombie (exited, not yet reaped: rss 0) is not a process to watch."""
    out = {}
    for proc in processes():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            out[proc.pid] = (_label(proc), proc.memory_info().rss / 2**20)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def memory_growth(warm: dict[int, tuple[str, float]], end: dict[int, tuple[str, float]]) -> list[Memory]:
    """Processes alive at both samples (one that started or ended mid-run has no growth to speak of)."""
    rows = [Memory(label, pid, round(w, 1), round(end[pid][1], 1)) for pid, (label, w) in warm.items() if pid in end]
    return sorted(rows, key=lambda m: -m.growth_pct)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    if len(values) == 1:
        return {"p50": round(values[0], 1), "p95": round(values[0], 1), "p99": round(values[0], 1)}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": round(cuts[49], 1), "p95": round(cuts[94], 1), "p99": round(cuts[98], 1)}


# --- the client ----------------------------------------------------------------------------------------


@dataclass
class _Tally:
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    tokens: int = 0
    request_ids: list[str] = field(default_factory=list)

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


async def _one_stream(client: httpx.AsyncClient, model: str, token: str, max_tokens: int, tally: _Tally) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Count to ten. Request {uuid.uuid4().hex[:8]}."}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = None
    tally.requests += 1
    try:
        async with client.stream(
            "POST", "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {token}"}
        ) as response:
            # Serve's proxy and the gateway both send the (same) id: httpx joins repeated headers with ", ".
            tally.request_ids.append(response.headers.get("x-request-id", "").split(",")[0].strip())
            if response.status_code != 200:
                await response.aread()
                tally.error(f"http_{response.status_code}")
                return
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    tally.error(str(data["error"].get("code") or "stream_error"))
                    return
                if first is None and data.get("choices"):
                    first = time.perf_counter()
                if data.get("usage"):
                    tally.tokens += int(data["usage"].get("completion_tokens") or 0)
            if not done:
                tally.error("no_done")
                return
    except httpx.HTTPError as exc:
        tally.error(type(exc).__name__)
        return
    end = time.perf_counter()
    tally.latencies.append((end - started) * 1000)
    if first is not None:
        tally.ttfts.append((first - started) * 1000)


async def drive(
    base_url: str,
    token: str,
    model: str,
    *,
    concurrency: int,
    seconds: float,
    warmup_s: float,
    max_tokens: int,
    on_warm: Callable[[], None],
) -> tuple[_Tally, _Tally]:
    """`concurrency` clients streaming back to back for `seconds` after `warmup_s` (warm-up not counted)."""
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    warm, measured = _Tally(), _Tally()
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
        phase_end = time.monotonic() + warmup_s + seconds
        warm_end = time.monotonic() + warmup_s
        current = warm

        async def worker() -> None:
            while time.monotonic() < phase_end:
                await _one_stream(client, model, token, max_tokens, current)

        async def switch() -> None:
            nonlocal current
            await asyncio.sleep(max(warm_end - time.monotonic(), 0))
            on_warm()
            current = measured

        await asyncio.gather(switch(), *(worker() for _ in range(concurrency)))
    return warm, measured


# --- the phases ----------------------------------------------------------------------------------------


async def _audit_rows(database_url: str, request_ids: list[str]) -> int:
    from sqlalchemy import func, select

    from bastion.db.models import AuditEvent
    from bastion.db.session import create_engine

    engine = create_engine(database_url)
    try:
        total = 0
        async with engine.connect() as conn:
            for i in range(0, len(request_ids), 500):
                chunk = request_ids[i : i + 500]
                query = select(func.count()).select_from(AuditEvent).where(AuditEvent.request_id.in_(chunk))
                total += int(await conn.scalar(query) or 0)
        return total
    finally:
        await engine.dispose()


async def _count_audit(database_url: str, request_ids: list[str], timeout_s: float = 60) -> int:
    """Audit rows for the phase's requests, once the writer has caught up (it batches)."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = await _audit_rows(database_url, request_ids)
        if rows >= len(request_ids) or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(1)


def _platform_file(run_dir: Path, data: dict[str, Any], name: str) -> Path:
    path = run_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _bootstrap(path: Path) -> str:
    from bastion.db import migrate
    from bastion.serve.runner import bootstrap_tenant

    config = load_config(path)
    migrate.upgrade(config.database.url)
    token = asyncio.run(bootstrap_tenant(config))
    if not token:
        raise RuntimeError(f"{config.database.url} already has tenants; the load run needs a fresh database")
    return token


def wait_until_ok(url: str, timeout_s: float = 120) -> None:
    """Poll `url` until it answers 200: Serve reports an application running before every proxy has its route."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout_s:g} s")
        time.sleep(0.5)


def run_phase(
    name: str,
    app: Any,
    path: Path,
    token: str,
    model: str,
    *,
    base_url: str,
    route_prefix: str,
    concurrency: int,
    seconds: float,
    warmup_s: float,
    max_tokens: int,
) -> PhaseReport:
    """Deploy `app`, drive it, sample memory, count audit rows, delete it."""
    from ray import serve

    serve.run(app, name=APP, route_prefix=route_prefix)
    try:
        wait_until_ok(f"{base_url}/healthz")
        samples: dict[str, dict[int, tuple[str, float]]] = {}
        warm, tally = asyncio.run(
            drive(
                base_url,
                token,
                model,
                concurrency=concurrency,
                seconds=seconds,
                warmup_s=warmup_s,
                max_tokens=max_tokens,
                on_warm=lambda: samples.setdefault("warm", rss_mb()),
            )
        )
        samples["end"] = rss_mb()
        report = PhaseReport(name, concurrency, seconds, requests=tally.requests, warmup_requests=warm.requests)
        report.errors = sum(tally.errors.values()) + sum(warm.errors.values())
        for kind, count in warm.errors.items():
            report.error_kinds[kind] = tally.errors.get(kind, 0) + count
        report.error_kinds = {**tally.errors, **report.error_kinds}
        report.latency_ms, report.ttft_ms = percentiles(tally.latencies), percentiles(tally.ttfts)
        report.tokens = tally.tokens
        report.memory = memory_growth(samples["warm"], samples["end"])
        ids = [rid for rid in warm.request_ids + tally.request_ids if rid]
        report.audited_requests = len(ids)
        report.audit_rows = asyncio.run(_count_audit(load_config(path).database.url, ids))
        return report
    finally:
        serve.delete(APP)


def scripted_phase(
    run_dir: Path, *, base_url: str, route_prefix: str, concurrency: int, seconds: float, warmup_s: float
) -> PhaseReport:
    from bastion.bench.scripted import MODEL, scripted_gateway_app, scripted_platform_file

    data = scripted_platform_file(str(run_dir), f"sqlite+aiosqlite:///{run_dir / 'scripted.db'}")
    path = _platform_file(run_dir, data, "scripted")
    token = _bootstrap(path)
    app = scripted_gateway_app(str(path), replicas=2, words=16, token_delay_s=0.01, max_ongoing_requests=256)
    return run_phase(
        "scripted",
        app,
        path,
        token,
        MODEL,
        base_url=base_url,
        route_prefix=route_prefix,
        concurrency=concurrency,
        seconds=seconds,
        warmup_s=warmup_s,
        max_tokens=16,
    )


def real_phase(
    run_dir: Path,
    config_path: Path,
    *,
    base_url: str,
    route_prefix: str,
    concurrency: int,
    seconds: float,
    warmup_s: float,
    max_tokens: int = 32,
) -> PhaseReport:
    """The platform file's application (its engines, a fresh SQLite database in the run folder, limits lifted)."""
    from bastion.serve.app import build_app
    from bastion.serve.runner import prepare_models

    source = load_config(config_path)
    prepare_models(source)
    data = yaml.safe_load(config_path.read_text())
    data["data_dir"] = str(source.data_dir)
    data["database"] = {"url": f"sqlite+aiosqlite:///{run_dir / 'real.db'}"}
    data["redis"] = {"url": None}
    limits = {"requests_per_minute": 1_000_000, "tokens_per_minute": 100_000_000, "concurrent_requests": 1000}
    data.setdefault("tenant_defaults", {})["limits"] = limits
    path = _platform_file(run_dir, data, "real")
    token = _bootstrap(path)
    model = load_config(path).models[0].name
    return run_phase(
        "real",
        build_app({"config": str(path)}),
        path,
        token,
        model,
        base_url=base_url,
        route_prefix=route_prefix,
        concurrency=concurrency,
        seconds=seconds,
        warmup_s=warmup_s,
        max_tokens=max_tokens,
    )


def run_load(
    run_dir: Path,
    config_path: Path | None,
    *,
    port: int,
    seconds: float,
    concurrency: int,
    real_seconds: float,
    real_concurrency: int,
    warmup_s: float,
    start: bool = True,
    route_prefix: str = "/",
) -> list[PhaseReport]:
    """Both phases (the real one when `config_path` is given) in a Ray of their own (`start`) or the current one."""
    import ray
    from ray import serve

    run_dir.mkdir(parents=True, exist_ok=True)
    base_url = f"http://127.0.0.1:{port}{route_prefix.rstrip('/')}"
    if start:  # as many CPUs as the platform file gives Ray (the real engines ask for theirs)
        num_cpus = load_config(config_path).ray.num_cpus if config_path is not None else None
        start_local_ray(port, namespace="bastion-bench", num_cpus=num_cpus, log_to_driver=False)
    try:
        reports = [
            scripted_phase(
                run_dir,
                base_url=base_url,
                route_prefix=route_prefix,
                concurrency=concurrency,
                seconds=seconds,
                warmup_s=warmup_s,
            )
        ]
        if config_path is not None:
            reports.append(
                real_phase(
                    run_dir,
                    config_path,
                    base_url=base_url,
                    route_prefix=route_prefix,
                    concurrency=real_concurrency,
                    seconds=real_seconds,
                    warmup_s=warmup_s,
                )
            )
        return reports
    finally:
        if start:
            serve.shutdown()
            ray.shutdown()


def markdown(reports: list[PhaseReport]) -> str:
    lines = [
        "| phase | concurrency | s | requests | req/s | errors | p50 ms | p95 ms | p99 ms | TTFT p50 ms "
        "| max RSS growth | audit rows / requests |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        lat, ttft = r.latency_ms, r.ttft_ms
        lines.append(
            f"| {r.name} | {r.concurrency} | {r.seconds:g} | {r.requests} | {r.requests_per_s:.1f} | {r.errors} "
            f"| {lat.get('p50', '-')} | {lat.get('p95', '-')} | {lat.get('p99', '-')} | {ttft.get('p50', '-')} "
            f"| {r.max_growth_pct:.1f} % | {r.audit_rows} / {r.audited_requests} |"
        )
    for r in reports:
        lines += ["", f"RSS after warm-up → end, phase {r.name} (MB, largest growth first):", ""]
        lines += [f"- {m.process} (pid {m.pid}): {m.warm_mb} → {m.end_mb} ({m.growth_pct:+.1f} %)" for m in r.memory]
    return "\n".join(lines)
