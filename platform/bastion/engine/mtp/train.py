"""`bastion mtp train`: re-align an MTP head with the model it drafts for, from that model's own outputs.

1. The model answers the training prompts through vLLM (batched): the data is what it will really generate.
2. transformers computes the target's final pre-norm hidden states h_i (what vLLM hands the drafter).
3. Only the MTP layer trains, to predict token i+2 from (h_i, embedding of token i+1): a feature loss pulls its
   output towards the target's normalized state at i+1 (cheap: no vocabulary projection), and a soft
   cross-entropy against the target's own next-token distribution at i+1 on a sample of rows aligns the argmax
   (EAGLE's recipe). Body, embedding and lm_head stay frozen.

Deterministic for a seed (the batch of step s depends only on seed and s), resumable (layer, optimizer and step
are saved in `OUT_DIR.train-state/`), CPU or GPU. A held-out split, never trained on, gives the agreement figures.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bastion.engine.mtp.data import (  # noqa: F401  (re-exported: callers import the data helpers from here)
    Sample,
    chat_prompt_ids,
    engine_args,
    generate_runs,
    generate_samples,
    generate_with_engine,
    load_prompts,
    make_samples,
    pick,
)
from bastion.engine.mtp.graft import MTP_PREFIX, load_config, load_weights, write_checkpoint
from bastion.errors import ModelStoreError

Progress = Callable[[str, int, int], None]
REPORT = "mtp-train-report.json"
TASKS = ("code", "reasoning", "conversation", "tool_call")


@dataclass
class TrainOptions:
    max_steps: int = 400
    max_seconds: float = 300.0
    batch_size: int = 4
    lr: float = 5e-4
    warmup: int = 10
    ce_weight: float = 1.0
    ce_rows: int = 256  # rows per step that get the (costly) vocabulary projection
    max_rows: int = 512  # rows per sequence
    seed: int = 0
    device: str = "cpu"
    save_every: int = 25
    eval_rows: int = 6000
    # torch intra-op threads (None: torch's default). On a small shared CPU, 1 is often 2-4x faster than
    # 2: OpenMP threads spin-wait for each other when another process (e.g. a vLLM engine) holds a core.
    threads: int | None = None


# --- target features --------------------------------------------------------------------------------


@dataclass
class Features:
    """Per sample: the target's pre-norm final hidden states (n × H, float32) and the token ids (n)."""

    hidden: list[Any]
    ids: list[Any]
    prompt_lens: list[int]
    tasks: list[str]


class Frozen:
    """The target's frozen parts the head is trained against: embedding, final norm, lm_head."""

    def __init__(self, weights: dict, config: dict, device: str) -> None:
        self.embed = weights["model.embed_tokens.weight"].float().to(device)
        self.lm_head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"]).float().to(device)
        self.norm_w = weights["model.norm.weight"].float().to(device)
        self.eps = float(config["rms_norm_eps"])

    def norm(self, h: Any) -> Any:
        import torch

        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_w


