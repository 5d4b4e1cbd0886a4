"""`bastion bench gateway`: the gateway's own overhead. The full policy path (auth, limits, routing, usage,
recorder hand-off) and a bare relay of the same app code and the same scripted engine, each served by uvicorn
on 127.0.0.1 in its own process, driven by one client in the same run; p50/p99 latency, the difference
(added latency) and throughput at each concurrency. Bounded: each level stops after `seconds_per_level`.

By default the scripted engine is its own HTTP server (`bench_http.py`), so the gateway's engine hop is a real
network hop and the LiteLLM proxy, when installed, stands in front of the same server in the same run.
`engine="inprocess"` keeps the engine inside each gateway process (the gateway's own CPU, no engine hop).
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


def serve(
    mode: str, port: int, data_dir: str, database_url: str, redis_url: str | None, engine_url: str | None = None
) -> None:
    """Run one app (policy, bare, or the scripted engine's own server) under uvicorn until killed."""
    import uvicorn

    from bastion.gateway.app import create_app
    from bastion.gateway.bench_http import HttpEngine, engine_app
    from bastion.gateway.testing import TEST_PEPPER, ScriptedEngine, upstreams_for

    if mode == "engine":
        uvicorn.run(engine_app(MODEL), host="127.0.0.1", port=port, log_level="warning", access_log=False)
        return
    engine: Any = (
        HttpEngine(engine_url, MODEL)
        if engine_url
        else ScriptedEngine(upstreams_for([MODEL], ongoing=10_000), record_bodies=False)
    )
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


async def _wait_ready(url: str, timeout_s: float = 30.0, path: str = "/healthz") -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            try:
                if (await client.get(url + path)).status_code == 200:
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
            try:
                ok = (await client.post("/v1/chat/completions", json=BODY)).status_code == 200
            except httpx.TransportError:  # counted, not fatal: the summary shows it
                ok = False
            latencies.append((time.perf_counter() - start) * 1000)
            errors += not ok

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
    urls: dict[str, str], tokens: dict[str, str], concurrency: int, requests: int, seconds: float, rounds: int = 4
) -> dict[str, dict[str, Any]]:
    """Alternate the modes' rounds so all see the same machine load; pool the rounds per mode."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    clients = {
        mode: httpx.AsyncClient(
            base_url=url, limits=limits, headers={"authorization": f"Bearer {tokens[mode]}"}, timeout=60
        )
        for mode, url in urls.items()
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


def _spawn(mode: str, port: int, data_dir: str, database_url: str, redis_url: str | None, engine_url: str | None):
    args = [sys.executable, "-m", "bastion.gateway.bench", "--serve", mode, "--port", str(port)]
    args += ["--data-dir", data_dir, "--database-url", database_url]
    if redis_url:
        args += ["--redis-url", redis_url]
    if engine_url:
        args += ["--engine-url", engine_url]
    return subprocess.Popen(args, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _row(c: int, measured: dict[str, dict[str, Any]]) -> dict[str, Any]:
    full, bare = measured["policy"], measured["bare"]
    row: dict[str, Any] = {
        "concurrency": c,
        "policy": full,
        "bare": bare,
        "added_p50_ms": round(full["p50_ms"] - bare["p50_ms"], 3),
        "added_p99_ms": round(full["p99_ms"] - bare["p99_ms"], 3),
    }
    if "litellm" in measured:
        peer = measured["litellm"]
        row["litellm"] = peer
        row["throughput_ratio_vs_litellm"] = round(full["throughput_rps"] / max(peer["throughput_rps"], 1e-9), 1)
    return row


def run_gateway_bench(
    *,
    concurrency: tuple[int, ...] = (1, 16, 64),
    requests_per_level: int = 2000,
    seconds_per_level: float = 10.0,
    redis_url: str | None = None,
    engine: str = "http",
    litellm: str | None = None,
    with_litellm: bool = True,
) -> dict[str, Any]:
    """Start the servers, measure each concurrency level against each, stop them; returns the numbers.

    engine: "http" (the scripted engine in its own server; LiteLLM joins when found) or "inprocess".
    litellm: path of the LiteLLM proxy command (default: .tools/litellm, then PATH).
    """
    from bastion.db import migrate
    from bastion.gateway.bench_http import LITELLM_KEY, find_litellm, start_litellm

    litellm_bin = find_litellm(litellm) if engine == "http" and with_litellm else None
    with tempfile.TemporaryDirectory(prefix="bastion-bench-") as data_dir:
        database_url = f"sqlite+aiosqlite:///{Path(data_dir) / 'bench.db'}"
        migrate.upgrade(database_url)
        token = asyncio.run(_setup(data_dir, database_url))
        procs: dict[str, subprocess.Popen[bytes]] = {}
        urls: dict[str, str] = {}
        engine_url = None
        try:
            if engine == "http":
                port = _free_port()
                procs["engine"] = _spawn("engine", port, data_dir, database_url, None, None)
                engine_url = f"http://127.0.0.1:{port}"
            for mode in ("policy", "bare"):
                port = _free_port()
                procs[mode] = _spawn(mode, port, data_dir, database_url, redis_url, engine_url)
                urls[mode] = f"http://127.0.0.1:{port}"
            if litellm_bin and engine_url:
                port = _free_port()
                procs["litellm"] = start_litellm(litellm_bin, engine_url, MODEL, port, data_dir)
                urls["litellm"] = f"http://127.0.0.1:{port}"
            tokens = {"policy": token, "bare": token, "litellm": LITELLM_KEY}

            async def measure() -> list[dict[str, Any]]:
                if engine_url:
                    await _wait_ready(engine_url)
                for mode, url in urls.items():
                    if mode == "litellm":
                        await _wait_ready(url, 180.0, "/health/liveliness")
                    else:
                        await _wait_ready(url)
                rows = []
                for c in concurrency:
                    rows.append(_row(c, await _level(urls, tokens, c, requests_per_level, seconds_per_level)))
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
    if engine != "http":
        peer = "not run: the in-process engine has no HTTP endpoint for it"
    elif not with_litellm:
        peer = "not run (disabled)"
    else:
        peer = f"measured ({litellm_bin})" if litellm_bin else "not installed (scripts/install-tools.sh): skipped"
    return {
        "load_average_1m": round(os.getloadavg()[0], 2),
        "limiter": "redis" if redis_url else "in-process",
        "database": "sqlite",
        "engine": "scripted over HTTP on 127.0.0.1" if engine == "http" else "scripted, in process",
        "cpus": os.cpu_count(),
        "levels": levels,
        "litellm": peer,
    }


def markdown(result: dict[str, Any]) -> str:
    peer = any("litellm" in r for r in result["levels"])
    head = (
        "| concurrency | policy p50 ms | policy p99 ms | bare p50 ms | bare p99 ms | added p50 ms | added p99 ms "
        "| policy req/s | bare req/s |"
    )
    if peer:
        head += " LiteLLM p50 ms | LiteLLM p99 ms | LiteLLM req/s | policy ÷ LiteLLM req/s |"
    lines = [head, "|---" * head.count(" |") + "|"]
    for r in result["levels"]:
        p, b = r["policy"], r["bare"]
        line = (
            f"| {r['concurrency']} | {p['p50_ms']} | {p['p99_ms']} | {b['p50_ms']} | {b['p99_ms']} | "
            f"{r['added_p50_ms']} | {r['added_p99_ms']} | {p['throughput_rps']} | {b['throughput_rps']} |"
        )
        if peer:
            q = r["litellm"]
            line += f" {q['p50_ms']} | {q['p99_ms']} | {q['throughput_rps']} | {r['throughput_ratio_vs_litellm']} |"
        lines.append(line)
    lines.append(f"\nLiteLLM: {result['litellm']}. Load average (1 min) at the end: {result['load_average_1m']}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--serve", choices=["policy", "bare", "engine"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--data-dir")
    parser.add_argument("--database-url")
    parser.add_argument("--redis-url")
    parser.add_argument("--engine-url")
    parser.add_argument("--engine", choices=["http", "inprocess"], default="http")
    parser.add_argument("--litellm", help="the LiteLLM proxy command (default: .tools/litellm, then PATH)")
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port, args.data_dir, args.database_url, args.redis_url, args.engine_url)
        return
    import json

    result = run_gateway_bench(
        concurrency=tuple(int(c) for c in args.concurrency.split(",")),
        requests_per_level=args.requests,
        seconds_per_level=args.seconds,
        redis_url=args.redis_url,
        engine=args.engine,
        litellm=args.litellm,
        with_litellm=not args.no_litellm,
    )
    print(markdown(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
