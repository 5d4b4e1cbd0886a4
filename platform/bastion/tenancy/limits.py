"""Rate, token and concurrency limits per tenant and per key, shared through Redis or kept in process.

Windows (requests and tokens per minute) are fixed one-minute windows (the `limits` library's items and keys);
concurrency is a set of in-flight request ids per subject. Every admission is all-or-none: a request is charged
to every window and takes every slot it is subject to, or is refused having taken nothing. Completion tokens
are added to the token windows when the request ends (they cannot be known before).

Two backends behind one interface: Redis (`redis_limits.py`: one script per admission and one per release, so
two gateway replicas can never admit more than a limit together; slots older than `lease_s` are dropped, so a
crashed replica cannot leak them forever) and in process (`local_limits.py`: a few dictionary operations).
What a set of subjects is limited by is computed once per distinct set (`plan_for`); both backends report
their counts to `judge_windows`, so they answer alike (headers, messages).

Redis unavailable: each tenant has a policy (`redis.when_unavailable`, overridable per tenant in
`redis.tenant_policies`): `fallback` admits against this replica's in-process limiter (limits then hold per
gateway replica, not across them; a warning is logged and `bastion_limiter_redis_unavailable` is 1), `refuse`
answers 503. After a failure Redis is left alone for `retry_s`, then the next request tries it again: recovery
needs nothing from an operator.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

from limits import RateLimitItem, RateLimitItemPerMinute
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bastion.config.schema import LimitsConfig
from bastion.tenancy.local_limits import LocalSlots, LocalWindows
from bastion.tenancy.redis_limits import RedisLimits

log = logging.getLogger(__name__)
FALLBACK = "fallback"
REFUSE = "refuse"
# What "Redis is down" looks like from redis-py: refused or dropped connections, timeouts.
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError, OSError)

RPM = "requests_per_minute"
TPM = "tokens_per_minute"
CONCURRENCY = "concurrent_requests"
_CONC_PREFIX = "bastion:conc:"


@dataclass(frozen=True)
class Subject:
    """One level a limit applies at: ("tenant", tenant id) or ("key", key id)."""

    scope: str
    id: str
    limits: LimitsConfig


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
    held: list[str] = field(default_factory=list)  # concurrency keys holding this request
    charged: list[tuple[str, int, int]] = field(default_factory=list)  # window key, expiry, cost
    finished: bool = False
    local: bool = False  # admitted by the in-process limiter (no Redis configured, or Redis was down)
    plan: Plan = field(default=None, repr=False)  # type: ignore[assignment]  # set by Limiter.admit


@dataclass(frozen=True)
class Window:
    """One per-minute window a request is charged to: a subject's request or token window."""

    subject: Subject
    kind: str  # RPM or TPM
    item: RateLimitItem
    key: str  # the `limits` library's key, the same in Redis and in process

    def cost(self, prompt_tokens: int) -> int:
        return 1 if self.kind == RPM else prompt_tokens


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
        (s, f"{_CONC_PREFIX}{s.scope}:{s.id}", s.limits.concurrent_requests)
        for s in subjects
        if s.limits.concurrent_requests is not None
    )
    return Plan(tuple(windows), tuple(w for w in windows if w.kind == TPM), slots)


def judge_windows(admission: Admission, counts: list[int], ends: list[float], now: float) -> LimitExceeded | None:
    """Fill the admission's headers from the windows' counts after this request's charge; the first window it
    overflows, as a refusal (both backends share this, so they answer alike)."""
    prompt_tokens = admission.prompt_tokens
    tightest: dict[str, WindowState] = {}
    refusal: LimitExceeded | None = None
    for window, count, end in zip(admission.plan.windows, counts, ends, strict=True):
        amount = window.item.amount
        state = WindowState(amount, amount - count, end - now)
        mine = tightest.get(window.kind)
        if mine is None or state.remaining < mine.remaining:
            tightest[window.kind] = state
        if state.remaining < 0 and refusal is None:
            refusal = _window_refusal(window, state, prompt_tokens)
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


def _window_refusal(window: Window, state: WindowState, prompt_tokens: int) -> LimitExceeded:
    amount, scope = window.item.amount, window.subject.scope
    if window.kind == RPM:
        refused = WindowState(amount, 0, state.reset_s)
        message = f"Rate limit reached: {amount} requests per minute for this {scope}"
    else:
        refused = WindowState(amount, max(state.remaining + prompt_tokens, 0), state.reset_s)
        message = (
            f"Rate limit reached: {amount} tokens per minute for this {scope} "
            f"(this request needs {prompt_tokens} prompt tokens)"
        )
    error = LimitExceeded(window.kind, scope, message, state.reset_s, RateHeaders())
    error.refused_state = refused
    return error


def _slot_refusal(subject: Subject, headers: RateHeaders) -> LimitExceeded:
    limit = subject.limits.concurrent_requests
    message = f"Concurrency limit reached: {limit} requests in flight for this {subject.scope}"
    return LimitExceeded(CONCURRENCY, subject.scope, message, 1, headers)


