"""Rate, token and concurrency limits per tenant and per key, shared through Redis or kept in process.

Windows (requests and tokens per minute) use the `limits` library's fixed-window counters: a hit is one atomic
INCRBY, so two gateway replicas can never admit more than the limit together. A request hits every window it
is subject to; if any is over, the hits it made are refunded, so a rejected request costs nothing. Completion
tokens are added to the token windows when the request ends (they cannot be known before).

Concurrency: a Redis sorted set of in-flight request ids per subject, taken all-or-none by one small script
(entries older than `lease_s` are dropped, so a crashed replica cannot leak slots forever), or a plain counter
in process.

Redis unavailable: each tenant has a policy (`redis.when_unavailable`, overridable per tenant in
`redis.tenant_policies`): `fallback` admits against this replica's in-process limiter (limits then hold per
gateway replica, not across them; a warning is logged and `bastion_limiter_redis_unavailable` is 1), `refuse`
answers 503. After a failure Redis is left alone for `retry_s`, then the next request tries it again: recovery
needs nothing from an operator.

Round trips with Redis: admission sends the concurrency script and every window's INCRBY at once (one
round-trip time over several connections; a window's end is read once per window and remembered); the end of
a request sends the slot release and the completion tokens at once. Undoing a refused admission costs one more.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bastion.config.schema import LimitsConfig

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


# All-or-none slot acquisition over several sorted sets (tenant, key): drop entries past their lease, refuse
# with the 1-based index of the first full set, else add the request everywhere. The `limits` library has no
# concurrency limiter; this is the one script Bastion keeps.
_ACQUIRE_SLOTS = """
local now, lease, member = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
for i, key in ipairs(KEYS) do
  redis.call('zremrangebyscore', key, '-inf', now - lease)
  if redis.call('zcard', key) >= tonumber(ARGV[3 + i]) then return i end
end
for _, key in ipairs(KEYS) do
  redis.call('zadd', key, now, member)
  redis.call('expire', key, math.ceil(lease) + 60)
