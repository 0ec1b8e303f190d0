"""Token buckets: the budgets that keep control traffic from amplifying load.

A budget allows ``rate`` events per second on average and ``burst`` at once
(default: one second's worth).  ``rate <= 0`` means unlimited.  The services
count every event a budget refuses (deferred or shed) in their metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    __slots__ = ("rate", "burst", "tokens", "stamp", "clock")

    def __init__(self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else max(1.0, self.rate)
        self.tokens = self.burst
        self.clock = clock
        self.stamp = clock()

    @property
    def unlimited(self) -> bool:
        return self.rate <= 0

    def take(self, n: float = 1.0) -> bool:
        """Spend ``n`` tokens if there are; False (nothing spent) if not."""
        if self.rate <= 0:
            return True
        now = self.clock()
        tokens = self.tokens + (now - self.stamp) * self.rate
        self.tokens = tokens if tokens < self.burst else self.burst
        self.stamp = now
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False


__all__ = ["TokenBucket"]