def target_features(model_dir: Path, samples: list[Sample], *, device: str = "cpu", batch: int = 8) -> Features:
    """Run the frozen target once over every sample and keep the input of its final norm."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the MTP weights are "unexpected" to transformers' Qwen2: by design
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    captured: list[Any] = []
    hook = model.model.norm.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    hidden, ids = [], []
    try:
        with torch.no_grad():
            for start in range(0, len(samples), batch):
                chunk = samples[start : start + batch]
                width = max(len(s.ids) for s in chunk)
                tokens = torch.zeros(len(chunk), width, dtype=torch.long)
                mask = torch.zeros(len(chunk), width, dtype=torch.long)
                for j, s in enumerate(chunk):
                    tokens[j, : len(s.ids)] = torch.tensor(s.ids)
                    mask[j, : len(s.ids)] = 1
                captured.clear()
                model.model(input_ids=tokens.to(device), attention_mask=mask.to(device))
                out = captured[-1].float().cpu()
                for j, s in enumerate(chunk):
                    hidden.append(out[j, : len(s.ids)].clone())
                    ids.append(torch.tensor(s.ids))
    finally:
        hook.remove()
    del model
    return Features(hidden, ids, [len(s.prompt_ids) for s in samples], [s.task for s in samples])


# --- training ---------------------------------------------------------------------------------------


def _batch(features: Features, indices: list[int], frozen: Frozen, max_rows: int, device: str) -> dict[str, Any]:
    """Rows i = 0..n-2 of each sequence: (h_i, e_{i+1}, position i) → target state at i+1; right-padded."""
    import torch

    rows = [min(len(features.ids[i]) - 1, max_rows) for i in indices]
    width = max(rows)
    hidden_size = frozen.embed.shape[1]
    hid = torch.zeros(len(indices), width, hidden_size)
    tgt = torch.zeros(len(indices), width, hidden_size)
    nxt = torch.zeros(len(indices), width, dtype=torch.long)
    mask = torch.zeros(len(indices), width, dtype=torch.bool)
    answer = torch.zeros(len(indices), width, dtype=torch.bool)
    for j, (i, n) in enumerate(zip(indices, rows, strict=True)):
        hid[j, :n] = features.hidden[i][:n]
        tgt[j, :n] = features.hidden[i][1 : n + 1]
        nxt[j, :n] = features.ids[i][1 : n + 1]
        mask[j, :n] = True
        answer[j, max(features.prompt_lens[i] - 1, 0) : n] = True
    hid, tgt, nxt = hid.to(device), tgt.to(device), nxt.to(device)
    return {
        "hidden": hid,
        "embeds": frozen.embed[nxt],
        "positions": torch.arange(width, device=device).expand(len(indices), width),
        "target": frozen.norm(tgt),
        "mask": mask.to(device),
        "answer": answer.to(device),
    }


def agreement(layer: Any, features: Features, frozen: Frozen, opts: TrainOptions) -> dict[str, Any]:
    """Held-out top-1 agreement on answer rows: the head's argmax for token i+2 equals the target's."""
    import torch

    hits = total = 0
    per_task: dict[str, list[int]] = {}
    with torch.no_grad():
        for i in range(len(features.ids)):
            if total >= opts.eval_rows:
                break
            b = _batch(features, [i], frozen, opts.max_rows, opts.device)
            out = layer(b["hidden"], b["embeds"], b["positions"])[b["answer"]]
            want = (b["target"][b["answer"]] @ frozen.lm_head.T).argmax(-1)
            got = (out @ frozen.lm_head.T).argmax(-1)
            n_hit, n = int((got == want).sum()), int(want.numel())
            hits, total = hits + n_hit, total + n
            acc = per_task.setdefault(features.tasks[i], [0, 0])
            acc[0] += n_hit
            acc[1] += n
    return {
        "top1": hits / total if total else None,
        "rows": total,
        "per_task": {t: h / n if n else None for t, (h, n) in sorted(per_task.items())},
    }


def _step_indices(n: int, step: int, batch: int, seed: int) -> list[int]:
    """The sample indices of a step: a seeded permutation per epoch, so any step can be recomputed on resume."""
    import torch

    start = step * batch
    out = []
    for k in range(start, start + batch):
        epoch, pos = divmod(k, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.append(int(perm[pos]))
    return out


def train_layer(
    layer: Any,
    features: Features,
    frozen: Frozen,
    opts: TrainOptions,
    state_path: Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train `layer` in place within opts.max_steps and opts.max_seconds; resume from state_path when present."""
    import torch
    from torch.nn import functional as F

    optim = torch.optim.AdamW(layer.parameters(), lr=opts.lr, weight_decay=0.0)
    step = 0
    if state_path is not None and state_path.is_file():
        state = torch.load(state_path, map_location=opts.device, weights_only=True)
        layer.load_state_dict(state["layer"])
        optim.load_state_dict(state["optim"])
        step = int(state["step"])
    started, losses = time.perf_counter(), []
    n = len(features.ids)

    def save() -> None:
        if state_path is not None:
            tmp = state_path.with_suffix(".tmp")
            torch.save({"layer": layer.state_dict(), "optim": optim.state_dict(), "step": step}, tmp)
            tmp.replace(state_path)

    layer.train()
    first = step
    while step < opts.max_steps and time.perf_counter() - started < opts.max_seconds:
        for group in optim.param_groups:
            group["lr"] = opts.lr * min(1.0, (step + 1) / max(opts.warmup, 1))
        b = _batch(features, _step_indices(n, step, opts.batch_size, opts.seed), frozen, opts.max_rows, opts.device)
        out = layer(b["hidden"], b["embeds"], b["positions"])
        mask = b["mask"]
        feat_loss = F.smooth_l1_loss(out[mask], b["target"][mask])
        rows = mask.nonzero()
        gen = torch.Generator().manual_seed(opts.seed * 104729 + step)
        pick = rows[torch.randperm(len(rows), generator=gen)[: opts.ce_rows].to(rows.device)]
        student = out[pick[:, 0], pick[:, 1]] @ frozen.lm_head.T
        with torch.no_grad():
            teacher = (b["target"][pick[:, 0], pick[:, 1]] @ frozen.lm_head.T).softmax(-1)
        ce_loss = F.cross_entropy(student, teacher)
        loss = feat_loss + opts.ce_weight * ce_loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(layer.parameters(), 1.0)
        optim.step()
        step += 1
        losses.append(loss.item())
        if progress:  # whichever budget (steps or seconds) runs out first sets the bar
            done = max(step / opts.max_steps, (time.perf_counter() - started) / opts.max_seconds)
            progress(f"training step {step} (loss {loss.item():.3f})", int(1000 * min(done, 1.0)), 1000)
        if step % opts.save_every == 0:
            save()
    save()
    layer.eval()
    elapsed = time.perf_counter() - started
    return {
        "steps": step,
        "steps_this_run": step - first,
        "seconds": round(elapsed, 1),
        "first_loss": losses[0] if losses else None,
        "last_loss": (sum(losses[-10:]) / len(losses[-10:])) if losses else None,
        "stopped_by": "steps" if step >= opts.max_steps else "time",
    }


