"""The speculation correctness guard: a speculating replica proves, before it is ready and again while it serves,
that speculation has not changed its answers (ARCHITECTURE.md, "Speculation must never change the answers").

One canary round sends every canary greedily *and* at each guard temperature, all in one batch: a greedy row
sharing a batch with sampled rows is where vLLM's CPU verifier corrupted greedy output too (vllm#55005), and a
batch of greedy rows alone never takes that path. Then:

- greedy: the token ids must match the golden ids recorded without speculation. bf16 can flip a near-tie and
  the rest of the answer differs from there, so the measure is the share of golden tokens reproduced before the
  first difference (summed over canaries), against `guard_greedy_min_match`;
- sampled: speculative sampling is lossless in distribution, not in sample path, so samples cannot be compared
  token for token. Their tokens are scored by the target model instead, with a prefill of prompt + sample
  (`prompt_logprobs`, `max_tokens=1`): a prefill drafts nothing and runs no verification, so the score is the
  target's own whatever the speculative path did. The statistic is the median over the samples (two per canary)
  of each sample's mean log-probability per token (one honest sample that wanders into unlikely text moves a
  plain mean by more than a nat at T = 1; corruption lowers every sample). It must lie within a band around the
  same statistic recorded at prepare time from samples drawn without speculation: `guard_logprob_margin`, or
  three standard deviations of the recorded rounds where they moved more (T = 1 on a small model). Corrupted
  sampling draws from a flattened distribution, whose tokens the target scores several nats lower.

A failed round is confirmed by a second round at once before the verdict stands: corruption fails every round,
an honest outlier hardly ever twice in a row, and a failure takes the replica out of routing for good.

Kept free of vLLM imports at module level: the verdict logic is pure and unit-tested; the engine calls take any
object with vLLM's `AsyncLLM.generate` signature.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from bastion.engine.canaries import Golden, SampledBaseline

log = logging.getLogger(__name__)
_IDS = itertools.count()
# Samples per canary and temperature: at T = 1 one sample in four wandering off moved a round's statistic by
# up to 0.9 nats (bf16, measured); eight samples per temperature halve that noise for a few more batch rows.
SAMPLES_PER_CANARY = 2
# The sampled band is the larger of `logprob_margin` and this many standard deviations of the baseline's own
# rounds: a small model at T = 1 moves a lot between honest rounds (bf16 SmolLM2: sd 0.45), at T = 0.7 little.
BAND_SDS = 3.0


@dataclass(frozen=True)
class GuardSettings:
    """The platform file's `engine` section as one replica needs it (picklable, in EngineSpec)."""

    golden: str  # path of the golden record
    dtype: str
    interval_s: float = 300.0
    after_sampled_requests: int = 500
    greedy_min_match: float = 0.8
    tie_margin: float = 0.25
    logprob_margin: float = 1.0
    temperatures: tuple[float, ...] = (0.7, 1.0)
    live_min_tokens: int = 256
    live_margin: float = 2.5


@dataclass
class CanaryRun:
    greedy: dict[str, list[int]]
    scores: dict[str, dict[str, list[float]]]  # temperature (text) -> "canary#j" -> target log-prob of each token
    seconds: float = 0.0
    ties: dict[str, bool] = field(default_factory=dict)  # canary id -> its first difference is a near-tie flip


@dataclass(frozen=True)
class Verdict:
    ok: bool
    trigger: str  # start, interval, requests, live, manual
    reason: str  # empty when ok; else what failed, with the numbers
    greedy_match: float
    sampled_mean: dict[str, float]
    baseline_mean: dict[str, float]
    seconds: float = 0.0
    checked_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        sampled = ", ".join(
            f"T={t}: {m:.2f} (baseline {self.baseline_mean.get(t, float('nan')):.2f})"
            for t, m in self.sampled_mean.items()
        )
        state = "PASS" if self.ok else f"FAIL: {self.reason}"
        return f"{state} | greedy match {self.greedy_match:.0%} | mean target log-prob {sampled}"


def temperature_key(t: float) -> str:
    return f"{t:g}"


def first_difference(want: list[int], have: list[int]) -> int | None:
    """Index of the first token that differs (a shorter answer differs where it ends); None when equal."""
    for i, (a, b) in enumerate(zip(want, have, strict=False)):
        if a != b:
            return i
    return None if len(want) == len(have) else min(len(want), len(have))


