"""Rate, token and concurrency limits per tenant and per key, shared through Redis or kept in process.

Windows (requests and tokens per minute) are fixed one-minute windows (the `limits` library's items and keys);
concurrency is a set of in-flight request ids per subject. Every admission is all-or-none: a request is charged
to every window and takes every slot it is subject to, or is refused having taken nothing. Token windows are
reserve-then-settle: admission charges the worst case (prompt + max_tokens, `reserve`), so requests admitted
at the same moment cannot overrun a limit together; the end settles to what was really used (the difference
refunded). A crashed replica's reservation lapses with its window (one minute at most).

Daily and monthly budgets (`budgets.py`) join the same admission when a `BudgetTracker` is passed: reserved and
settled in the same Redis scripts, or in the same synchronous step in process, so a request is refused by a
budget having taken no slot or window, and by a window having reserved no budget.

Two backends behind one interface: Redis (`limiter_redis.py`: one script per admission and one per release,
budgets included, so two gateway replicas can never admit more than a limit together; slots older than
`lease_s` are dropped, so a crashed replica cannot leak them forever) and in process (`limiter_local.py`: a few
dictionary operations).
What a set of subjects is limited by is computed once per distinct set (`limiter_plan.plan_for`); both backends
report their counts to `judge_windows`, so they answer alike (headers, messages).

Redis unavailable: each tenant has a policy (`redis.when_unavailable`, overridable per tenant in
`redis.tenant_policies`): `fallback` admits against this replica's in-process limiter (limits then hold per
gateway replica, not across them; a warning is logged and `bastion_limiter_redis_unavailable` is 1), `refuse`
answers 503. After a failure Redis is left alone for `retry_s`, then the next request tries it again: recovery
needs nothing from an operator.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime

from redis.asyncio import Redis

from bastion.db.models import utcnow
from bastion.tenancy.budgets import BudgetTracker
from bastion.tenancy.limiter_local import LocalSlots, LocalWindows
from bastion.tenancy.limiter_plan import (
    FALLBACK,
    REFUSE,
    Admission,
    RateHeaders,
    RedisUnavailable,
    Subject,
    WindowState,
    judge_windows,
    plan_for,
    slot_refusal,
    window_refusal,
)
from bastion.tenancy.limiter_redis import ADMITTED, BUDGET_OVER, BUDGET_UNSEEDED, SLOT_FULL, WINDOW_OVER, RedisLimits
from bastion.tenancy.subjects import REDIS_DOWN

log = logging.getLogger(__name__)


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
        self,
        request_id: str,
        subjects: list[Subject],
        prompt_tokens: int,
        *,
        reserve: int | None = None,
        tenant: str | None = None,
        budgets: BudgetTracker | None = None,
        at: datetime | None = None,
    ) -> Admission:
        """Take slots, charge the windows and reserve the budgets for one request, or raise LimitExceeded or
        BudgetExhausted having kept nothing.

        `reserve`: tokens charged to the token windows and budgets until `finish` settles them (default: the
        prompt). `budgets`: the tracker whose budgets apply (None: none are checked), in `at`'s periods (default
        now). `tenant` (id or name) picks the policy when Redis is down: RedisUnavailable for `refuse`."""
        plan = plan_for(tuple(subjects))
        reserved = prompt_tokens if reserve is None else max(reserve, prompt_tokens)
        hold = budgets.hold(request_id, subjects, reserved, at or utcnow()) if budgets is not None else None
        admission = Admission(request_id, subjects, prompt_tokens, RateHeaders(), reserved, plan=plan, budget=hold)
        if self._redis is not None and time.monotonic() >= self._down_until:
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
        admission.local = True
        if hold is not None:
            await hold.tracker.prepare_local(hold)
        self._admit_local(admission)
        return admission

    async def cancel(self, admission: Admission) -> None:
        """Undo an admission that will not run: slots back, window hits refunded, budget reservation dropped."""
        admission.finished = True
        if admission.local:
            self._release_local(admission, refund=True)
            return
        charged, admission.charged = admission.charged, []
        await self._release_redis(admission, [(key, expiry, -cost) for key, expiry, cost in charged], 0)

    async def finish(self, admission: Admission, completion_tokens: int, *, used: int | None = None) -> None:
        """Free the request's slots and settle its reservations to the tokens it used (idempotent).

        `used`: prompt + completion tokens as the engine counted them (default: the admitted prompt + completion)."""
        if admission.finished:
            return
        admission.finished = True
        used = admission.prompt_tokens + completion_tokens if used is None else used
        delta = used - admission.reserved
        if admission.local:
            self._release_local(admission, refund=False, settle=delta, used=used)
            return
        tokens = [(w.key, w.item.get_expiry(), delta) for w in admission.plan.token_windows]
        try:
            await self._release_redis(admission, tokens if delta != 0 else [], used)
        except REDIS_DOWN as exc:  # the slot's lease frees it later; nothing to tell the client
            self._mark_down(exc)
            if admission.budget is not None:  # its reservation lapses with its lease; this process counts the use
                log.warning("budget settlement failed (%s): kept in this process", type(exc).__name__)
                admission.budget.tracker.settle_local(admission.budget, used)

    # --- in process ---------------------------------------------------------------------------------------

    def _admit_local(self, admission: Admission) -> None:
        plan, windows, now, hold = admission.plan, self._windows, time.time(), admission.budget
        counts, ends = [], []
        for window in plan.windows:
            count, end = windows.peek(window.key, now)
            counts.append(count + window.cost(admission.reserved))
            ends.append(end if end is not None else now + window.item.get_expiry())
        refusal = judge_windows(admission, counts, ends, now)
        if hold is not None:  # budgets first, slots, then windows: the order the Redis script refuses in
            hold.tracker.check_local(hold)
        full = next((s for s, key, limit in plan.slots if self._slots.full(key, limit)), None)
        if full is not None:
            raise slot_refusal(full, admission.headers)
        if refusal is not None:
            raise refusal
        for window in plan.windows:
            windows.add(window.key, window.cost(admission.reserved), window.item.get_expiry(), now)
        for _, key, _ in plan.slots:
            self._slots.take(key)
        admission.held = [key for _, key, _ in plan.slots]
        if hold is not None:
            hold.tracker.reserve_local(hold)

    def _release_local(self, admission: Admission, *, refund: bool, settle: int = 0, used: int = 0) -> None:
        held, admission.held = admission.held, []
        for key in held:
            self._slots.release(key)
        now = time.time()
        if refund:
            for window in admission.plan.windows:
                self._windows.add(window.key, -window.cost(admission.reserved), window.item.get_expiry(), now)
        elif settle != 0:  # used - reserved: a refund when negative
            for window in admission.plan.token_windows:
                self._windows.add(window.key, settle, window.item.get_expiry(), now)
        hold = admission.budget
        if hold is not None and not hold.settled:
            hold.settled = True
            hold.tracker.settle_local(hold, 0 if refund else used)

    # --- Redis --------------------------------------------------------------------------------------------

    async def _admit_redis(self, admission: Admission) -> None:
        assert self._shared is not None
        plan, hold = admission.plan, admission.budget
        for _ in range(len(hold.lines) + 1 if hold is not None else 1):
            answer = await self._shared.admit(admission.request_id, plan, admission.reserved, hold)
            if answer.verdict != BUDGET_UNSEEDED:
                break
            assert hold is not None  # not in Redis yet: seed the total from the database, then again
            await hold.tracker.seed(hold.lines[answer.index])
        else:
            raise RuntimeError("budget totals could not be seeded in Redis")
        refusal = judge_windows(admission, answer.counts, answer.ends, answer.now)
        if hold is not None and answer.verdict in (BUDGET_OVER, ADMITTED):
            hold.tracker.judge(hold, answer.budget_used)  # raises for BUDGET_OVER; else sets what is left
        if answer.verdict == BUDGET_OVER:
            raise RuntimeError("the admission script and the budget judge disagree")
        if answer.verdict == SLOT_FULL:
            raise slot_refusal(plan.slots[answer.index][0], admission.headers)
        if answer.verdict == WINDOW_OVER:  # judge_windows, reading the same counts, names the refused window
            window = plan.windows[answer.index]
            state = WindowState(window.item.amount, -1, 60.0)
            raise refusal or window_refusal(window, state, admission.reserved, admission.prompt_tokens)
        admission.held = [key for _, key, _ in plan.slots]
        admission.charged = [(w.key, w.item.get_expiry(), w.cost(admission.reserved)) for w in plan.windows]

    async def _release_redis(self, admission: Admission, amounts: list[tuple[str, int, int]], used: int) -> None:
        assert self._shared is not None
        held, admission.held = admission.held, []
        hold = admission.budget
        if hold is not None:
            if hold.settled:
                hold = None
            else:
                hold.settled = True
        await self._shared.release(admission.request_id, held, amounts, hold, used)
