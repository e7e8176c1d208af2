"""Rate limits: how often one user may start turns or one account and one address may
fail to sign in (accounts mode).

Turn limits are counted in the database, so they hold across replicas. Sign-in failures
are counted in memory, per process: a replica behind a load balancer limits its share.
"""

from __future__ import annotations

import time
from collections import deque


class SlidingWindow:
    """At most ``limit`` events per key in any ``seconds``."""

    def __init__(self, limit: int, seconds: float) -> None:
        self.limit = limit
        self.seconds = seconds
        self._events: dict[str, deque[float]] = {}

    def retry_after(self, key: str) -> float | None:
        """Seconds until ``key`` may try again, or None if it may now."""
        now = time.monotonic()
        events = self._events.get(key)
        if events is None:
            return None
        while events and events[0] <= now - self.seconds:
            events.popleft()
        if not events:
            del self._events[key]
            return None
        return events[0] + self.seconds - now if len(events) >= self.limit else None

    def record(self, key: str) -> None:
        self._events.setdefault(key, deque()).append(time.monotonic())
        if len(self._events) > 100_000:  # a flood of distinct keys: forget the oldest
            self._events.pop(next(iter(self._events)))