def load_layer(model_dir: Path, weights: dict | None = None) -> Any:
    """The MTP layer of a grafted checkpoint as a trainable MtpLayer (float32)."""
    from bastion.engine.mtp.layer import MtpLayer

    config = load_config(model_dir)
    if not int(config.get("num_nextn_predict_layers") or 0):
        raise ModelStoreError(f"{model_dir} has no MTP layer: run `bastion mtp graft` first")
    weights = weights if weights is not None else load_weights(model_dir)
    layer = MtpLayer(config)
    state = {k[len(MTP_PREFIX) :]: v.float() for k, v in weights.items() if k.startswith(MTP_PREFIX)}
    layer.load_state_dict(state, strict=True)
    return layer


def train_head(
    model_dir: Path,
    train: list[Sample],
    heldout: list[Sample],
    out_dir: Path,
    opts: TrainOptions,
    *,
    progress: Progress | None = None,
    extra_report: dict | None = None,
) -> dict[str, Any]:
    """Train the MTP layer of MODEL_DIR on the samples and write OUT_DIR (a full checkpoint + report JSON)."""
    import torch

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    torch.manual_seed(opts.seed)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    state_dir = out_dir.with_name(f"{out_dir.name}.train-state")
    state_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if progress:
        progress("target hidden states", 0, 1)
    train_f = target_features(model_dir, train, device=opts.device)
    held_f = target_features(model_dir, heldout, device=opts.device)
    features_s = time.perf_counter() - t0
    config = load_config(model_dir)
    weights = load_weights(model_dir)
    frozen = Frozen(weights, config, opts.device)
    layer = load_layer(model_dir, weights).to(opts.device)
    if progress:
        progress("held-out agreement (before)", 0, 1)
    before = agreement(layer, held_f, frozen, opts)
    run = train_layer(layer, train_f, frozen, opts, state_dir / "state.pt", progress)
    after = agreement(layer, held_f, frozen, opts)
    report = {
        "model": str(model_dir),
        "train_samples": len(train),
        "train_tokens": sum(len(s.ids) for s in train),
        "heldout_samples": len(heldout),
        "heldout_top1_before": before["top1"],
        "heldout_top1_after": after["top1"],
        "heldout_per_task_before": before["per_task"],
        "heldout_per_task_after": after["per_task"],
        "heldout_rows": after["rows"],
        "features_seconds": round(features_s, 1),
        **run,
        "options": asdict(opts),
        **(extra_report or {}),
    }
    new_layer = {MTP_PREFIX + k: v.detach().float().cpu() for k, v in layer.state_dict().items()}
    body = {k: v for k, v in weights.items() if not k.startswith(MTP_PREFIX)}
    write_checkpoint(model_dir, out_dir, config, {**body, **new_layer}, {REPORT: json.dumps(report, indent=2)})
    return report


