"""The Redis half of the limiter, shared by every gateway replica: one script per admission, one per release.

An admission must be all-or-none over several counters at once (the tenant's and the key's request and token
windows, their concurrency slots): the `limits` library charges one counter per call, so it would take a round
trip per counter and a refund when a later one refuses (a refused request briefly consumed quota, and a
gateway replica paid ~0.5 ms of CPU per request in client calls). One script checks every window and slot,
then charges them all or none, in one round trip. The windows are the `limits` library's fixed windows, under
the keys and with the expiry rule it uses (`RateLimitItem.key_for`, set the expiry when the counter is created),
so the semantics are the library's.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from redis.asyncio import Redis

if TYPE_CHECKING:
    from bastion.tenancy.limiter_plan import Plan

KEY_PREFIX = "bastion:rl:"

# KEYS: slot keys (sorted sets of in-flight request ids), then window keys (counters).
# ARGV: now, lease, member, number of slots, each slot's limit, then per window: expiry, limit, cost.
# Returns {verdict, count after this request's charge and TTL in ms per window}; verdict 0: admitted and
# charged; j > 0: window j is over (nothing charged); -i: slot i is full (nothing charged).
_ADMIT = """
local now, lease, member, nslots = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local nwin = #KEYS - nslots
local out = {0}
local over = 0
for j = 1, nwin do
  local key, base = KEYS[nslots + j], 4 + nslots + 3 * (j - 1)
  local count = tonumber(redis.call('get', key) or '0') + tonumber(ARGV[base + 3])
  if over == 0 and count > tonumber(ARGV[base + 2]) then over = j end
  out[#out + 1] = count
  out[#out + 1] = redis.call('pttl', key)
end
for i = 1, nslots do
  redis.call('zremrangebyscore', KEYS[i], '-inf', now - lease)
  if redis.call('zcard', KEYS[i]) >= tonumber(ARGV[4 + i]) then out[1] = -i return out end
end
if over > 0 then out[1] = over return out end
for j = 1, nwin do
  local key, base = KEYS[nslots + j], 4 + nslots + 3 * (j - 1)
  local cost = tonumber(ARGV[base + 3])
  if redis.call('incrby', key, cost) == cost then redis.call('expire', key, ARGV[base + 1]) end
end
for i = 1, nslots do
  redis.call('zadd', KEYS[i], now, member)
  redis.call('expire', KEYS[i], math.ceil(lease) + 60)
end
return out
"""

# KEYS: slot keys to leave, then window keys. ARGV: member, number of slots, then per window: expiry, amount
# (completion tokens to add, or a negative refund; a refund to a window that has ended has nothing to undo).
_RELEASE = """
local member, nslots = ARGV[1], tonumber(ARGV[2])
for i = 1, nslots do redis.call('zrem', KEYS[i], member) end
for j = 1, #KEYS - nslots do
  local key, amount = KEYS[nslots + j], tonumber(ARGV[2 + 2 * j])
  if amount > 0 then
    if redis.call('incrby', key, amount) == amount then redis.call('expire', key, ARGV[1 + 2 * j]) end
  elseif amount < 0 and redis.call('exists', key) == 1 then
    redis.call('incrby', key, amount)
  end
end
return 0
"""


class RedisLimits:
    def __init__(self, redis: Redis, lease_s: float) -> None:
        self._admit = redis.register_script(_ADMIT)
        self._release = redis.register_script(_RELEASE)
        self._lease_s = lease_s

    async def admit(self, request_id: str, plan: Plan, reserved: int) -> tuple[int, list[int], list[float], float]:
        """(verdict, each window's count after this request, each window's end, now): see `_ADMIT`."""
        keys = [key for _, key, _ in plan.slots] + [KEY_PREFIX + w.key for w in plan.windows]
        args: list[float | int | str] = [time.time(), self._lease_s, request_id, len(plan.slots)]
        args += [limit for _, _, limit in plan.slots]
        for w in plan.windows:
            args += [w.item.get_expiry(), w.item.amount, w.cost(reserved)]
        out = await self._admit(keys=keys, args=args)
        now = time.time()
        counts = [int(c) for c in out[1::2]]
        ends = [
            now + (ttl / 1000 if ttl > 0 else w.item.get_expiry())
            for w, ttl in zip(plan.windows, out[2::2], strict=True)
        ]
        return int(out[0]), counts, ends, now

    async def release(self, request_id: str, slots: list[str], amounts: list[tuple[str, int, int]]) -> None:
        """Leave `slots`; add each (window key, expiry, amount) to its window (negative: a refund)."""
        amounts = [a for a in amounts if a[2] != 0]
        if not slots and not amounts:
            return
        keys = slots + [KEY_PREFIX + key for key, _, _ in amounts]
        args: list[int | str] = [request_id, len(slots)]
        for _, expiry, amount in amounts:
            args += [expiry, amount]
        await self._release(keys=keys, args=args)
