"""`bastion mtp ...`: graft an MTP layer, re-train it on the model's own outputs, the A/B experiment."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bastion.commandline import out, progress_bar
from bastion.config import load_config

mtp_app = typer.Typer(
    help="MTP heads: graft, re-train on the model's own outputs, the A/B experiment.", no_args_is_help=True
)
MTP_PROMPTS = Path("deploy/mtp/prompts.jsonl")


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


@mtp_app.command("graft")
def mtp_graft(
    model_dir: Annotated[Path, typer.Argument(help="Llama/Qwen2-family HF folder")],
    out_dir: Annotated[Path, typer.Argument(help="new folder for the MiMo-layout checkpoint")],
    head: Annotated[
        Path | None, typer.Option(help="copy the MTP layer of this grafted checkpoint or head file")
    ] = None,
) -> None:
    """Add one MTP layer (from the last decoder layer, or --head) in the layout vLLM serves with `method: mtp`."""
    from bastion.engine.mtp.graft import graft

    out.print(f"grafted: {graft(model_dir, out_dir, head_from=head)}")


@mtp_app.command("export-head")
def mtp_export_head(
    checkpoint: Annotated[Path, typer.Argument(help="grafted (and trained) checkpoint")],
    out_file: Annotated[Path, typer.Argument(help="new .safetensors file with only the MTP layer")],
    dtype: Annotated[str, typer.Option(help="tensor dtype of the file")] = "bfloat16",
) -> None:
    """Write only the MTP layer (model.mtp_layers.0.*) to a small file that `graft --head FILE` installs."""
    from bastion.engine.mtp.graft import export_head

    path = export_head(checkpoint, out_file, dtype)
    out.print(f"head: {path} ({path.stat().st_size / 1e6:.1f} MB)")


@mtp_app.command("train")
def mtp_train(
    model_dir: Annotated[Path, typer.Argument(help="grafted checkpoint (`bastion mtp graft`)")],
    out_dir: Annotated[Path, typer.Argument(help="folder for the re-trained checkpoint")],
    prompts: Annotated[Path, typer.Option(help="JSONL prompt set with train/heldout splits")] = MTP_PROMPTS,
    max_seconds: Annotated[float, typer.Option(help="training time budget")] = 300.0,
    max_steps: Annotated[int, typer.Option(help="training step budget")] = 2000,
    max_tokens: Annotated[int, typer.Option(help="answer tokens generated per prompt")] = 160,
    samples_per_prompt: Annotated[
        int, typer.Option(help="sampled answers per training prompt, besides the greedy one")
    ] = 0,
    temperature: Annotated[float, typer.Option(help="temperature of the sampled answers (seeded)")] = 0.7,
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
    progress, update = progress_bar()
    with progress:
        report = run_train(
            model_dir,
            prompts,
            out_dir,
            opts,
            max_tokens=max_tokens,
            limit=limit,
            samples_per_prompt=samples_per_prompt,
            temperature=temperature,
            progress=update,
        )
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
    progress, update = progress_bar()
    with progress:
        result = run_experiment(model_dir, prompts, out_dir, opts, update)
    out.print((out_dir / "experiment.md").read_text())
    out.print(f"total {result['total_seconds']} s; results in {out_dir}/experiment.json, plot ab-acceptance.png")
