"""The in-process half of the limiter: fixed one-minute windows and concurrency counters for this gateway
replica (no Redis configured, or Redis down under the `fallback` policy).

Everything here is synchronous on purpose: with no await between checking every window and slot and charging
them, an admission is all-or-none without refunds, and it costs a few dictionary operations (the request path
runs it for every request).
"""

from __future__ import annotations


class LocalWindows:
    """Fixed windows: key → [end, count]. A window opens at its first charge and lasts `expiry` seconds, as the
    `limits` library's fixed windows do in Redis, so both backends count the same way."""

    def __init__(self) -> None:
        self._windows: dict[str, list[float]] = {}
        self._sweep_at = 0.0

    def peek(self, key: str, now: float) -> tuple[int, float | None]:
        """The window's count and end, or (0, None) when it has not opened or has ended."""
        window = self._windows.get(key)
        if window is None or window[0] <= now:
            return 0, None
        return int(window[1]), window[0]

    def add(self, key: str, amount: int, expiry: float, now: float) -> None:
        """Charge (or refund, amount < 0) a window; a refund to an ended window has nothing left to refund."""
        window = self._windows.get(key)
        if window is None or window[0] <= now:
            if amount > 0:
                self._windows[key] = [now + expiry, amount]
        else:
            window[1] = max(window[1] + amount, 0)
        if now >= self._sweep_at:  # ended windows would otherwise pile up, one per tenant and key and minute
            self._windows = {k: w for k, w in self._windows.items() if w[0] > now}
            self._sweep_at = now + 60.0


class LocalSlots:
    """Concurrency counters: key → requests in flight on this replica."""

    def __init__(self) -> None:
        self._held: dict[str, int] = {}

    def full(self, key: str, limit: int) -> bool:
        return self._held.get(key, 0) >= limit

    def take(self, key: str) -> None:
        self._held[key] = self._held.get(key, 0) + 1

    def release(self, key: str) -> None:
        left = self._held.get(key, 1) - 1
        if left > 0:
            self._held[key] = left
        else:
            self._held.pop(key, None)
