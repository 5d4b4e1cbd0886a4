"""The `bastion` command: composes the packages; errors are one line and a non-zero exit unless --debug."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from bastion import __version__
from bastion.config import load_config
from bastion.control.command import control_app
from bastion.errors import BastionError
from bastion.pool.command import plan as plan_command
from bastion.tenancy.commands import keys_app, tenants_app

app = typer.Typer(
    help="Bastion: on-premise LLM serving with tenants, quotas, audit and MTP speculation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Check the platform file.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema migrations (Alembic).", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(db_app, name="db")
app.command("plan")(plan_command)
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")
app.add_typer(control_app, name="control")

out = Console()
_state = {"debug": False}

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="platform file (default: $BASTION_CONFIG or deploy/local/bastion.yaml)"),
]


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False) -> None:
    _state["debug"] = debug


@app.command()
def version() -> None:
    """Print Bastion's version."""
    out.print(__version__)


@config_app.command("check")
def config_check(file: Annotated[Path, typer.Argument(help="platform file to validate")]) -> None:
    """Validate a platform file: prints `ok` or every error with its key path."""
    load_config(file)
    out.print("ok")


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None, revision: str = "head") -> None:
    """Migrate the database up to REVISION (default: the latest)."""
    from bastion.db import migrate

    migrate.upgrade(load_config(config).database.url, revision)
    out.print(f"database at {revision}")


@db_app.command("downgrade")
def db_downgrade(config: ConfigOption = None, revision: str = "-1") -> None:
    """Migrate the database down to REVISION (default: one step)."""
    from bastion.db import migrate

    migrate.downgrade(load_config(config).database.url, revision)
    out.print(f"database downgraded to {revision}")


@db_app.command("current")
def db_current(config: ConfigOption = None) -> None:
    """Print the database's current revision."""
    from bastion.db import migrate

    out.print(migrate.current(load_config(config).database.url))


helm_app = typer.Typer(help="Helm chart values generated from the platform file.", no_args_is_help=True)
app.add_typer(helm_app, name="helm")


@helm_app.command("values")
def helm_values_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="platform file for the cluster")],
    out_file: Annotated[Path | None, typer.Option("--out", help="write the values fragment to this file")] = None,
    update: Annotated[
        Path | None, typer.Option("--update", help="rewrite the generated block of this values file (the chart's own)")
    ] = None,
    chart: Annotated[Path, typer.Option("--chart", help="the chart the fragment is layered over")] = Path(
        "helm/bastion"
    ),
) -> None:
    """Helm values (`platform`, `serveConfig`, `workerGroups`) for a platform file; stdout without --out/--update."""
    from bastion.serve import helm_values as hv

    data = hv.read_platform_file(config)
    if update is not None:
        fragment = hv.render_fragment(hv.helm_values(data, str(config)), config.as_posix())
        update.write_text(hv.splice(update.read_text(encoding="utf-8"), fragment), encoding="utf-8")
    if out_file is not None or update is None:
        values = hv.helm_values(data, str(config), chart_defaults=hv.chart_defaults(chart))
        fragment = hv.render_fragment(values, config.as_posix())
        if out_file is not None:
            out_file.write_text(fragment, encoding="utf-8")
        else:
            sys.stdout.write(fragment)


@helm_app.command("schema")
def helm_schema_command(
    update: Annotated[Path, typer.Option("--update", help="the chart's values.schema.json to refresh")],
) -> None:
    """Refresh the platform part (`properties.platform`, `$defs`) of the chart's values.schema.json."""
    import json

    from bastion.serve import helm_values as hv

    update.write_text(hv.dump_schema(hv.values_schema(json.loads(update.read_text(encoding="utf-8")))))


audit_app = typer.Typer(help="Tamper-evident audit log: keys, verification, exports, retention.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")


@audit_app.command("keygen")
def audit_keygen(out_dir: Annotated[Path, typer.Option("--out", help="folder for the new key files")]) -> None:
    """Create an Ed25519 signing key pair (private key mode 0600) and an AES-256 content key (0600)."""
    from bastion.audit.signing import keygen

    for role, path in keygen(out_dir).items():
        out.print(f"{role}: {path}")


