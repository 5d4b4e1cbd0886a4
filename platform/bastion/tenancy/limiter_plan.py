"""The limiter's shared vocabulary: what a request is limited by (subjects, windows, slots: a `Plan`, computed
once per distinct set of subjects) and how counts are judged (`judge_windows`). Both backends
(`limiter_redis.py`, `limiter_local.py`) and the `Limiter` (`limiter.py`) read it, so they answer alike and
no backend needs to import the limiter that drives it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from limits import RateLimitItem, RateLimitItemPerMinute

from bastion.tenancy.subjects import Subject

if TYPE_CHECKING:
    from bastion.tenancy.budgets import BudgetHold

FALLBACK = "fallback"
REFUSE = "refuse"

RPM = "requests_per_minute"
TPM = "tokens_per_minute"
CONCURRENCY = "concurrent_requests"
CONC_PREFIX = "bastion:conc:"


@dataclass
class WindowState:
    limit: int
    remaining: int
    reset_s: float


@dataclass
class RateHeaders:
    """The tightest request and token windows, in OpenAI's `x-ratelimit-*` header form."""

    requests: WindowState | None = None
    tokens: WindowState | None = None

    def as_headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for kind, state in (("requests", self.requests), ("tokens", self.tokens)):
            if state is not None:
                out[f"x-ratelimit-limit-{kind}"] = str(state.limit)
                out[f"x-ratelimit-remaining-{kind}"] = str(max(state.remaining, 0))
                out[f"x-ratelimit-reset-{kind}"] = f"{max(state.reset_s, 0):.3f}s"
        return out


class LimitExceeded(Exception):
    def __init__(self, limit: str, scope: str, message: str, retry_after: float, headers: RateHeaders) -> None:
        super().__init__(message)
        self.limit = limit
        self.scope = scope
        self.retry_after = max(1, math.ceil(retry_after))
        self.headers = headers
        self.refused_state: WindowState | None = None  # the refused window, as its header reports it


class RedisUnavailable(Exception):
    """Redis cannot be reached and the tenant's policy is to refuse rather than limit in process."""


@dataclass
class Admission:
    request_id: str
    subjects: list[Subject]
    prompt_tokens: int
    headers: RateHeaders
    reserved: int = -1  # tokens reserved against the token windows (prompt + max_tokens); -1: the prompt only
    held: list[str] = field(default_factory=list)  # concurrency keys holding this request
    charged: list[tuple[str, int, int]] = field(default_factory=list)  # window key, expiry, cost
    finished: bool = False
    local: bool = False  # admitted by the in-process limiter (no Redis configured, or Redis was down)
    plan: Plan = field(default=None, repr=False)  # type: ignore[assignment]  # set by Limiter.admit
    budget: BudgetHold | None = None  # the reservation against daily/monthly budgets, settled with the rest

    def __post_init__(self) -> None:
        if self.reserved < 0:
            self.reserved = self.prompt_tokens


@dataclass(frozen=True)
class Window:
    """One per-minute window a request is charged to: a subject's request or token window."""

    subject: Subject
    kind: str  # RPM or TPM
    item: RateLimitItem
    key: str  # the `limits` library's key, the same in Redis and in process

    def cost(self, reserved: int) -> int:
        """What an admission charges: one request, or the tokens it reserves (settled when it ends)."""
        return 1 if self.kind == RPM else reserved


@dataclass(frozen=True)
class Plan:
    """What a set of subjects is limited by; computed once per distinct set, not per request."""

    windows: tuple[Window, ...]
    token_windows: tuple[Window, ...]
    slots: tuple[tuple[Subject, str, int], ...]  # subject, concurrency key, limit


_PLANS: dict[tuple[tuple[str, str, int | None, int | None, int | None], ...], Plan] = {}


def plan_for(subjects: tuple[Subject, ...]) -> Plan:
    """The subjects' plan, remembered by their limits' values (principals are rebuilt each time the key cache
    refreshes, so the key is the values, not the objects)."""
    key = tuple(
        (s.scope, s.id, s.limits.requests_per_minute, s.limits.tokens_per_minute, s.limits.concurrent_requests)
        for s in subjects
    )
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) > 10_000:
            _PLANS.clear()
        plan = _PLANS[key] = _make_plan(subjects)
    return plan


def _make_plan(subjects: tuple[Subject, ...]) -> Plan:
    windows = []
    for s in subjects:
        for kind, amount in ((RPM, s.limits.requests_per_minute), (TPM, s.limits.tokens_per_minute)):
            if amount is not None:
                item = RateLimitItemPerMinute(amount)
                windows.append(Window(s, kind, item, item.key_for(s.scope, s.id, kind)))
    slots = tuple(
        (s, f"{CONC_PREFIX}{s.scope}:{s.id}", s.limits.concurrent_requests)
        for s in subjects
        if s.limits.concurrent_requests is not None
    )
    return Plan(tuple(windows), tuple(w for w in windows if w.kind == TPM), slots)


def judge_windows(admission: Admission, counts: list[int], ends: list[float], now: float) -> LimitExceeded | None:
    """Fill the admission's headers from the windows' counts after this request's charge; the first window it
    overflows, as a refusal (both backends share this, so they answer alike)."""
    reserved = admission.reserved
    tightest: dict[str, WindowState] = {}
    refusal: LimitExceeded | None = None
    for window, count, end in zip(admission.plan.windows, counts, ends, strict=True):
        amount = window.item.amount
        state = WindowState(amount, amount - count, end - now)
        mine = tightest.get(window.kind)
        if mine is None or state.remaining < mine.remaining:
            tightest[window.kind] = state
        if state.remaining < 0 and refusal is None:
            refusal = window_refusal(window, state, reserved, admission.prompt_tokens)
    headers = admission.headers
    headers.requests = tightest.get(RPM, headers.requests)
    headers.tokens = tightest.get(TPM, headers.tokens)
    if refusal is not None:
        refused = refusal.refused_state
        if refusal.limit == RPM:
            headers.requests = refused
        else:
            headers.tokens = refused
        refusal.headers = headers
    return refusal


def window_refusal(window: Window, state: WindowState, reserved: int, prompt_tokens: int) -> LimitExceeded:
    amount, scope = window.item.amount, window.subject.scope
    if window.kind == RPM:
        refused = WindowState(amount, 0, state.reset_s)
        message = f"Rate limit reached: {amount} requests per minute for this {scope}"
    else:
        refused = WindowState(amount, max(state.remaining + reserved, 0), state.reset_s)
        needs = f"{prompt_tokens} prompt tokens"
        if reserved != prompt_tokens:
            needs = f"{reserved} tokens: {needs} + up to {reserved - prompt_tokens} completion tokens"
        message = f"Rate limit reached: {amount} tokens per minute for this {scope} (this request reserves {needs})"
    error = LimitExceeded(window.kind, scope, message, state.reset_s, RateHeaders())
    error.refused_state = refused
    return error


def slot_refusal(subject: Subject, headers: RateHeaders) -> LimitExceeded:
    limit = subject.limits.concurrent_requests
    message = f"Concurrency limit reached: {limit} requests in flight for this {subject.scope}"
    return LimitExceeded(CONCURRENCY, subject.scope, message, 1, headers)
