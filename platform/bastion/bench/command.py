"""`bastion bench ...`: each benchmark prints its figures and the command to record in docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bastion.commandline import ConfigOption, out, progress_bar
from bastion.config import load_config
from bastion.engine.mtp.command import MTP_PROMPTS, floats, ints

bench_app = typer.Typer(
    help="Benchmarks: each prints its figures and the command to record in docs/benchmarks.md.", no_args_is_help=True
)


@bench_app.command("engine")
def bench_engine(
    config: ConfigOption = None,
    max_tokens: Annotated[int, typer.Option(help="completion tokens per request")] = 128,
    rounds: Annotated[int, typer.Option(help="passes over the prompt set per temperature")] = 1,
) -> None:
    """Decode tok/s of deep-context and fast-agentic on the same prompts (greedy and 0.7), and fast/deep."""
    import json

    from bastion.bench.engine import run_engine_bench

    result = run_engine_bench(load_config(config), max_tokens=max_tokens, rounds=rounds)
    for row in result["results"]:
        out.print(
            f"{row['profile']:<13} T={row['temperature']:<4} decode {row['decode_tok_s']:>7.2f} tok/s  "
            f"acceptance {row['acceptance_rate'] if row['acceptance_rate'] is not None else '-'}"
        )
    for temperature, ratio in result["fast_over_deep"].items():
        out.print(f"fast/deep at T={temperature}: {ratio}")
    out.print_json(json.dumps(result))


@bench_app.command("acceptance")
def bench_acceptance(
    model_dir: Annotated[Path, typer.Argument(help="checkpoint with an MTP layer")],
    out_dir: Annotated[Path, typer.Option("--out", help="folder for acceptance.json/.md and PNG plots")] = Path(
        "bench-acceptance"
    ),
    prompts: Annotated[Path, typer.Option(help="JSONL prompt set (its held-out split is used)")] = MTP_PROMPTS,
    k: Annotated[str, typer.Option("--k", help="draft counts, comma-separated")] = "1,2,3",
    temperatures: Annotated[str, typer.Option(help="comma-separated")] = "0,0.7,1.0",
    contexts: Annotated[str, typer.Option(help="extra context tokens before the question, comma-separated")] = (
        "0,1024,4096"
    ),
    tasks: Annotated[str, typer.Option(help="task types")] = "code,reasoning,conversation,tool_call",
    prompts_per_task: Annotated[int, typer.Option(help="held-out prompts per task type")] = 2,
    max_tokens: Annotated[int, typer.Option(help="completion tokens per request")] = 96,
    baseline: Annotated[bool, typer.Option(help="also run without speculation (tok/s, speed-up)")] = True,
    write_baseline: Annotated[
        str | None, typer.Option(help="store the k=1 figures as this profile's drift baseline in MODEL_DIR")
    ] = None,
) -> None:
    """MTP acceptance by task type, temperature, context length and k; tok/s with and without speculation."""
    from bastion.engine.mtp.acceptance import AcceptanceOptions, markdown, run_acceptance, write_outputs

    opts = AcceptanceOptions(
        ks=ints(k),
        temperatures=floats(temperatures),
        contexts=ints(contexts),
        tasks=[t for t in tasks.split(",") if t],
        prompts_per_task=prompts_per_task,
        max_tokens=max_tokens,
        baseline=baseline,
    )
    progress, update = progress_bar()
    with progress:
        summary = run_acceptance(model_dir, prompts, opts, update)
    files = write_outputs(summary, out_dir)
    out.print(markdown(summary))
    if write_baseline:
        from bastion.engine.mtp.acceptance import total_stats
        from bastion.engine.mtp.drift import write_baseline as store

        first = opts.ks[0]
        store(model_dir, write_baseline, total_stats(summary, first), source=f"bench acceptance k={first}")
        out.print(f"baseline for {write_baseline} written to {model_dir}")
    out.print(f"{summary['seconds']} s; wrote {', '.join(str(f) for f in files)}")


@bench_app.command("gateway")
def bench_gateway(
    requests: Annotated[int, typer.Option(help="requests per concurrency level")] = 2000,
    seconds: Annotated[float, typer.Option(help="time cap per level")] = 10.0,
    redis_url: Annotated[str | None, typer.Option(help="shared limits in this Redis (default: in-process)")] = None,
    concurrency: Annotated[str, typer.Option(help="comma-separated concurrency levels")] = "1,16,64",
    engine: Annotated[str, typer.Option(help="http (engine server; LiteLLM joins) or inprocess")] = "http",
    litellm: Annotated[str | None, typer.Option(help="LiteLLM proxy command (default: .tools/litellm)")] = None,
    no_litellm: Annotated[bool, typer.Option("--no-litellm", help="skip the LiteLLM column")] = False,
    engine_delay_ms: Annotated[
        float, typer.Option(help="scripted engine time per answer (0: saturate; ~20: a real engine's room)")
    ] = 0.0,
    budget: Annotated[bool, typer.Option("--budget", help="the tenant has a daily token budget too")] = False,
) -> None:
    """The gateway's own overhead: full policy path against a bare relay of the same app and scripted engine,
    and the LiteLLM proxy in front of the same engine when it is installed."""
    import json

    from bastion.bench.gateway import markdown, run_gateway_bench

    if engine not in ("http", "inprocess"):
        raise typer.BadParameter("--engine is http or inprocess")
    if engine_delay_ms < 0:
        raise typer.BadParameter("--engine-delay-ms is 0 or more")
    result = run_gateway_bench(
        concurrency=tuple(int(c) for c in concurrency.split(",")),
        requests_per_level=requests,
        seconds_per_level=seconds,
        redis_url=redis_url,
        engine=engine,
        litellm=litellm,
        with_litellm=not no_litellm,
        engine_delay_ms=engine_delay_ms,
        budget=budget,
    )
    out.print(markdown(result), soft_wrap=True, markup=False)
    print(json.dumps(result))


@bench_app.command("audit")
def bench_audit(
    database_url: Annotated[str, typer.Option(help="a scratch PostgreSQL database (events are really written)")],
    events: Annotated[int, typer.Option(help="events to write")] = 50_000,
    batch_size: Annotated[int, typer.Option(help="rows per insert")] = 2000,
) -> None:
    """Audit events per second written in batches, and the p99 cost of enqueueing on the request path."""
    import asyncio
    import json

    from bastion.bench.audit import bench_audit as run
    from bastion.db import migrate

    migrate.upgrade(database_url)
    out.print_json(json.dumps(asyncio.run(run(database_url, events=events, batch_size=batch_size))))


@bench_app.command("load")
def bench_load(
    seconds: Annotated[float, typer.Option(help="measured seconds of the scripted phase")] = 20.0,
    concurrency: Annotated[int, typer.Option(help="concurrent streams, scripted phase")] = 64,
    real_seconds: Annotated[float, typer.Option(help="measured seconds of the real-engine phase")] = 20.0,
    real_concurrency: Annotated[int, typer.Option(help="concurrent streams, real-engine phase")] = 4,
    warmup: Annotated[float, typer.Option(help="seconds of warm-up before each phase is measured")] = 5.0,
    skip_real: Annotated[bool, typer.Option("--skip-real", help="only the scripted phase")] = False,
    config: Annotated[Path, typer.Option("--config", "-c", help="platform file of the real phase")] = Path(
        "deploy/local/bastion.yaml"
    ),
    port: Annotated[int, typer.Option(help="Serve's HTTP port (127.0.0.1 only)")] = 18250,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="databases and platform files of the run")] = None,
) -> None:
    """Load and soak on loopback through Ray Serve: many streams over scripted engines, then a few over the real
    CPU engine; errors, latency percentiles, RSS growth of every process, audit rows against requests."""
    import json
    import tempfile

    from bastion.bench.load import markdown, run_load

    for name, value in (("--seconds", seconds), ("--real-seconds", real_seconds)):
        if not 0 < value <= 3600:
            raise typer.BadParameter(f"{name} must be in (0, 3600]: the run is bounded")
    folder = run_dir or Path(tempfile.mkdtemp(prefix="bastion-bench-load-"))
    reports = run_load(
        folder,
        None if skip_real else config,
        port=port,
        seconds=seconds,
        concurrency=concurrency,
        real_seconds=real_seconds,
        real_concurrency=real_concurrency,
        warmup_s=warmup,
    )
    out.print(markdown(reports), soft_wrap=True, markup=False)
    print(json.dumps([r.as_dict() for r in reports]))


@bench_app.command("e2e")
def bench_e2e(
    concurrency: Annotated[str, typer.Option(help="scripted phase: comma-separated concurrency levels")] = "1,16,64",
    requests: Annotated[int, typer.Option(help="scripted phase: requests per level and path")] = 1000,
    seconds: Annotated[float, typer.Option(help="scripted phase: time cap per level and path")] = 10.0,
    rounds: Annotated[int, typer.Option(help="interleaved rounds per level (each path once per round)")] = 4,
    tokens: Annotated[int, typer.Option(help="scripted answer length in tokens")] = 16,
    token_delay_ms: Annotated[float, typer.Option(help="scripted time between tokens")] = 10.0,
    real_concurrency: Annotated[str, typer.Option(help="real phase: comma-separated levels")] = "1,4",
    real_requests: Annotated[int, typer.Option(help="real phase: requests per level and path")] = 100,
    real_seconds: Annotated[float, typer.Option(help="real phase: time cap per level and path")] = 30.0,
    real_tokens: Annotated[int, typer.Option(help="real phase: completion tokens (greedy, ignore_eos)")] = 64,
    skip_real: Annotated[bool, typer.Option("--skip-real", help="only the scripted phase")] = False,
    no_litellm: Annotated[bool, typer.Option("--no-litellm", help="leave LiteLLM out")] = False,
    litellm: Annotated[str | None, typer.Option(help="LiteLLM proxy command (default: .tools/litellm)")] = None,
    config: Annotated[Path, typer.Option("--config", "-c", help="platform file of the real phase")] = Path(
        "deploy/local/bastion.yaml"
    ),
    port: Annotated[int, typer.Option(help="Serve's HTTP port (127.0.0.1 only)")] = 18260,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="databases, platform files and logs")] = None,
) -> None:
    """The deployed path against the engine behind it: streaming chat through the scripted engine's own server,
    LiteLLM in front of it and Bastion's whole Serve path; then vLLM's own server against Bastion on the real CPU
    engine. TTFT, stream time, req/s, tok/s, decode tok/s and CPU per request of each process group."""
    import json
    import tempfile

    from bastion.bench.e2e import E2eOptions, run_e2e
    from bastion.bench.e2e_report import markdown

    for name, value in (("--seconds", seconds), ("--real-seconds", real_seconds)):
        if not 0 < value <= 600:
            raise typer.BadParameter(f"{name} must be in (0, 600]: the run is bounded")
    if not 1 <= rounds <= 20 or requests < 1 or real_requests < 1 or tokens < 1 or real_tokens < 1:
        raise typer.BadParameter("--rounds is 1 to 20; request and token counts are positive")
    opts = E2eOptions(
        concurrency=tuple(ints(concurrency)),
        requests=requests,
        seconds=seconds,
        rounds=rounds,
        tokens=tokens,
        token_delay_ms=token_delay_ms,
        real_concurrency=tuple(ints(real_concurrency)),
        real_requests=real_requests,
        real_seconds=real_seconds,
        real_tokens=real_tokens,
        with_litellm=not no_litellm,
        litellm=litellm,
    )
    folder = run_dir or Path(tempfile.mkdtemp(prefix="bastion-bench-e2e-"))
    result = run_e2e(folder, None if skip_real else config, opts, port=port)
    out.print(markdown(result), soft_wrap=True, markup=False)
    print(json.dumps(result))