def greedy_match_rate(
    golden: dict[str, list[int]], got: dict[str, list[int]], ties: dict[str, bool] | None = None
) -> float:
    """Share of golden tokens reproduced before the first difference, over all canaries. A canary whose first
    difference is a near-tie (the target scores both tokens within `tie_margin`) counts as reproduced: from a
    tie flip on the paths differ legitimately, which bf16 rounding does with the batch's shape."""
    total = sum(len(ids) for ids in golden.values())
    if total == 0:
        return 1.0
    same = 0
    for cid, want in golden.items():
        at = first_difference(want, got.get(cid, []))
        same += len(want) if at is None or (ties or {}).get(cid) else at
    return same / total


def sample_statistic(per_canary: dict[str, list[float]]) -> float | None:
    """Median over samples (every canary, SAMPLES_PER_CANARY each) of each sample's mean target log-prob per
    token (None without tokens)."""
    means = sorted(sum(v) / len(v) for v in per_canary.values() if v)
    if not means:
        return None
    mid = len(means) // 2
    return means[mid] if len(means) % 2 else (means[mid - 1] + means[mid]) / 2


def judge(run: CanaryRun, golden: Golden, settings: GuardSettings, trigger: str) -> Verdict:
    """The verdict of one canary round against the golden record (pure)."""
    reasons = []
    match = greedy_match_rate(golden.greedy, run.greedy, run.ties)
    if match < settings.greedy_min_match:
        reasons.append(f"greedy canaries match {match:.0%} of the golden tokens (< {settings.greedy_min_match:.0%})")
    sampled, baseline = {}, {}
    for t in settings.temperatures:
        key = temperature_key(t)
        base: SampledBaseline | None = golden.sampled.get(key)
        if base is None:
            reasons.append(f"no baseline for T={key} in the golden record")
            continue
        baseline[key] = base.mean
        mean = sample_statistic(run.scores.get(key) or {})
        if mean is None:
            reasons.append(f"no sampled tokens at T={key}")
            continue
        sampled[key] = mean
        band = max(settings.logprob_margin, BAND_SDS * base.sd)
        if not math.isfinite(mean) or abs(mean - base.mean) > band:
            reasons.append(f"samples at T={key} score {mean:.2f} nats/token, baseline {base.mean:.2f} ± {band:.2f}")
    return Verdict(not reasons, trigger, "; ".join(reasons), round(match, 4), sampled, baseline, round(run.seconds, 2))


# --- engine calls ----------------------------------------------------------------------------------


async def _final(engine: Any, prompt_ids: list[int], params: Any) -> Any:
    final = None
    async for out in engine.generate({"prompt_token_ids": prompt_ids}, params, request_id=f"guard-{next(_IDS)}"):
        final = out
    if final is None:
        raise RuntimeError("the engine returned nothing for a canary")
    return final


async def score_tokens(engine: Any, prompt_ids: list[int], output_ids: list[int]) -> list[float]:
    """The target model's log-probability of each output token after the prompt, from one prefill."""
    from vllm import SamplingParams

    if not output_ids:
        return []
    final = await _final(engine, prompt_ids + output_ids, SamplingParams(max_tokens=1, prompt_logprobs=0))
    rows = final.prompt_logprobs or []
    out = []
    for pos, token in enumerate(output_ids, start=len(prompt_ids)):
        row = rows[pos] if pos < len(rows) else None
        entry = row.get(token) if row else None
        out.append(float(entry.logprob) if entry is not None else float("-inf"))
    return out


async def near_tie(engine: Any, prompt_ids: list[int], prefix: list[int], a: int, b: int, margin: float) -> bool:
    """Whether the target, after prompt + prefix, scores tokens a and b within `margin` nats of each other (a
    one-token request: its token comes from the prefill, which no speculative step touches)."""
    from vllm import SamplingParams

    final = await _final(engine, prompt_ids + prefix, SamplingParams(max_tokens=1, temperature=0.0, logprobs=20))
    row = (final.outputs[0].logprobs or [{}])[0]
    if a not in row or b not in row:
        return False
    return abs(float(row[a].logprob) - float(row[b].logprob)) <= margin