@audit_app.command("verify")
def audit_verify(
    config: ConfigOption = None,
    export: Annotated[Path | None, typer.Option("--export", help="verify this export folder offline")] = None,
    public_key: Annotated[Path | None, typer.Option("--public-key", help="Ed25519 public key (PEM)")] = None,
) -> None:
    """Verify every chain and checkpoint in the database, or an export offline (--export DIR --public-key FILE)."""
    import asyncio

    from bastion.audit import service
    from bastion.audit.errors import AuditError

    if export is not None:
        from bastion.audit.exportcheck import verify_export
        from bastion.audit.signing import Verifier

        if public_key is None:
            raise AuditError("--export needs --public-key FILE")
        checked = verify_export(export, Verifier.from_file(public_key))
        if not checked.ok:
            raise AuditError(f"export does not verify: {checked.first_problem}")
        out.print(f"ok: {checked.rows} events, {checked.checkpoints} signed checkpoints")
        return
    report = asyncio.run(service.verify(load_config(config), public_key))
    if not report.ok:
        raise AuditError(f"audit log does not verify: {report.first_problem}")
    out.print(f"ok: {len(report.chains)} chains, {report.events} events")


@audit_app.command("export")
def audit_export(
    out_dir: Annotated[Path, typer.Option("--out", help="new (or empty) folder for the export")],
    fmt: Annotated[str, typer.Option("--format", help="csv, jsonl or parquet")] = "jsonl",
    tenant: Annotated[str | None, typer.Option("--tenant", help="tenant id (default: every tenant)")] = None,
    start: Annotated[str | None, typer.Option("--from", help="from this UTC date or ISO time (inclusive)")] = None,
    end: Annotated[str | None, typer.Option("--to", help="up to this UTC date or ISO time (exclusive)")] = None,
    config: ConfigOption = None,
) -> None:
    """Export audit events with a signed manifest (verify it with `bastion audit verify --export`)."""
    import asyncio

    from rich.progress import Progress

    from bastion.audit import service

    with Progress(console=Console(stderr=True)) as progress:
        task = progress.add_task("exporting", total=None)
        result = asyncio.run(
            service.export(
                load_config(config),
                fmt,
                out_dir,
                tenant=tenant,
                start=service.parse_when(start, "--from"),
                end=service.parse_when(end, "--to"),
                on_total=lambda n: progress.update(task, total=n),
                on_progress=lambda n: progress.advance(task, n),
            )
        )
    out.print(f"{result.rows} events exported to {out_dir} (manifest sha256 {result.manifest_sha256})")


@audit_app.command("retention")
def audit_retention(config: ConfigOption = None) -> None:
    """Delete audit events past each tenant's retention, up to signed checkpoints; the deletion is audited."""
    import asyncio

    from bastion.audit import service

    results = asyncio.run(service.retention(load_config(config)))
    for r in results:
        out.print(f"{r.chain_id}: deleted {r.deleted} events up to sequence {r.up_to_sequence}")
    out.print(f"retention: {sum(r.deleted for r in results)} events deleted")


@audit_app.command("content")
def audit_content(
    chain: Annotated[str, typer.Option("--chain", help="chain id of the event")],
    sequence: Annotated[int, typer.Option("--sequence", help="sequence of the event in its chain")],
    config: ConfigOption = None,
) -> None:
    """Decrypt one event's stored prompt and completion (auditors only); the reading is itself audited."""
    import asyncio
    import json

    from bastion.audit import service

    content = asyncio.run(service.read_content(load_config(config), chain, sequence))
    sys.stdout.write(json.dumps(content, ensure_ascii=False, indent=2) + "\n")


models_app = typer.Typer(
    help="Local model folders: build the bundled model, write and check manifests.", no_args_is_help=True
)
bench_app = typer.Typer(
    help="Benchmarks: each prints its figures and the command to record in docs/benchmarks.md.", no_args_is_help=True
)
app.add_typer(models_app, name="models")
app.add_typer(bench_app, name="bench")


def _progress_bar():
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=out)
    task = progress.add_task("preparing", total=1)

    def update(step: str, done: int, total: int) -> None:
        progress.update(task, description=step, completed=done, total=max(total, 1))

    return progress, update


@models_app.command("prepare")
def models_prepare(config: ConfigOption = None) -> None:
    """Build bundled models into the data directory (once) and verify every model folder's manifest."""
    from bastion.serve.runner import prepare_models

    progress, update = _progress_bar()
    with progress:
        paths = prepare_models(load_config(config), update)
    for path in paths:
        out.print(f"ok {path}")