end
return 0
"""


def _item(amount: int) -> RateLimitItem:
    return RateLimitItemPerMinute(amount)


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
        self._memory = MemoryStorage()
        self._storage: Storage = self._memory
        if redis_url:
            timeouts = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
            self._storage = RedisStorage(
                "async+" + redis_url, implementation="redispy", key_prefix="bastion:rl", **timeouts
            )
            self._redis = Redis.from_url(redis_url, **timeouts)
            self._acquire_script = self._redis.register_script(_ACQUIRE_SLOTS)
        self._lease_s = lease_s
        self._local_conc: dict[str, int] = {}
        self._ends: dict[str, float] = {}  # window key → when it ends (epoch seconds)
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
            self._ends.clear()  # window ends learnt in process do not hold in Redis
        self.redis_down = False

    def _storage_for(self, admission: Admission) -> Storage:
        return self._memory if admission.local else self._storage

    async def _all(self, calls: list[Awaitable[Any]]) -> list[Any]:
        """Redis: concurrently (one round-trip time); in process: in order (no task overhead)."""
        if self._redis is None or len(calls) == 1:
            return [await c for c in calls]
        results = await asyncio.gather(*calls, return_exceptions=True)  # all finish before anything is undone
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    # --- windows ----------------------------------------------------------------------------------

    def _windows(self, subjects: list[Subject], prompt_tokens: int) -> list[tuple[Subject, str, RateLimitItem, int]]:
        out = []
        for s in subjects:
            if s.limits.requests_per_minute is not None:
                out.append((s, RPM, _item(s.limits.requests_per_minute), 1))
            if s.limits.tokens_per_minute is not None:
                out.append((s, TPM, _item(s.limits.tokens_per_minute), prompt_tokens))
        return out

    async def _hit_windows(self, admission: Admission, prompt_tokens: int) -> LimitExceeded | None:
        """Charge every window; fill the admission's headers; return the first refusal (not yet refunded)."""
        windows = self._windows(admission.subjects, prompt_tokens)
        if not windows:
            return None
        storage = self._storage_for(admission)
        keys = [item.key_for(s.scope, s.id, kind) for s, kind, item, _ in windows]
        now = time.time()
        # A fixed window's end never moves, so each replica asks Redis for it once per window, not per request.
        unknown = [k for k in keys if self._ends.get(k, 0) <= now]
        incrs = [storage.incr(k, w[2].get_expiry(), amount=w[3]) for k, w in zip(keys, windows, strict=True)]
        results = await self._all([*incrs, *(storage.get_expiry(k) for k in unknown)])
        counts = results[: len(keys)]
        admission.charged = [(k, w[2].get_expiry(), w[3]) for k, w in zip(keys, windows, strict=True)]
        if len(self._ends) > 100_000:
            self._ends.clear()
        for key, end in zip(unknown, results[len(keys) :], strict=True):
            self._ends[key] = end
        now = time.time()
        states = []
        for key, (_, _, item, cost), count in zip(keys, windows, counts, strict=True):
            if count == cost or self._ends.get(key, 0) <= now:  # this hit opened the window (or the TTL raced it)
                self._ends[key] = now + item.get_expiry()
            states.append(WindowState(item.amount, item.amount - count, self._ends[key] - now))
        for kind in (RPM, TPM):
            mine = [st for (_, k, _, _), st in zip(windows, states, strict=True) if k == kind]
            if mine:
                setattr(
                    admission.headers, "requests" if kind == RPM else "tokens", min(mine, key=lambda x: x.remaining)
                )
        for (subject, kind, item, cost), state in zip(windows, states, strict=True):
            if state.remaining >= 0:
                continue
            if kind == RPM:
                admission.headers.requests = WindowState(item.amount, 0, state.reset_s)
                message = f"Rate limit reached: {item.amount} requests per minute for this {subject.scope}"
            else:
                left = max(state.remaining + cost, 0)
                admission.headers.tokens = WindowState(item.amount, left, state.reset_s)
                message = (
                    f"Rate limit reached: {item.amount} tokens per minute for this {subject.scope} "
                    f"(this request needs {cost} prompt tokens)"
                )
            return LimitExceeded(kind, subject.scope, message, state.reset_s, admission.headers)
        return None

    async def _refund(self, admission: Admission) -> None:
        charged, admission.charged = admission.charged, []
        if charged:
            storage = self._storage_for(admission)
            await self._all([storage.incr(k, expiry, amount=-cost) for k, expiry, cost in charged])

    def _token_adds(self, admission: Admission, tokens: int) -> list[Awaitable[Any]]:
        if tokens <= 0:
            return []
        storage = self._storage_for(admission)
        windows = [(s, item) for s, kind, item, _ in self._windows(admission.subjects, 0) if kind == TPM]
        return [storage.incr(item.key_for(s.scope, s.id, TPM), item.get_expiry(), tokens) for s, item in windows]

    # --- concurrency --------------------------------------------------------------------------------

    def _slots_wanted(self, subjects: list[Subject]) -> list[tuple[Subject, str, int]]:
        return [
            (s, f"{_CONC_PREFIX}{s.scope}:{s.id}", s.limits.concurrent_requests)
            for s in subjects
            if s.limits.concurrent_requests is not None
        ]

    async def _take_slots(self, admission: Admission) -> LimitExceeded | None:
        """Take a slot at every level with a concurrency limit, all or none."""
        wanted = self._slots_wanted(admission.subjects)
        if not wanted:
            return None
        if self._redis is None or admission.local:
            refused = next((s for s, key, limit in wanted if self._local_conc.get(key, 0) >= limit), None)
            if refused is None:
                for _, key, _ in wanted:
                    self._local_conc[key] = self._local_conc.get(key, 0) + 1
        else:
            args = [time.time(), self._lease_s, admission.request_id, *(limit for _, _, limit in wanted)]
            index = await self._acquire_script(keys=[key for _, key, _ in wanted], args=args)
            refused = wanted[int(index) - 1][0] if index else None
        if refused is not None:
            limit = refused.limits.concurrent_requests
            message = f"Concurrency limit reached: {limit} requests in flight for this {refused.scope}"
            return LimitExceeded(CONCURRENCY, refused.scope, message, 1, RateHeaders())
        admission.held = [key for _, key, _ in wanted]
        return None

    async def _release_slots(self, admission: Admission) -> None:
        held, admission.held = admission.held, []
        if not held:
            return
        if self._redis is None or admission.local:
            for key in held:
                self._local_conc[key] = max(self._local_conc.get(key, 1) - 1, 0)
            return
        if len(held) == 1:
            await self._redis.zrem(held[0], admission.request_id)
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in held:
                pipe.zrem(key, admission.request_id)
            await pipe.execute()

    # --- the calls the gateway makes ----------------------------------------------------------------------

    async def admit(
        self, request_id: str, subjects: list[Subject], prompt_tokens: int, *, tenant: str | None = None
    ) -> Admission:
        """Take slots and charge the windows for one request, or raise LimitExceeded having kept nothing.

        `tenant` (id or name) picks the policy when Redis is down: RedisUnavailable for `refuse`."""
        if self._redis is not None and time.monotonic() >= self._down_until:
            try:
                admission = await self._admit(Admission(request_id, subjects, prompt_tokens, RateHeaders()))
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
        return await self._admit(Admission(request_id, subjects, prompt_tokens, RateHeaders(), local=True))

    async def _admit(self, admission: Admission) -> Admission:
        try:
            slot_refusal, window_refusal = await self._all(
                [self._take_slots(admission), self._hit_windows(admission, admission.prompt_tokens)]
            )
        except BaseException:
            await self._cancel_quietly(admission)
            raise
        refusal = slot_refusal or window_refusal
        if refusal is not None:
            await self.cancel(admission)
            if refusal is slot_refusal:
                refusal.headers = admission.headers
            raise refusal
        return admission

    async def cancel(self, admission: Admission) -> None:
        """Undo an admission that will not run (another check refused it): slots back, window hits refunded."""
        admission.finished = True
        await self._all([self._release_slots(admission), self._refund(admission)])

    async def _cancel_quietly(self, admission: Admission) -> None:
        """Cancel after a failure: with Redis gone, slots expire with their lease and windows with their minute."""
        try:
            await self.cancel(admission)
        except REDIS_DOWN as exc:
            self._mark_down(exc)

    async def finish(self, admission: Admission, completion_tokens: int) -> None:
        """Free the request's slots and add its completion tokens to the token windows (idempotent)."""
        if admission.finished:
            return
        admission.finished = True
        try:
            await self._all([self._release_slots(admission), *self._token_adds(admission, completion_tokens)])
        except REDIS_DOWN as exc:  # the slot's lease frees it later; nothing to tell the client
            self._mark_down(exc)
