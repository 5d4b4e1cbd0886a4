"""`bastion bench e2e`: the deployed path against the engine behind it, side by side, one run, loopback only.

Phase **scripted** (16 tokens 10 ms apart, so the engine costs time but no CPU): (a) the scripted engine's own
HTTP server, direct; (b) the LiteLLM proxy in front of that server, when installed; (c) Bastion as deployed:
Serve's HTTP ingress, the gateway replica with every policy on (API key, RPM/TPM/concurrency limits, routing,
usage counters, audit log in the database), handle calls to two scripted engine replicas. Phase **real** (the
platform file's model on vLLM's CPU build, greedy, `ignore_eos`): (d) vLLM's own OpenAI server and (e) Bastion
over one engine replica with the same engine arguments and the same core binding (`VLLM_CPU_*` from the
deployment's env). Every path is up for the whole phase; at each concurrency the paths take turns in rounds
(order rotated each round), so all see the same machine load; each round stops at a request count or a time cap.

Figures per path: TTFT and whole-stream p50/p99, req/s, tokens/s, per-stream decode tok/s, and CPU ms per request
of each process group (`bench/streams.py`), which, unlike latency, does not depend on what else runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bastion.bench.gateway import _free_port, _spawn, _wait_ready
from bastion.bench.load import _bootstrap, _count_audit, _platform_file, wait_until_ok
from bastion.bench.streams import (
    CLIENT,
    RAY_OTHER,
    CpuGroups,
    PathTally,
    chat_body,
    client_session,
    cpu_delta,
    stream_round,
)
from bastion.config import load_config

APP = "bench-e2e"
ENGINE_SERVER = "scripted engine server"
LITELLM = "litellm proxy"
VLLM_SERVER = "vllm server"
BASTION_GROUPS = ["serve proxy", "gateway replica", "engine replicas", "serve controller", RAY_OTHER]


@dataclass
class Target:
    """One path under test: where the client sends, as whom, and which process groups serve it."""

    name: str
    base_url: str
    model: str
    groups: list[str]
    token: str | None = None
    body: dict[str, Any] = field(default_factory=dict)  # extra fields of each request
    prefix: str = ""  # the application's route prefix under base_url

    @property
    def url(self) -> str:
        return f"{self.prefix}/v1/chat/completions"


@dataclass
class E2eOptions:
    concurrency: tuple[int, ...] = (1, 16, 64)
    requests: int = 1000  # per level and path (all rounds)
    seconds: float = 10.0  # per level and path (all rounds)
    rounds: int = 4
    tokens: int = 16
    token_delay_ms: float = 10.0
    real_concurrency: tuple[int, ...] = (1, 4)
    real_requests: int = 100
    real_seconds: float = 30.0
    real_tokens: int = 64
    with_litellm: bool = True
    litellm: str | None = None


# --- measuring ---------------------------------------------------------------------------------------------


async def measure(
    targets: list[Target],
    levels: tuple[int, ...],
    *,
    requests: int,
    seconds: float,
    rounds: int,
    max_tokens: int,
    cpu: CpuGroups,
    warmup_per_stream: int = 2,
) -> list[dict[str, Any]]:
    """Each level: a warm-up round per path, then `rounds` rounds of each path in turn; pooled per path."""
    await settle(cpu)
    out = []
    for c in levels:
        sessions = {t.name: client_session(t.base_url, c, t.token) for t in targets}
        tallies = {t.name: PathTally() for t in targets}

        def body_of(t: Target):
            return lambda: {**chat_body(t.model, max_tokens), **t.body}

        try:
            for t in targets:  # connections, caches, the first JIT and import costs
                await stream_round(
                    sessions[t.name],
                    t.url,
                    body_of(t),
                    concurrency=c,
                    requests=c * warmup_per_stream,
                    deadline=time.monotonic() + max(seconds, 30),
                )
            for r in range(rounds):
                order = targets[r % len(targets) :] + targets[: r % len(targets)]
                for t in order:
                    before, began = cpu.snapshot(), time.perf_counter()
                    results = await stream_round(
                        sessions[t.name],
                        t.url,
                        body_of(t),
                        concurrency=c,
                        requests=max(requests // rounds, c),
                        deadline=time.monotonic() + seconds / rounds,
                    )
                    elapsed = time.perf_counter() - began
                    tallies[t.name].add(results, elapsed, cpu_delta(before, cpu.snapshot()))
        finally:
            for session in sessions.values():
                await session.close()
        out.append({"concurrency": c, "paths": {t.name: tallies[t.name].summary(t.groups) for t in targets}})
    return out


async def settle(cpu: CpuGroups, busy_s: float = 0.15, timeout_s: float = 90.0) -> None:
    """Wait until the servers are quiet (a fresh deployment imports, loads and checks for a while after it says it
    is ready), so its start-up is not charged to the first rounds: until the processes other than the client use
    less than `busy_s` CPU seconds in a second, at most `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    before = cpu.snapshot()
    while time.monotonic() < deadline:
        await asyncio.sleep(1.0)
        after = cpu.snapshot()
        if sum(s for g, s in cpu_delta(before, after).items() if g != CLIENT) < busy_s:
            return
        before = after


def ratios(level: dict[str, Any], reference: str, peer: str | None = None) -> dict[str, Any]:
    """Each path against `reference` (req/s, tok/s, decode, TTFT added), and Bastion against `peer`."""
    paths = level["paths"]
    ref = paths[reference]
    out: dict[str, Any] = {}

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    def added(a: float | None, b: float | None) -> float | None:
        return round(a - b, 2) if a is not None and b is not None else None

    for name, figures in paths.items():
        if name == reference:
            continue
        out[name] = {
            f"req_s_vs_{reference}": ratio(figures["requests_per_s"], ref["requests_per_s"]),
            f"tok_s_vs_{reference}": ratio(figures["tokens_per_s"], ref["tokens_per_s"]),
            f"decode_vs_{reference}": ratio(figures["decode_tok_s_p50"], ref["decode_tok_s_p50"]),
            "ttft_added_p50_ms": added(figures["ttft_ms"]["p50"], ref["ttft_ms"]["p50"]),
            "ttft_added_p99_ms": added(figures["ttft_ms"]["p99"], ref["ttft_ms"]["p99"]),
        }
    for name in ("bastion", "bastion-direct"):
        if peer and peer in paths and name in paths:
            out[name][f"req_s_vs_{peer}"] = ratio(paths[name]["requests_per_s"], paths[peer]["requests_per_s"])
    return out


def with_ratios(levels: list[dict[str, Any]], reference: str, peer: str | None = None) -> list[dict[str, Any]]:
    for level in levels:
        level["ratios"] = ratios(level, reference, peer)
    return levels


def direct_ingress_url(app: str, serve_port: int, timeout_s: float = 60) -> str | None:
    """The gateway replica's own HTTP port when Serve runs direct ingress (`RAY_SERVE_THROUGHPUT_OPTIMIZED=1` or
    `RAY_SERVE_ENABLE_DIRECT_INGRESS=1` in the environment Ray started with): where HAProxy sends in a cluster,
    skipping Serve's proxy. None in Serve's default mode."""
    flags = ("RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_ENABLE_DIRECT_INGRESS")
    if (
        not any(os.environ.get(flag) == "1" for flag in flags)
        or os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") == "0"
    ):
        return None
    import ray
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # the controller assigns the port once the replica runs
        for group in ray.get(controller.get_target_groups.remote(app)):
            ports = [t for t in group.targets if t.port != serve_port]
            if group.protocol == "HTTP" and ports:
                return f"http://{ports[0].ip}:{ports[0].port}"
        time.sleep(0.5)
    raise RuntimeError(f"direct ingress is on but Serve gave {app} no port of its own within {timeout_s:g} s")


async def _audit(database_url: str, levels: list[dict[str, Any]]) -> dict[str, int]:
    ids = [
        rid
        for level in levels
        for name, figures in level["paths"].items()
        if name.startswith("bastion")
        for rid in figures["request_ids"]
    ]
    return {"requests": len(ids), "rows": await _count_audit(database_url, ids)}


def _strip_ids(levels: list[dict[str, Any]]) -> None:
    for level in levels:
        for figures in level["paths"].values():
            figures.pop("request_ids", None)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# --- phase scripted ----------------------------------------------------------------------------------------


def scripted_phase(run_dir: Path, opts: E2eOptions, *, serve_url: str, prefix: str = "") -> dict[str, Any]:
    from ray import serve

    from bastion.bench.gateway import MODEL as DIRECT_MODEL
    from bastion.bench.gateway_http import LITELLM_KEY, find_litellm, start_litellm
    from bastion.bench.scripted import MODEL, scripted_gateway_app, scripted_platform_file

    database_url = f"sqlite+aiosqlite:///{run_dir / 'scripted.db'}"
    path = _platform_file(run_dir, scripted_platform_file(str(run_dir), database_url), "scripted")
    token = _bootstrap(path)
    procs: list[subprocess.Popen[bytes]] = []
    roots: dict[int, str] = {}
    litellm_bin = find_litellm(opts.litellm) if opts.with_litellm else None
    try:
        port = _free_port()
        engine = _spawn(
            "engine", port, str(run_dir), database_url, None, None, opts.token_delay_ms, engine_words=opts.tokens
        )
        procs.append(engine)
        roots[engine.pid] = ENGINE_SERVER
        engine_url = f"http://127.0.0.1:{port}"
        targets = [Target("direct", engine_url, DIRECT_MODEL, [ENGINE_SERVER])]
        if litellm_bin:
            lport = _free_port()
            litellm = start_litellm(litellm_bin, engine_url, DIRECT_MODEL, lport, str(run_dir))
            procs.append(litellm)
            roots[litellm.pid] = LITELLM
            targets.append(
                Target("litellm", f"http://127.0.0.1:{lport}", DIRECT_MODEL, [LITELLM, ENGINE_SERVER], LITELLM_KEY)
            )
        app = scripted_gateway_app(
            str(path),
            replicas=2,
            words=opts.tokens,
            token_delay_s=opts.token_delay_ms / 1000,
            max_ongoing_requests=256,
        )
        serve.run(app, name=APP, route_prefix=prefix or "/")
        wait_until_ok(f"{serve_url}{prefix}/healthz")
        targets.append(Target("bastion", serve_url, MODEL, BASTION_GROUPS, token, prefix=prefix))
        if direct := direct_ingress_url(APP, int(serve_url.rsplit(":", 1)[1])):
            wait_until_ok(f"{direct}{prefix}/healthz")
            targets.append(Target("bastion-direct", direct, MODEL, BASTION_GROUPS, token, prefix=prefix))

        async def run() -> list[dict[str, Any]]:
            await _wait_ready(engine_url, 60, "/healthz", engine)
            for t in targets:
                if t.name == "litellm":
                    await _wait_ready(t.base_url, 240, "/health/liveliness", procs[-1])
            levels = await measure(
                targets,
                opts.concurrency,
                requests=opts.requests,
                seconds=opts.seconds,
                rounds=opts.rounds,
                max_tokens=opts.tokens,
                cpu=CpuGroups(roots),
            )
            return with_ratios(levels, "direct", "litellm")

        levels = asyncio.run(run())
        audit = asyncio.run(_audit(database_url, levels))
        _strip_ids(levels)
    finally:
        _stop(procs)
        serve.delete(APP)
    if not opts.with_litellm:
        peer = "not run (--no-litellm)"
    else:
        peer = f"measured ({litellm_bin})" if litellm_bin else "not installed (scripts/install-tools.sh): skipped"
    return {
        "engine": f"scripted, {opts.tokens} tokens {opts.token_delay_ms:g} ms apart",
        "litellm": peer,
        "levels": levels,
        "audit": audit,
    }


# --- phase real --------------------------------------------------------------------------------------------


def real_platform_file(run_dir: Path, config_path: Path) -> Path:
    """The platform file with its first non-speculating deployment only (the engine vLLM's server runs too), a
    fresh SQLite database in the run folder and limits lifted (every check still runs)."""
    source = load_config(config_path)
    data = yaml.safe_load(config_path.read_text())
    plain = [
        d
        for d in data["deployments"]
        if (data["profiles"].get(d["profile"]) or {}).get("speculative", {"method": "off"}).get("method") == "off"
    ]
    if not plain:
        raise ValueError(f"{config_path}: no deployment without speculation to compare with vLLM's own server")
    data["deployments"] = [{**plain[0], "replicas": 1}]
    data["data_dir"] = str(source.data_dir)
    data["database"] = {"url": f"sqlite+aiosqlite:///{run_dir / 'real.db'}"}
    data["redis"] = {"url": None}
    limits = {"requests_per_minute": 1_000_000, "tokens_per_minute": 100_000_000, "concurrent_requests": 1000}
    data.setdefault("tenant_defaults", {})["limits"] = limits
    return _platform_file(run_dir, data, "real")


def vllm_server_command(engine_kwargs: dict[str, Any], port: int, tool_parser: str | None) -> list[str]:
    """vLLM's own OpenAI server with the replica's engine arguments (`engine_args.engine_spec`), on loopback."""
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port)]
    for key, value in engine_kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue  # every False among the replica's arguments is vLLM's default
        if value is True:
            args.append(flag)
        elif isinstance(value, list):
            args += [flag, *(str(v) for v in value)]
        elif isinstance(value, dict):
            args += [flag, json.dumps(value)]
        else:
            args += [flag, str(value)]
    if tool_parser:
        args += ["--enable-auto-tool-choice", "--tool-call-parser", tool_parser]
    return [*args, "--disable-uvicorn-access-log"]


def real_phase(
    run_dir: Path, config_path: Path, opts: E2eOptions, *, serve_url: str, prefix: str = ""
) -> dict[str, Any]:
    from ray import serve

    from bastion.engine.engine_args import engine_spec
    from bastion.serve.app import build_app
    from bastion.serve.runner import prepare_models

    path = real_platform_file(run_dir, config_path)
    config = load_config(path)
    prepare_models(config)
    token = _bootstrap(path)
    dep = config.deployments[0]
    spec = engine_spec(config, dep)
    port = _free_port()
    env = {**os.environ, **dep.env, "PYTHONUNBUFFERED": "1"}
    log = open(run_dir / "vllm-server.log", "wb")  # noqa: SIM115 (the process owns it until it ends)
    vllm = subprocess.Popen(
        vllm_server_command(spec.engine_kwargs, port, spec.tool_parser), env=env, stdout=log, stderr=subprocess.STDOUT
    )
    vllm_url = f"http://127.0.0.1:{port}"
    extra = {"temperature": 0.0, "ignore_eos": True}
    try:
        serve.run(build_app({"config": str(path)}), name=APP, route_prefix=prefix or "/")
        wait_until_ok(f"{serve_url}{prefix}/healthz", timeout_s=300)
        targets = [
            Target("vllm", vllm_url, spec.served_name, [VLLM_SERVER], body=extra),
            Target("bastion", serve_url, spec.served_name, BASTION_GROUPS, token, body=extra, prefix=prefix),
        ]
        if direct := direct_ingress_url(APP, int(serve_url.rsplit(":", 1)[1])):
            wait_until_ok(f"{direct}{prefix}/healthz")
            targets.append(Target("bastion-direct", direct, spec.served_name, BASTION_GROUPS, token, extra, prefix))

        async def run() -> list[dict[str, Any]]:
            await _wait_ready(vllm_url, 300, "/health", vllm)
            levels = await measure(
                targets,
                opts.real_concurrency,
                requests=opts.real_requests,
                seconds=opts.real_seconds,
                rounds=opts.rounds,
                max_tokens=opts.real_tokens,
                cpu=CpuGroups({vllm.pid: VLLM_SERVER}),
                warmup_per_stream=1,
            )
            return with_ratios(levels, "vllm")

        levels = asyncio.run(run())
        audit = asyncio.run(_audit(config.database.url, levels))
        _strip_ids(levels)
    finally:
        _stop([vllm])
        log.close()
        serve.delete(APP)
    return {
        "engine": f"{spec.model} ({dep.profile}) on vLLM's CPU build, {opts.real_tokens} tokens, greedy, ignore_eos",
        "engine_args": {k: v for k, v in spec.engine_kwargs.items() if k != "model"},
        "env": dict(dep.env),
        "levels": levels,
        "audit": audit,
    }


def run_e2e(
    run_dir: Path,
    config_path: Path | None,
    opts: E2eOptions,
    *,
    port: int,
    num_cpus: int | None = None,
    start: bool = True,
    route_prefix: str = "",
) -> dict[str, Any]:
    """Both phases (the real one when `config_path` is given) in a fresh local Ray on 127.0.0.1 (`start`), or in
    the running one with Bastion under `route_prefix` (the tests' shared cluster)."""
    import ray
    from ray import serve

    from bastion.serve.loopback import start_local_ray

    run_dir.mkdir(parents=True, exist_ok=True)
    serve_url = f"http://127.0.0.1:{port}"
    if num_cpus is None and config_path is not None:
        num_cpus = load_config(config_path).ray.num_cpus
    started = time.time()
    load_before = os.getloadavg()[0]
    prefix = route_prefix.rstrip("/")
    if start:
        start_local_ray(port, namespace="bastion-bench", num_cpus=num_cpus or 4, log_to_driver=False)
    try:
        result: dict[str, Any] = {"scripted": scripted_phase(run_dir, opts, serve_url=serve_url, prefix=prefix)}
        if config_path is not None:
            result["real"] = real_phase(run_dir, config_path, opts, serve_url=serve_url, prefix=prefix)
        else:
            result["real"] = "skipped (--skip-real)"
    finally:
        if start:
            serve.shutdown()
            ray.shutdown()
    result.update(
        cpus=os.cpu_count(),
        load_average_1m={"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)},
        seconds=round(time.time() - started, 1),
        serve_env={k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")},
    )
    return result