@models_app.command("manifest")
def models_manifest(folder: Annotated[Path, typer.Argument(help="model folder")]) -> None:
    """Write the sha256 manifest of a model folder you trust (replicas verify it at start)."""
    from bastion.engine.model_store import write_manifest

    manifest = write_manifest(folder)
    out.print(f"{len(manifest['files'])} files hashed into {folder}")


@models_app.command("verify")
def models_verify(folder: Annotated[Path, typer.Argument(help="model folder")]) -> None:
    """Check a model folder against its manifest."""
    from bastion.engine.model_store import verify_manifest

    verify_manifest(folder)
    out.print("ok")


@app.command("serve")
def serve_command(
    config: ConfigOption = None,
    export_serve_config: Annotated[
        bool, typer.Option("--export-serve-config", help="print the equivalent Ray Serve config YAML and exit")
    ] = False,
) -> None:
    """Run the Ray Serve application of the platform file (gateway + one engine deployment per profile)."""
    from bastion.config import Settings

    path = config or Settings().config
    platform = load_config(path)
    if export_serve_config:
        import yaml

        from bastion.serve.options import serve_config

        sys.stdout.write(yaml.safe_dump(serve_config(platform, str(path)), sort_keys=False))
        return
    from bastion.serve import runner
    from bastion.telemetry.logging import configure_logging

    configure_logging("DEBUG" if _state["debug"] else "INFO")
    runner.check_address(platform)
    runner.prepare_models(platform)
    runner.start_ray(platform)
    runner.deploy(path)
    out.print(f"Bastion is serving on http://{platform.gateway.host}:{platform.gateway.port}/v1 (Ctrl-C stops)")
    runner.wait_forever()


@app.command("run")
def run_command(config: ConfigOption = None) -> None:
    """Everything `make run` does: prepare models, migrate the database, create the first tenant, serve."""
    import asyncio

    from bastion.config import Settings
    from bastion.db import migrate
    from bastion.serve import runner
    from bastion.telemetry.logging import configure_logging

    configure_logging("DEBUG" if _state["debug"] else "INFO")
    path = config or Settings().config
    platform = load_config(path)
    runner.check_address(platform)
    progress, update = _progress_bar()
    with progress:
        runner.prepare_models(platform, update)
    migrate.upgrade(platform.database.url)
    token = asyncio.run(runner.bootstrap_tenant(platform))
    runner.start_ray(platform)
    runner.deploy(path)
    base = f"http://{platform.gateway.host}:{platform.gateway.port}/v1"
    out.print(f"Bastion is serving on {base} (Ctrl-C stops)")
    if token:
        out.print(f"First start: tenant 'default' with API key (shown once, stored hashed):\n  {token}")
    model = platform.models[0].name
    out.print(
        f"Try: curl -s {base}/chat/completions -H 'Authorization: Bearer $KEY' -H 'Content-Type: application/json' "
        f'-d \'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}]}}\'',
        soft_wrap=True,
    )
    runner.wait_forever()


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


# --- MTP heads (engine/mtp) ---------------------------------------------------------------------------

mtp_app = typer.Typer(
    help="MTP heads: graft, re-train on the model's own outputs, the A/B experiment.", no_args_is_help=True
)
app.add_typer(mtp_app, name="mtp")
MTP_PROMPTS = Path("deploy/mtp/prompts.jsonl")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


@mtp_app.command("graft")
def mtp_graft(
    model_dir: Annotated[Path, typer.Argument(help="Llama/Qwen2-family HF folder")],
    out_dir: Annotated[Path, typer.Argument(help="new folder for the MiMo-layout checkpoint")],
    head: Annotated[Path | None, typer.Option(help="copy the MTP layer of this grafted checkpoint")] = None,
) -> None:
    """Add one MTP layer (from the last decoder layer, or --head) in the layout vLLM serves with `method: mtp`."""
    from bastion.engine.mtp.graft import graft

    out.print(f"grafted: {graft(model_dir, out_dir, head_from=head)}")


