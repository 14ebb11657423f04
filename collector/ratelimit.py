"""Per-token ingest rate: a token bucket of data points, answered retryable when empty.

A request is admitted when its sender's bucket holds its points (or, for a request larger than the
burst, when the bucket is full); the points are then taken. Refused requests are answered 429 +
``Retry-After`` / RESOURCE_EXHAUSTED + ``RetryInfo``, so the SDK sends them again and nothing is lost.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable


class RateLimiter:
    """Token buckets keyed by sender, ``rate`` points per second up to ``burst`` points."""

    def __init__(self, rate: float, burst: float = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = float(rate)
        self.burst = float(burst or rate)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key → (level, at)
        self._lock = threading.Lock()

    def take(self, key: str, points: int) -> int:
        """0 when admitted (the points are taken), else the whole seconds to wait before retrying."""
        with self._lock:
            now = self._clock()
            level, at = self._buckets.get(key, (self.burst, now))
            level = min(self.burst, level + (now - at) * self.rate)
            need = min(float(points), self.burst)
            if level >= need:
                self._buckets[key] = (level - points, now)
                return 0
            self._buckets[key] = (level, now)
            return max(1, math.ceil((need - level) / self.rate))

    def refund(self, key: str, points: int) -> None:
        """Give back the points of an admitted request that was not kept (the client sends it again)."""
        with self._lock:
            if key in self._buckets:
                level, at = self._buckets[key]
                self._buckets[key] = (min(self.burst, level + points), at)

    def forget(self, keep: set[str]) -> None:
        """Drop the buckets of senders no longer configured (after a token reload)."""
        with self._lock:
            for key in [k for k in self._buckets if k not in keep]:
                del self._buckets[key]
