"""The Redis half of the limiter, shared by every gateway replica: one script per admission, one per settlement.

An admission must be all-or-none over several counters at once (the tenant's and the key's request and token
windows, their concurrency slots, their daily and monthly budgets): the `limits` library charges one counter
per call, so it would take a round trip per counter and a refund when a later one refuses (a refused request
briefly consumed quota, and a gateway replica paid ~0.5 ms of CPU per request in client calls). One script
checks every window, budget and slot, then charges them all or none, in one round trip; budgets ride in the
same script (they used to be a second one, sent alongside: redis-py's cost of a script call, twice per
request). The windows are the `limits` library's fixed windows, under the keys and with the expiry rule it uses
(`RateLimitItem.key_for`, set the expiry when the counter is created), so the semantics are the library's.
Budgets are `budgets.py`'s: per budget a settled total (seeded from the database), a sorted set of leased
reservations ("<request id>|<tokens>" scored by the lease's end, swept when it is over) and their sum.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from redis.asyncio import Redis

if TYPE_CHECKING:
    from bastion.tenancy.budgets import BudgetHold
    from bastion.tenancy.limiter_plan import Plan

KEY_PREFIX = "bastion:rl:"

# Verdicts (the first element of the admission script's answer; the second is the 1-based index it is about).
ADMITTED, WINDOW_OVER, SLOT_FULL, BUDGET_OVER, BUDGET_UNSEEDED = 0, 1, 2, 3, 4

# KEYS: slot keys (sorted sets of in-flight request ids), window keys (counters), then per budget: settled total,
# reservations, their sum. ARGV: now, slot lease, member, number of slots, number of windows, budget lease end,
# budget member, each slot's limit, per window: expiry, limit, cost; per budget: budget, cost.
# Returns {verdict, index, count after this request's charge and TTL in ms per window, used + reserved before
# this request per budget}. Precedence when several refuse: budget, slot, window (nothing is charged then). A
# budget total missing from Redis (BUDGET_UNSEEDED) returns at once, before anything is swept or charged.
_ADMIT = """
local now, lease, member = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local nslots, nwin, deadline, bmember = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], ARGV[7]
local nbud = (#KEYS - nslots - nwin) / 3
local wbase, bbase, kbase = 7 + nslots, 7 + nslots + 3 * nwin, nslots + nwin
for k = 1, nbud do
  if redis.call('exists', KEYS[kbase + 3 * k - 2]) == 0 then return {4, k} end
end
local out = {0, 0}
local over = 0
for j = 1, nwin do
  local key, base = KEYS[nslots + j], wbase + 3 * (j - 1)
  local count = tonumber(redis.call('get', key) or '0') + tonumber(ARGV[base + 3])
  if over == 0 and count > tonumber(ARGV[base + 2]) then over = j end
  out[#out + 1] = count
  out[#out + 1] = redis.call('pttl', key)
end
local bover = 0
for k = 1, nbud do
  local total, resv, sum = KEYS[kbase + 3 * k - 2], KEYS[kbase + 3 * k - 1], KEYS[kbase + 3 * k]
  local stale = redis.call('zrangebyscore', resv, '-inf', now)
  for _, m in ipairs(stale) do redis.call('decrby', sum, tonumber(string.match(m, '|(%d+)$'))) end
  if #stale > 0 then redis.call('zremrangebyscore', resv, '-inf', now) end
  local used = tonumber(redis.call('get', total)) + tonumber(redis.call('get', sum) or '0')
  out[#out + 1] = used
  if bover == 0 and used + tonumber(ARGV[bbase + 2 * k]) > tonumber(ARGV[bbase + 2 * k - 1]) then bover = k end
end
if bover > 0 then out[1] = 3 out[2] = bover return out end
for i = 1, nslots do
  redis.call('zremrangebyscore', KEYS[i], '-inf', now - lease)
  if redis.call('zcard', KEYS[i]) >= tonumber(ARGV[7 + i]) then out[1] = 2 out[2] = i return out end
end
if over > 0 then out[1] = 1 out[2] = over return out end
for j = 1, nwin do
  local key, base = KEYS[nslots + j], wbase + 3 * (j - 1)
  local cost = tonumber(ARGV[base + 3])
  if redis.call('incrby', key, cost) == cost then redis.call('expire', key, ARGV[base + 1]) end
end
for i = 1, nslots do
  redis.call('zadd', KEYS[i], now, member)
  redis.call('expire', KEYS[i], math.ceil(lease) + 60)
end
for k = 1, nbud do
  local total, resv, sum = KEYS[kbase + 3 * k - 2], KEYS[kbase + 3 * k - 1], KEYS[kbase + 3 * k]
  redis.call('zadd', resv, deadline, bmember)
  redis.call('incrby', sum, ARGV[bbase + 2 * k])
  local ttl = redis.call('ttl', total)
  if ttl > 0 then
    redis.call('expire', resv, ttl)
    redis.call('expire', sum, ttl)
  end
end
return out
"""

# KEYS: slot keys to leave, window keys, then budget triples as _ADMIT's. ARGV: member, number of slots, number of
# windows, per window: expiry, amount (tokens to add, or a negative refund; a refund to a window that has ended has
# nothing to undo); then, with budgets: budget member, its reservation, tokens used. A budget reservation already
# swept (its lease ended) is not refunded twice; the tokens used are added either way.
_RELEASE = """
local member, nslots, nwin = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 1, nslots do redis.call('zrem', KEYS[i], member) end
for j = 1, nwin do
  local key, amount = KEYS[nslots + j], tonumber(ARGV[3 + 2 * j])
  if amount > 0 then
    if redis.call('incrby', key, amount) == amount then redis.call('expire', key, ARGV[2 + 2 * j]) end
  elseif amount < 0 and redis.call('exists', key) == 1 then
    redis.call('incrby', key, amount)
  end
end
local kbase, bbase = nslots + nwin, 3 + 2 * nwin
for k = 1, (#KEYS - kbase) / 3 do
  local used = tonumber(ARGV[bbase + 3])
  if redis.call('zrem', KEYS[kbase + 3 * k - 1], ARGV[bbase + 1]) == 1 then
    redis.call('decrby', KEYS[kbase + 3 * k], ARGV[bbase + 2])
  end
  if used > 0 then redis.call('incrby', KEYS[kbase + 3 * k - 2], used) end
end
return 0
"""


@dataclass
class Answer:
    """The admission script's answer: verdict (ADMITTED, ...), the index it is about (0-based), each window's
    count after this request and end, each budget's used + reserved before it, and the time it was read."""

    verdict: int
    index: int
    counts: list[int]
    ends: list[float]
    budget_used: list[int]
    now: float


class RedisLimits:
    def __init__(self, redis: Redis, lease_s: float) -> None:
        self._admit = redis.register_script(_ADMIT)
        self._release = redis.register_script(_RELEASE)
        self._lease_s = lease_s

    async def admit(self, request_id: str, plan: Plan, reserved: int, budget: BudgetHold | None) -> Answer:
        """Check and charge every window, slot and budget of one request: see `_ADMIT`."""
        keys = [key for _, key, _ in plan.slots] + [KEY_PREFIX + w.key for w in plan.windows]
        now = time.time()
        lease_end, member = (now + budget.tracker.lease_s, budget.member) if budget is not None else (0, "")
        args: list[float | int | str] = [now, self._lease_s, request_id, len(plan.slots), len(plan.windows)]
        args += [lease_end, member]
        args += [limit for _, _, limit in plan.slots]
        for w in plan.windows:
            args += [w.item.get_expiry(), w.item.amount, w.cost(reserved)]
        if budget is not None:
            keys += budget.redis_keys
            for line in budget.lines:
                args += [line.budget, budget.reserved]
        out = await self._admit(keys=keys, args=args)
        now = time.time()
        if int(out[0]) == BUDGET_UNSEEDED:  # answered before reading anything else
            return Answer(BUDGET_UNSEEDED, int(out[1]) - 1, [], [], [], now)
        nwin = 2 * len(plan.windows)
        ttls = out[3 : 2 + nwin : 2]
        ends = [
            now + (ttl / 1000 if ttl > 0 else w.item.get_expiry()) for w, ttl in zip(plan.windows, ttls, strict=True)
        ]
        counts = [int(c) for c in out[2 : 2 + nwin : 2]]
        return Answer(int(out[0]), int(out[1]) - 1, counts, ends, [int(u) for u in out[2 + nwin :]], now)

    async def release(
        self,
        request_id: str,
        slots: list[str],
        amounts: list[tuple[str, int, int]],
        budget: BudgetHold | None,
        used: int,
    ) -> None:
        """Leave `slots`; add each (window key, expiry, amount) to its window (negative: a refund); replace the
        budget reservation, if any, by the `used` tokens."""
        amounts = [a for a in amounts if a[2] != 0]
        if not slots and not amounts and budget is None:
            return
        keys = slots + [KEY_PREFIX + key for key, _, _ in amounts]
        args: list[int | str] = [request_id, len(slots), len(amounts)]
        for _, expiry, amount in amounts:
            args += [expiry, amount]
        if budget is not None:
            keys += budget.redis_keys
            args += [budget.member, budget.reserved, used]
        await self._release(keys=keys, args=args)