async def run_canaries(
    engine: Any,
    prompts: dict[str, list[int]],
    temperatures: tuple[float, ...],
    max_tokens: int,
    golden: dict[str, list[int]] | None = None,
    tie_margin: float = 0.25,
) -> CanaryRun:
    """One round: greedy and sampled canaries in one batch (unseeded: a seeded request whose prefill is chunked
    kills vLLM's CPU EngineCore, and live canaries share steps with real traffic), then the samples scored."""
    from vllm import SamplingParams

    started = time.perf_counter()

    async def sample(ids: list[int], temperature: float) -> list[int]:
        final = await _final(engine, ids, SamplingParams(max_tokens=max_tokens, temperature=temperature))
        return list(final.outputs[0].token_ids)

    jobs: list[tuple[str, float | None, int]] = [(cid, None, 0) for cid in prompts]
    jobs += [(cid, t, j) for t in temperatures for cid in prompts for j in range(SAMPLES_PER_CANARY)]
    outputs = await asyncio.gather(*(sample(prompts[cid], 0.0 if t is None else t) for cid, t, _ in jobs))
    greedy: dict[str, list[int]] = {}
    pending = []
    for (cid, t, j), ids in zip(jobs, outputs, strict=True):
        if t is None:
            greedy[cid] = ids
        else:
            pending.append((temperature_key(t), f"{cid}#{j}", prompts[cid], ids))
    scored = await asyncio.gather(*(score_tokens(engine, p, o) for _, _, p, o in pending))
    scores: dict[str, dict[str, list[float]]] = {temperature_key(t): {} for t in temperatures}
    for (key, cid, _, _), values in zip(pending, scored, strict=True):
        scores[key][cid] = values
    ties: dict[str, bool] = {}
    for cid, want in (golden or {}).items():
        have = greedy.get(cid, [])
        at = first_difference(want, have)
        if at is not None and at < len(want) and at < len(have):
            ties[cid] = await near_tie(engine, prompts[cid], want[:at], want[at], have[at], tie_margin)
    return CanaryRun(greedy, scores, time.perf_counter() - started, ties)


# --- the guard of one replica ------------------------------------------------------------------------

OK, FAILED, UNCHECKED = "ok", "failed", "unchecked"


