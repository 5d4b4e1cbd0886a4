"""`bastion bench gateway`: the gateway's own overhead. The full policy path (auth, limits, routing, usage,
recorder hand-off) and a bare relay of the same app code and the same scripted engine, each served by uvicorn
on 127.0.0.1 in its own process, driven by one client in the same run; p50/p99 latency, the difference
(added latency) and throughput at each concurrency. Bounded: each level stops after `seconds_per_level`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

MODEL = "bench-model"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello in five words."}], "max_tokens": 5}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(data_dir: str, database_url: str, redis_url: str | None):
    from bastion.gateway.testing import platform_config

    return platform_config(data_dir, database_url, [MODEL], redis_url=redis_url)


def serve(mode: str, port: int, data_dir: str, database_url: str, redis_url: str | None) -> None:
    """Run one app (policy or bare) under uvicorn until killed."""
    import uvicorn

    from bastion.gateway.app import create_app
    from bastion.gateway.testing import TEST_PEPPER, ScriptedEngine, upstreams_for

    engine = ScriptedEngine(upstreams_for([MODEL], ongoing=10_000), record_bodies=False)
    app = create_app(
        _config(data_dir, database_url, redis_url), engine, pepper=TEST_PEPPER, policy_enabled=mode == "policy"
    )
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


async def _setup(data_dir: str, database_url: str) -> str:
    from bastion.config.schema import LimitsConfig
    from bastion.db.session import create_engine, session_factory
    from bastion.gateway.testing import TEST_PEPPER
    from bastion.tenancy.apikeys import KeyService
    from bastion.tenancy.tenants import TenantService

    engine = create_engine(database_url)
    try:
        sessions = session_factory(engine)
        big = 10**9
        limits = LimitsConfig(requests_per_minute=big, tokens_per_minute=big, concurrent_requests=10_000)
        await TenantService(sessions).create("bench", limits=limits)
        return (await KeyService(sessions, TEST_PEPPER).create("bench")).token
    finally:
        await engine.dispose()


async def _wait_ready(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            try:
                if (await client.get(url + "/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"gateway at {url} did not start")


async def _round(client: httpx.AsyncClient, concurrency: int, requests: int, deadline: float) -> tuple[list, int]:
    latencies: list[float] = []
    errors = 0
    left = requests

    async def worker() -> None:
        nonlocal left, errors
        while left > 0 and time.monotonic() < deadline:
            left -= 1
            start = time.perf_counter()
            response = await client.post("/v1/chat/completions", json=BODY)
            latencies.append((time.perf_counter() - start) * 1000)
            errors += response.status_code != 200

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors


def _summary(latencies: list[float], errors: int, elapsed: float) -> dict[str, Any]:
    latencies = sorted(latencies)
    return {
        "requests": len(latencies),
        "errors": errors,
        "p50_ms": round(statistics.median(latencies), 3),
        "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 3),
        "throughput_rps": round(len(latencies) / elapsed, 1),
    }


async def _level(
    urls: dict[str, str], token: str, concurrency: int, requests: int, seconds: float, rounds: int = 4
) -> dict[str, dict[str, Any]]:
    """Alternate bare and policy rounds so both see the same machine load; pool the rounds per mode."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"authorization": f"Bearer {token}"}
    clients = {
        mode: httpx.AsyncClient(base_url=url, limits=limits, headers=headers, timeout=60) for mode, url in urls.items()
    }
    pooled: dict[str, tuple[list[float], int, float]] = {mode: ([], 0, 0.0) for mode in urls}
    try:
        for client in clients.values():  # warm-up: connections, caches, first seeds
            await asyncio.gather(*(client.post("/v1/chat/completions", json=BODY) for _ in range(concurrency)))
        for _ in range(rounds):
            for mode, client in clients.items():
                began = time.perf_counter()
                lat, err = await _round(client, concurrency, requests // rounds, time.monotonic() + seconds / rounds)
                total, errors, elapsed = pooled[mode]
                pooled[mode] = (total + lat, errors + err, elapsed + time.perf_counter() - began)
    finally:
        for client in clients.values():
            await client.aclose()
    return {mode: _summary(*values) for mode, values in pooled.items()}


def run_gateway_bench(
    *,
    concurrency: tuple[int, ...] = (1, 16, 64),
    requests_per_level: int = 2000,
    seconds_per_level: float = 10.0,
    redis_url: str | None = None,
) -> dict[str, Any]:
    """Start both servers, measure each concurrency level against each, stop them; returns the numbers."""
    from bastion.db import migrate

    with tempfile.TemporaryDirectory(prefix="bastion-bench-") as data_dir:
        database_url = f"sqlite+aiosqlite:///{Path(data_dir) / 'bench.db'}"
        migrate.upgrade(database_url)
        token = asyncio.run(_setup(data_dir, database_url))
        procs: dict[str, subprocess.Popen[bytes]] = {}
        urls: dict[str, str] = {}
        try:
            for mode in ("policy", "bare"):
                port = _free_port()
                args = [sys.executable, "-m", "bastion.gateway.bench", "--serve", mode, "--port", str(port)]
                args += ["--data-dir", data_dir, "--database-url", database_url]
                if redis_url:
                    args += ["--redis-url", redis_url]
                procs[mode] = subprocess.Popen(args, env={**os.environ, "PYTHONUNBUFFERED": "1"})
                urls[mode] = f"http://127.0.0.1:{port}"

            async def measure() -> list[dict[str, Any]]:
                for url in urls.values():
                    await _wait_ready(url)
                rows = []
                for c in concurrency:
                    measured = await _level(urls, token, c, requests_per_level, seconds_per_level)
                    full, bare = measured["policy"], measured["bare"]
                    rows.append(
                        {
                            "concurrency": c,
                            "policy": full,
                            "bare": bare,
                            "added_p50_ms": round(full["p50_ms"] - bare["p50_ms"], 3),
                            "added_p99_ms": round(full["p99_ms"] - bare["p99_ms"], 3),
                        }
                    )
                return rows

            levels = asyncio.run(measure())
        finally:
            for proc in procs.values():
                proc.terminate()
            for proc in procs.values():
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return {
        "load_average_1m": round(os.getloadavg()[0], 2),
        "limiter": "redis" if redis_url else "in-process",
        "database": "sqlite",
        "cpus": os.cpu_count(),
        "levels": levels,
        "litellm": "not installed" if not _has_litellm() else "installed but not wired in this run",
    }


def _has_litellm() -> bool:
    import importlib.util

    return importlib.util.find_spec("litellm") is not None


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| concurrency | policy p50 ms | policy p99 ms | bare p50 ms | bare p99 ms | added p50 ms | added p99 ms "
        "| policy req/s | bare req/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["levels"]:
        p, b = r["policy"], r["bare"]
        lines.append(
            f"| {r['concurrency']} | {p['p50_ms']} | {p['p99_ms']} | {b['p50_ms']} | {b['p99_ms']} | "
            f"{r['added_p50_ms']} | {r['added_p99_ms']} | {p['throughput_rps']} | {b['throughput_rps']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--serve", choices=["policy", "bare"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--data-dir")
    parser.add_argument("--database-url")
    parser.add_argument("--redis-url")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port, args.data_dir, args.database_url, args.redis_url)
        return
    import json

    result = run_gateway_bench(
        concurrency=tuple(int(c) for c in args.concurrency.split(",")),
        requests_per_level=args.requests,
        seconds_per_level=args.seconds,
        redis_url=args.redis_url,
    )
    print(markdown(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
