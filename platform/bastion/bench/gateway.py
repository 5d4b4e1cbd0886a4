"""`bastion bench gateway`: the gateway's own overhead. The full policy path (auth, limits, routing, usage,
recorder hand-off) and a bare relay of the same app code and the same scripted engine, each served by uvicorn
on 127.0.0.1 in its own process, driven by one client in the same run; p50/p99 latency, the difference
(added latency) and throughput at each concurrency. Bounded: each level stops after `seconds_per_level`.

By default the scripted engine is its own HTTP server (`gateway_http.py`), so the gateway's engine hop is a real
network hop and the LiteLLM proxy, when installed, stands in front of the same server in the same run.
`engine="inprocess"` keeps the engine inside each gateway process (the gateway's own CPU, no engine hop).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx

MODEL = "bench-model"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello in five words."}], "max_tokens": 5}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(data_dir: str, database_url: str, redis_url: str | None):
    from bastion.bench.doubles import platform_config

    return platform_config(data_dir, database_url, [MODEL], redis_url=redis_url)


def serve(
    mode: str,
    port: int,
    data_dir: str,
    database_url: str,
    redis_url: str | None,
    engine_url: str | None = None,
    engine_delay_ms: float = 0.0,
    engine_words: int = 0,
) -> None:
    """Run one app (policy, bare, or the scripted engine's own server) under uvicorn until killed."""
    import uvicorn

    from bastion.bench.bare import bare_app
    from bastion.bench.doubles import TEST_PEPPER, ScriptedEngine, upstreams_for
    from bastion.bench.gateway_http import HttpEngine, engine_app
    from bastion.serve.gateway_app import create_gateway_app

    if mode == "engine":
        uvicorn.run(
            engine_app(MODEL, engine_delay_ms / 1000, engine_words),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            access_log=False,
        )
        return
    engine: Any = (
        HttpEngine(engine_url, MODEL)
        if engine_url
        else ScriptedEngine(upstreams_for([MODEL], ongoing=10_000), record_bodies=False, delay_s=engine_delay_ms / 1000)
    )
    build = create_gateway_app if mode == "policy" else bare_app
    app = build(_config(data_dir, database_url, redis_url), engine, pepper=TEST_PEPPER)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


async def _setup(data_dir: str, database_url: str, budget: bool = False) -> str:
    from bastion.bench.doubles import TEST_PEPPER
    from bastion.config.schema import LimitsConfig
    from bastion.db.session import create_engine, session_factory
    from bastion.tenancy.key_service import KeyService
    from bastion.tenancy.tenants import TenantService

    engine = create_engine(database_url)
    try:
        sessions = session_factory(engine)
        big = 10**9
        limits = LimitsConfig(
            requests_per_minute=big,
            tokens_per_minute=big,
            concurrent_requests=10_000,
            daily_token_budget=big if budget else None,  # reserved and settled per request like TPM
        )
        await TenantService(sessions).create("bench", limits=limits)
        return (await KeyService(sessions, TEST_PEPPER).create("bench")).token
    finally:
        await engine.dispose()


async def _wait_ready(
    url: str, timeout_s: float = 30.0, path: str = "/healthz", proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll until `url + path` answers 200; fail at once if the server process `proc` has exited."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the server for {url} exited ({proc.returncode}) before it was ready")
            try:
                if (await client.get(url + path)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"gateway at {url} did not start")


async def _round(client: aiohttp.ClientSession, concurrency: int, requests: int, deadline: float):
    latencies: list[float] = []
    errors = 0
    left = requests
    payload = json.dumps(BODY).encode()

    async def worker() -> None:
        nonlocal left, errors
        while left > 0 and time.monotonic() < deadline:
            left -= 1
            start = time.perf_counter()
            try:
                async with client.post("/v1/chat/completions", data=payload) as response:
                    await response.read()
                    ok = response.status == 200
            except aiohttp.ClientError:  # counted, not fatal: the summary shows it
                ok = False
            latencies.append((time.perf_counter() - start) * 1000)
            errors += not ok

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors


def _summary(latencies: list[float], errors: int, elapsed: float, cpu_s: float) -> dict[str, Any]:
    latencies = sorted(latencies)
    return {
        "requests": len(latencies),
        "errors": errors,
        "p50_ms": round(statistics.median(latencies), 3),
        "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 3),
        "throughput_rps": round(len(latencies) / elapsed, 1),
        "server_cpu_ms_per_request": round(cpu_s * 1000 / max(len(latencies), 1), 4),
    }


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU of a server process and its children: what one request costs the server, however
    loaded the machine is (latency on a shared host mixes in every other process)."""
    if pid is None:
        return 0.0
    import psutil

    try:
        process = psutil.Process(pid)
        total = 0.0
        for proc in [process, *process.children(recursive=True)]:
            times = proc.cpu_times()
            total += times.user + times.system
        return total
    except psutil.Error:
        return 0.0


async def _level(
    urls: dict[str, str],
    tokens: dict[str, str],
    concurrency: int,
    requests: int,
    seconds: float,
    rounds: int = 4,
    pids: dict[str, int] | None = None,
) -> dict[str, dict[str, Any]]:
    """Alternate the modes' rounds so all see the same machine load; pool the rounds per mode.

    The client is aiohttp (about a third of httpx's CPU per request): it shares the machine with the servers,
    so the lighter it is, the more of each figure is the server's own."""
    clients = {
        mode: aiohttp.ClientSession(
            base_url=url,
            connector=aiohttp.TCPConnector(limit=concurrency),
            headers={"authorization": f"Bearer {tokens[mode]}", "content-type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=60),
        )
        for mode, url in urls.items()
    }
    pooled: dict[str, tuple[list[float], int, float, float]] = {mode: ([], 0, 0.0, 0.0) for mode in urls}
    pids = pids or {}
    try:
        for client in clients.values():  # warm-up: connections, caches, first seeds
            await _round(client, concurrency, concurrency * 2, time.monotonic() + 30)
        for _ in range(rounds):
            for mode, client in clients.items():
                began, cpu = time.perf_counter(), _cpu_seconds(pids.get(mode))
                lat, err = await _round(client, concurrency, requests // rounds, time.monotonic() + seconds / rounds)
                used = _cpu_seconds(pids.get(mode)) - cpu
                total, errors, elapsed, cpu_s = pooled[mode]
                pooled[mode] = (total + lat, errors + err, elapsed + time.perf_counter() - began, cpu_s + used)
    finally:
        for client in clients.values():
            await client.close()
    return {mode: _summary(*values) for mode, values in pooled.items()}


def _spawn(
    mode: str,
    port: int,
    data_dir: str,
    database_url: str,
    redis_url: str | None,
    engine_url: str | None,
    engine_delay_ms: float = 0.0,
    engine_words: int = 0,
):
    args = [sys.executable, "-m", "bastion.bench.gateway", "--serve", mode, "--port", str(port)]
    args += ["--engine-delay-ms", str(engine_delay_ms), "--engine-words", str(engine_words)]
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
        "added_cpu_ms_per_request": round(full["server_cpu_ms_per_request"] - bare["server_cpu_ms_per_request"], 4),
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
    engine_delay_ms: float = 0.0,
    budget: bool = False,
) -> dict[str, Any]:
    """Start the servers, measure each concurrency level against each, stop them; returns the numbers.

    engine: "http" (the scripted engine in its own server; LiteLLM joins when found) or "inprocess".
    litellm: path of the LiteLLM proxy command (default: .tools/litellm, then PATH).
    engine_delay_ms: how long the scripted engine takes per answer. 0 saturates the machine (throughput, CPU per
    request); a real engine's tens of milliseconds leave it room, so the added latency is the gateway's own
    work rather than the queue of a CPU-bound closed loop.
    budget: give the tenant a daily token budget too (its reservation and settlement join every request).
    """
    from bastion.bench.gateway_http import LITELLM_KEY, find_litellm, start_litellm
    from bastion.db import migrate

    litellm_bin = find_litellm(litellm) if engine == "http" and with_litellm else None
    with tempfile.TemporaryDirectory(prefix="bastion-bench-") as data_dir:
        database_url = f"sqlite+aiosqlite:///{Path(data_dir) / 'bench.db'}"
        migrate.upgrade(database_url)
        token = asyncio.run(_setup(data_dir, database_url, budget))
        procs: dict[str, subprocess.Popen[bytes]] = {}
        urls: dict[str, str] = {}
        engine_url = None
        try:
            if engine == "http":
                port = _free_port()
                procs["engine"] = _spawn("engine", port, data_dir, database_url, None, None, engine_delay_ms)
                engine_url = f"http://127.0.0.1:{port}"
            for mode in ("policy", "bare"):
                port = _free_port()
                procs[mode] = _spawn(mode, port, data_dir, database_url, redis_url, engine_url, engine_delay_ms)
                urls[mode] = f"http://127.0.0.1:{port}"
            if litellm_bin and engine_url:
                port = _free_port()
                procs["litellm"] = start_litellm(litellm_bin, engine_url, MODEL, port, data_dir)
                urls["litellm"] = f"http://127.0.0.1:{port}"
            tokens = {"policy": token, "bare": token, "litellm": LITELLM_KEY}
            pids = {mode: proc.pid for mode, proc in procs.items() if mode in urls}

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
                    measured = await _level(urls, tokens, c, requests_per_level, seconds_per_level, pids=pids)
                    rows.append(_row(c, measured))
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
        "budget": "daily budget reserved and settled" if budget else "none (TPM reserved and settled)",
        "database": "sqlite",
        "engine": "scripted over HTTP on 127.0.0.1" if engine == "http" else "scripted, in process",
        "engine_delay_ms": engine_delay_ms,
        "cpus": os.cpu_count(),
        "levels": levels,
        "litellm": peer,
    }


def markdown(result: dict[str, Any]) -> str:
    peer = any("litellm" in r for r in result["levels"])
    head = (
        "| concurrency | policy p50 ms | policy p99 ms | bare p50 ms | bare p99 ms | added p50 ms | added p99 ms "
        "| policy req/s | bare req/s | policy CPU ms/req | bare CPU ms/req | added CPU ms/req |"
    )
    if peer:
        head += " LiteLLM p50 ms | LiteLLM p99 ms | LiteLLM req/s | LiteLLM CPU ms/req | policy ÷ LiteLLM req/s |"
    lines = [head, "|---" * head.count(" |") + "|"]
    for r in result["levels"]:
        p, b = r["policy"], r["bare"]
        line = (
            f"| {r['concurrency']} | {p['p50_ms']} | {p['p99_ms']} | {b['p50_ms']} | {b['p99_ms']} | "
            f"{r['added_p50_ms']} | {r['added_p99_ms']} | {p['throughput_rps']} | {b['throughput_rps']} | "
            f"{p['server_cpu_ms_per_request']} | {b['server_cpu_ms_per_request']} | {r['added_cpu_ms_per_request']} |"
        )
        if peer:
            q = r["litellm"]
            line += (
                f" {q['p50_ms']} | {q['p99_ms']} | {q['throughput_rps']} | {q['server_cpu_ms_per_request']} | "
                f"{r['throughput_ratio_vs_litellm']} |"
            )
        lines.append(line)
    lines.append(
        f"\nEngine: {result['engine']}, {result['engine_delay_ms']} ms per answer. LiteLLM: {result['litellm']}. "
        f"Load average (1 min) at the end: {result['load_average_1m']}."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--serve", choices=["policy", "bare", "engine"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--data-dir")
    parser.add_argument("--database-url")
    parser.add_argument("--redis-url")
    parser.add_argument("--engine-url")
    parser.add_argument("--engine-delay-ms", type=float, default=0.0)
    parser.add_argument("--engine-words", type=int, default=0)
    parser.add_argument("--engine", choices=["http", "inprocess"], default="http")
    parser.add_argument("--litellm", help="the LiteLLM proxy command (default: .tools/litellm, then PATH)")
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--budget", action="store_true")
    args = parser.parse_args(argv)
    if args.serve:
        serve(
            args.serve,
            args.port,
            args.data_dir,
            args.database_url,
            args.redis_url,
            args.engine_url,
            args.engine_delay_ms,
            args.engine_words,
        )
        return
    result = run_gateway_bench(
        concurrency=tuple(int(c) for c in args.concurrency.split(",")),
        requests_per_level=args.requests,
        seconds_per_level=args.seconds,
        redis_url=args.redis_url,
        engine=args.engine,
        litellm=args.litellm,
        with_litellm=not args.no_litellm,
        engine_delay_ms=args.engine_delay_ms,
        budget=args.budget,
    )
    print(markdown(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