class SpeculationGuard:
    """Canary rounds for one speculating replica: at start, every `interval_s`, after `after_sampled_requests`
    sampled requests, and when the live signal (real requests' own logprobs, when they asked for them) drops."""

    def __init__(self, settings: GuardSettings, golden: Golden, prompts: dict[str, list[int]]) -> None:
        self.settings = settings
        self.golden = golden
        self.prompts = prompts
        self.max_tokens = max(len(ids) for ids in golden.greedy.values()) if golden.greedy else 32
        self.last: Verdict | None = None
        self.checks = 0
        self.failures = 0
        self.sampled_since_check = 0
        self.last_check_at = time.monotonic()
        self.live = LiveSignal(settings)
        self._lock = asyncio.Lock()

    @property
    def state(self) -> str:
        return UNCHECKED if self.last is None else OK if self.last.ok else FAILED

    async def check(self, engine: Any, trigger: str) -> Verdict:
        async with self._lock:  # one round at a time
            verdict = await self._round(engine, trigger)
            if not verdict.ok:  # confirm at once: corruption fails every round, an honest outlier hardly twice
                log.warning("speculation guard (%s): %s; confirming", trigger, verdict.line())
                verdict = await self._round(engine, trigger)
            self.checks += 1
            self.failures += 0 if verdict.ok else 1
            self.last = verdict
            self.sampled_since_check = 0
            self.last_check_at = time.monotonic()
            (log.info if verdict.ok else log.error)("speculation guard (%s): %s", trigger, verdict.line())
            return verdict

    async def _round(self, engine: Any, trigger: str) -> Verdict:
        run = await run_canaries(
            engine,
            self.prompts,
            self.settings.temperatures,
            self.max_tokens,
            self.golden.greedy,
            self.settings.tie_margin,
        )
        return judge(run, self.golden, self.settings, trigger)

    def note_request(self, body: dict[str, Any], response: dict[str, Any] | None) -> None:
        """Count a finished request; feed its own token logprobs to the live signal when it asked for them."""
        temperature = body.get("temperature")
        if temperature is None or float(temperature) > 0:
            self.sampled_since_check += 1
            if response is not None:
                self.live.observe(temperature, response)

    def due(self, now: float | None = None) -> str | None:
        """Why a round is due now, or None."""
        now = time.monotonic() if now is None else now
        if self.live.alarm():
            return "live"
        if self.sampled_since_check >= self.settings.after_sampled_requests:
            return "requests"
        if now - self.last_check_at >= self.settings.interval_s:
            return "interval"
        return None

    async def watch(
        self,
        engine: Callable[[], Any],
        on_verdict: Callable[[Verdict], Awaitable[None] | None],
        poll_s: float = 1.0,
    ) -> None:
        """Run rounds when due until the engine is gone; a failed round is reported once, then rounds continue
        (metrics keep the verdict current) but cannot put the replica back: only a restart re-checks it."""
        while (current := engine()) is not None:
            await asyncio.sleep(min(poll_s, self.settings.interval_s))
            trigger = self.due()
            if trigger is None or (current := engine()) is None:
                continue
            try:
                verdict = await self.check(current, trigger)
            except Exception as exc:  # an engine that died mid-round: Serve's health check handles that
                log.warning("speculation guard round failed to run: %s", type(exc).__name__)
                self.last_check_at = time.monotonic()
                continue
            result = on_verdict(verdict)
            if asyncio.iscoroutine(result):
                await result

    def summary(self) -> dict[str, Any]:
        """For the replica's stats (routing, pool view, the gateway's audit of verdicts)."""
        last = self.last
        return {
            "state": self.state,
            "checks": self.checks,
            "failures": self.failures,
            "trigger": last.trigger if last else None,
            "reason": last.reason if last else None,
            "checked_at": last.checked_at if last else None,
            "greedy_match": last.greedy_match if last else None,
            "sampled_mean": last.sampled_mean if last else {},
            "baseline_mean": last.baseline_mean if last else {},
        }

    def exposition(self, model: str, profile: str, routable: bool) -> str:
        labels = f'model="{model}",profile="{profile}"'
        last = self.last
        out = [
            "# HELP bastion_speculation_guard_ok 1 while the last canary round passed (0: failed or not run)\n",
            "# TYPE bastion_speculation_guard_ok gauge\n",
            f"bastion_speculation_guard_ok{{{labels}}} {int(self.state == OK)}\n",
            "# HELP bastion_speculation_guard_routable 0 once the guard took this replica out of routing\n",
            "# TYPE bastion_speculation_guard_routable gauge\n",
            f"bastion_speculation_guard_routable{{{labels}}} {int(routable)}\n",
            "# HELP bastion_speculation_guard_checks_total Canary rounds run on this replica\n",
            "# TYPE bastion_speculation_guard_checks_total counter\n",
            f"bastion_speculation_guard_checks_total{{{labels}}} {self.checks}\n",
            "# HELP bastion_speculation_guard_failures_total Canary rounds that failed on this replica\n",
            "# TYPE bastion_speculation_guard_failures_total counter\n",
            f"bastion_speculation_guard_failures_total{{{labels}}} {self.failures}\n",
        ]
        if last is not None:
            out.append(
                "# HELP bastion_speculation_guard_greedy_match Share of golden greedy tokens the last round "
                "reproduced\n# TYPE bastion_speculation_guard_greedy_match gauge\n"
                f"bastion_speculation_guard_greedy_match{{{labels}}} {last.greedy_match:.6g}\n"
                "# HELP bastion_speculation_guard_logprob Mean target log-prob of the last round's samples, and "
                "the baseline without speculation\n# TYPE bastion_speculation_guard_logprob gauge\n"
            )
            for t, mean in last.sampled_mean.items():
                out.append(f'bastion_speculation_guard_logprob{{{labels},temperature="{t}",of="live"}} {mean:.6g}\n')
            for t, mean in last.baseline_mean.items():
                out.append(
                    f'bastion_speculation_guard_logprob{{{labels},temperature="{t}",of="baseline"}} {mean:.6g}\n'
                )
        return "".join(out)


class LiveSignal:
    """Real requests' own token logprobs (only those that asked for them: then they cost nothing extra). vLLM
    returns the target's raw log-probabilities of the sampled tokens, so a window whose mean falls far below
    the lowest sampled baseline (the highest guard temperature) calls a canary round; it never fails the
    replica by itself, since a real workload (random strings, another language) may legitimately score low."""

    def __init__(self, settings: GuardSettings) -> None:
        self.settings = settings
        self.total = 0.0
        self.tokens = 0
        self.floor: float | None = None  # set from the golden record by the owner

    def observe(self, temperature: Any, response: dict[str, Any]) -> None:
        top = max(self.settings.temperatures)
        if temperature is not None and float(temperature) > top:
            return  # hotter than any baseline: nothing to compare with
        for choice in response.get("choices") or []:
            logprobs = choice.get("logprobs") or {}
            values = logprobs.get("token_logprobs")  # completions
            if values is None:  # chat
                values = [c.get("logprob") for c in logprobs.get("content") or []]
            for v in values:
                if isinstance(v, int | float) and math.isfinite(v):
                    self.total += float(v)
                    self.tokens += 1

    def alarm(self) -> bool:
        """True (once per window) when the window's mean is below floor − live_margin."""
        if self.floor is None or self.tokens < self.settings.live_min_tokens:
            return False
        mean = self.total / self.tokens
        self.total, self.tokens = 0.0, 0
        return mean < self.floor - self.settings.live_margin