class Limiter:
    def __init__(
        self,
        redis_url: str | None = None,
        *,
        lease_s: float = 900.0,
        when_unavailable: str = FALLBACK,
        tenant_policies: dict[str, str] | None = None,
        retry_s: float = 1.0,
        timeout_s: float = 2.0,
    ) -> None:
        self._redis: Redis | None = None
        self._shared: RedisLimits | None = None
        if redis_url:
            self._redis = Redis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
            self._shared = RedisLimits(self._redis, lease_s)
        self._windows = LocalWindows()
        self._slots = LocalSlots()
        self.when_unavailable = when_unavailable
        self.tenant_policies = dict(tenant_policies or {})
        self.retry_s = retry_s
        self._down_until = 0.0  # monotonic: Redis is not tried again before this
        self.redis_down = False
        self.fallback_admissions = 0  # admitted in process because Redis was down (a Prometheus counter)
        self.redis_refusals = 0  # refused (503) because Redis was down and the tenant's policy says so

    @property
    def redis(self) -> Redis | None:
        """The Redis client (shared with budgets), or None for the in-process limiter."""
        return self._redis

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

    def policy_for(self, tenant: str | None) -> str:
        """The tenant's policy when Redis is down: its override (by id or name), else the platform's default."""
        return self.tenant_policies.get(tenant or "", self.when_unavailable)

    def _mark_down(self, exc: BaseException) -> None:
        self._down_until = time.monotonic() + self.retry_s
        if not self.redis_down:
            log.warning("Redis unavailable (%s): limits follow each tenant's policy", type(exc).__name__)
        self.redis_down = True

    def _mark_up(self) -> None:
        if self.redis_down:
            log.warning("Redis is back: limits are shared across gateway replicas again")
        self.redis_down = False

    # --- the calls the gateway makes ----------------------------------------------------------------------

    async def admit(
        self, request_id: str, subjects: list[Subject], prompt_tokens: int, *, tenant: str | None = None
    ) -> Admission:
        """Take slots and charge the windows for one request, or raise LimitExceeded having kept nothing.

        `tenant` (id or name) picks the policy when Redis is down: RedisUnavailable for `refuse`."""
        plan = plan_for(tuple(subjects))
        if self._redis is not None and time.monotonic() >= self._down_until:
            admission = Admission(request_id, subjects, prompt_tokens, RateHeaders(), plan=plan)
            try:
                await self._admit_redis(admission)
            except REDIS_DOWN as exc:
                self._mark_down(exc)
            else:
                self._mark_up()
                return admission
        if self._redis is not None:  # down: the tenant's policy decides
            if self.policy_for(tenant) == REFUSE:
                self.redis_refusals += 1
                raise RedisUnavailable("the rate limiter's store (Redis) is unavailable")
            self.fallback_admissions += 1
        admission = Admission(request_id, subjects, prompt_tokens, RateHeaders(), local=True, plan=plan)
        self._admit_local(admission)
        return admission

    async def cancel(self, admission: Admission) -> None:
        """Undo an admission that will not run (another check refused it): slots back, window hits refunded."""
        admission.finished = True
        if admission.local:
            self._release_local(admission, refund=True)
            return
        charged, admission.charged = admission.charged, []
        await self._release_redis(admission, [(key, expiry, -cost) for key, expiry, cost in charged])

    async def finish(self, admission: Admission, completion_tokens: int) -> None:
        """Free the request's slots and add its completion tokens to the token windows (idempotent)."""
        if admission.finished:
            return
        admission.finished = True
        if admission.local:
            self._release_local(admission, refund=False, completion_tokens=completion_tokens)
            return
        tokens = [(w.key, w.item.get_expiry(), completion_tokens) for w in admission.plan.token_windows]
        try:
            await self._release_redis(admission, tokens if completion_tokens > 0 else [])
        except REDIS_DOWN as exc:  # the slot's lease frees it later; nothing to tell the client
            self._mark_down(exc)

    # --- in process ---------------------------------------------------------------------------------------

    def _admit_local(self, admission: Admission) -> None:
        plan, windows, now = admission.plan, self._windows, time.time()
        counts, ends = [], []
        for window in plan.windows:
            count, end = windows.peek(window.key, now)
            counts.append(count + window.cost(admission.prompt_tokens))
            ends.append(end if end is not None else now + window.item.get_expiry())
        refusal = judge_windows(admission, counts, ends, now)
        full = next((s for s, key, limit in plan.slots if self._slots.full(key, limit)), None)
        if full is not None:
            raise _slot_refusal(full, admission.headers)
        if refusal is not None:
            raise refusal
        for window in plan.windows:
            windows.add(window.key, window.cost(admission.prompt_tokens), window.item.get_expiry(), now)
        for _, key, _ in plan.slots:
            self._slots.take(key)
        admission.held = [key for _, key, _ in plan.slots]

    def _release_local(self, admission: Admission, *, refund: bool, completion_tokens: int = 0) -> None:
        held, admission.held = admission.held, []
        for key in held:
            self._slots.release(key)
        now = time.time()
        if refund:
            for window in admission.plan.windows:
                self._windows.add(window.key, -window.cost(admission.prompt_tokens), window.item.get_expiry(), now)
        elif completion_tokens > 0:
            for window in admission.plan.token_windows:
                self._windows.add(window.key, completion_tokens, window.item.get_expiry(), now)

    # --- Redis --------------------------------------------------------------------------------------------

    async def _admit_redis(self, admission: Admission) -> None:
        assert self._shared is not None
        plan = admission.plan
        verdict, counts, ends, now = await self._shared.admit(admission.request_id, plan, admission.prompt_tokens)
        refusal = judge_windows(admission, counts, ends, now)
        if verdict < 0:
            raise _slot_refusal(plan.slots[-verdict - 1][0], admission.headers)
        if verdict > 0:  # the script refused a window (judge_windows, reading the same counts, names it)
            window = plan.windows[verdict - 1]
            raise refusal or _window_refusal(window, WindowState(window.item.amount, -1, 60.0), admission.prompt_tokens)
        admission.held = [key for _, key, _ in plan.slots]
        admission.charged = [(w.key, w.item.get_expiry(), w.cost(admission.prompt_tokens)) for w in plan.windows]

    async def _release_redis(self, admission: Admission, amounts: list[tuple[str, int, int]]) -> None:
        assert self._shared is not None
        held, admission.held = admission.held, []
        await self._shared.release(admission.request_id, held, amounts)