@mtp_app.command("train")
def mtp_train(
    model_dir: Annotated[Path, typer.Argument(help="grafted checkpoint (`bastion mtp graft`)")],
    out_dir: Annotated[Path, typer.Argument(help="folder for the re-trained checkpoint")],
    prompts: Annotated[Path, typer.Option(help="JSONL prompt set with train/heldout splits")] = MTP_PROMPTS,
    max_seconds: Annotated[float, typer.Option(help="training time budget")] = 300.0,
    max_steps: Annotated[int, typer.Option(help="training step budget")] = 2000,
    max_tokens: Annotated[int, typer.Option(help="answer tokens generated per prompt")] = 160,
    limit: Annotated[int | None, typer.Option(help="use only the first N training prompts")] = None,
    batch_size: Annotated[int, typer.Option(help="sequences per step")] = 4,
    lr: Annotated[float, typer.Option(help="AdamW learning rate")] = 5e-4,
    seed: Annotated[int, typer.Option(help="data order and sampling seed")] = 0,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (1 is faster on a busy 2-core host)")] = None,
) -> None:
    """Self-distil the MTP layer only; resumes from OUT_DIR.train-state/ if a run was interrupted."""
    import json

    from bastion.engine.mtp.train import TrainOptions, run_train

    opts = TrainOptions(
        max_steps=max_steps,
        max_seconds=max_seconds,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
        threads=threads,
    )
    progress, update = _progress_bar()
    with progress:
        report = run_train(model_dir, prompts, out_dir, opts, max_tokens=max_tokens, limit=limit, progress=update)
    out.print(
        f"held-out top-1 agreement {report['heldout_top1_before']:.3f} -> {report['heldout_top1_after']:.3f} "
        f"after {report['steps']} steps; checkpoint {out_dir}"
    )
    out.print_json(json.dumps({k: v for k, v in report.items() if k != "options"}))


@mtp_app.command("experiment")
def mtp_experiment(
    out_dir: Annotated[Path, typer.Argument(help="work folder (checkpoints, results, plot)")],
    model_dir: Annotated[Path | None, typer.Option("--model", help="model A (default: bundled SmolLM2)")] = None,
    prompts: Annotated[Path, typer.Option(help="JSONL prompt set")] = MTP_PROMPTS,
    head_seconds: Annotated[float, typer.Option(help="training budget of each head")] = 120.0,
    finetune_seconds: Annotated[float, typer.Option(help="fine-tuning budget of variant B")] = 120.0,
    train_prompts: Annotated[int, typer.Option(help="training prompts used")] = 72,
    seed: int = 0,
) -> None:
    """A/B/re-trained: head_A on A, head_A on B (A fine-tuned to a new style), head_B on B; vLLM acceptance."""
    from bastion.config import Settings
    from bastion.engine.mtp.experiment import ExperimentOptions, run_experiment
    from bastion.engine.mtp.train import TrainOptions

    if model_dir is None:
        from bastion.engine.model_store import prepare_bundled

        model_dir = prepare_bundled("smollm2-135m", Path(load_config(Settings().config).data_dir))
    opts = ExperimentOptions(
        train_prompts=train_prompts,
        head=TrainOptions(max_seconds=head_seconds, max_steps=100_000, seed=seed, threads=1),
        finetune_seconds=finetune_seconds,
        seed=seed,
    )
    progress, update = _progress_bar()
    with progress:
        result = run_experiment(model_dir, prompts, out_dir, opts, update)
    out.print((out_dir / "experiment.md").read_text())
    out.print(f"total {result['total_seconds']} s; results in {out_dir}/experiment.json, plot ab-acceptance.png")


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
        ks=_ints(k),
        temperatures=_floats(temperatures),
        contexts=_ints(contexts),
        tasks=[t for t in tasks.split(",") if t],
        prompts_per_task=prompts_per_task,
        max_tokens=max_tokens,
        baseline=baseline,
    )
    progress, update = _progress_bar()
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
) -> None:
    """The gateway's own overhead: full policy path against a bare relay of the same app and scripted engine,
    and the LiteLLM proxy in front of the same engine when it is installed."""
    import json

    from bastion.gateway.bench import markdown, run_gateway_bench

    if engine not in ("http", "inprocess"):
        raise typer.BadParameter("--engine is http or inprocess")
    result = run_gateway_bench(
        concurrency=tuple(int(c) for c in concurrency.split(",")),
        requests_per_level=requests,
        seconds_per_level=seconds,
        redis_url=redis_url,
        engine=engine,
        litellm=litellm,
        with_litellm=not no_litellm,
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

    from bastion.audit.bench import bench_audit as run
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


def main() -> None:
    """Entry point: turn Bastion's errors into one line on stderr and exit 1."""
    try:
        app()
    except BastionError as exc:
        if _state["debug"]:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