def _save_samples(path: Path, generation: dict, samples: list[Sample]) -> None:
    path.write_text(json.dumps({"generation": generation, "samples": [asdict(s) for s in samples]}))


def _load_samples(path: Path, generation: dict) -> list[Sample] | None:
    """The cached answers, or None when they were generated with other options (or by an older format)."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("generation") != generation:
        return None
    return [Sample(**row) for row in data["samples"]]


SAMPLE_SEED_STRIDE = 1000  # sampled pass k uses seeds seed + k·1000 + i: distinct from the greedy pass's seed + i


def run_train(
    model_dir: Path,
    prompts_file: Path,
    out_dir: Path,
    opts: TrainOptions,
    *,
    max_tokens: int = 160,
    limit: int | None = None,
    samples_per_prompt: int = 0,
    temperature: float = 0.7,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The whole `bastion mtp train`: generate (or reuse the saved generation on resume), then train and write.

    Every prompt gets its greedy answer; with samples_per_prompt N, each *training* prompt also gets N answers
    sampled at `temperature` (seeded), which multiplies the training data and shows the head sampled text.
    Held-out prompts only get the greedy answer and are never trained on.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    state_dir = out_dir.with_name(f"{out_dir.name}.train-state")
    state_dir.mkdir(parents=True, exist_ok=True)
    cache = state_dir / "samples.json"
    generation = {
        "prompts": str(prompts_file),
        "max_tokens": max_tokens,
        "limit": limit,
        "samples_per_prompt": samples_per_prompt,
        "temperature": temperature,
        "seed": opts.seed,
    }
    t0 = time.perf_counter()
    samples = _load_samples(cache, generation) if cache.is_file() else None
    if samples is None:
        prompts = load_prompts(prompts_file)
        train_p = pick(prompts, "train", limit)
        held_p = pick(prompts, "heldout")
        runs = [(train_p + held_p, 0.0, opts.seed)]
        runs += [(train_p, temperature, opts.seed + SAMPLE_SEED_STRIDE * k) for k in range(1, samples_per_prompt + 1)]
        if progress:
            progress(f"generating {sum(len(r[0]) for r in runs)} answers with vLLM", 0, 1)
        per_run = generate_runs(model_dir, runs, max_tokens=max_tokens)
        samples = []
        for k, (run_samples, (run_prompts, _t, _s)) in enumerate(zip(per_run, runs, strict=True)):
            for s, p in zip(run_samples, run_prompts, strict=True):
                s.id = f"{p['split']}:{p['id']}" + (f"#s{k}" if k else "")
                if s.output_ids:
                    samples.append(s)
        _save_samples(cache, generation, samples)
    generation_s = time.perf_counter() - t0
    train = [s for s in samples if s.id.startswith("train:")]
    heldout = [s for s in samples if s.id.startswith("heldout:")]
    report = train_head(
        model_dir,
        train,
        heldout,
        out_dir,
        opts,
        progress=progress,
        extra_report={
            "generation_seconds": round(generation_s, 1),
            "prompts": str(prompts_file),
            "generation": generation,
            "answer_tokens": sum(len(s.output_ids) for s in train),
        },
    )
    return report
