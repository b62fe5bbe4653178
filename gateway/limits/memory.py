"""The default store: counts in this process (one replica; nothing to run beside it).

The windows are those of :mod:`gateway.limits`, on the wall clock (the day is a UTC day).
Memory is bounded: per key, at most ``requests_per_minute`` admission times and 60 buckets.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

from gateway.config.model import KeyLimits
from gateway.limits import DAY, WINDOW, Refusal, whole_seconds


class _Counts:
    __slots__ = ("admitted", "buckets", "day", "day_tokens")

    def __init__(self) -> None:
        self.admitted: deque[float] = deque()  # admission times within the window, oldest first
        self.buckets: dict[int, int] = {}  # whole second -> tokens recorded in it
        self.day = 0
        self.day_tokens = 0


class MemoryStore:
    """Exact per-key counts in a dict; every call completes without awaiting anything."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._keys: dict[str, _Counts] = {}

    def _counts(self, key: str) -> _Counts:
        counts = self._keys.get(key)
        if counts is None:
            counts = self._keys[key] = _Counts()
        return counts

    async def admit(self, key: str, limits: KeyLimits) -> Refusal | None:
        return self.admit_now(key, limits, self._clock())

    def admit_now(self, key: str, limits: KeyLimits, now: float) -> Refusal | None:
        c = self._counts(key)
        second = math.floor(now)
        if limits.tokens_per_day:
            day = second // DAY
            used = c.day_tokens if c.day == day else 0
            if used >= limits.tokens_per_day:
                return Refusal("tokens_per_day", whole_seconds((day + 1) * DAY - now))
        if limits.tokens_per_minute:
            for old in [s for s in c.buckets if s <= second - WINDOW]:
                del c.buckets[old]
            total = sum(c.buckets.values())
            if total >= limits.tokens_per_minute:
                for s in sorted(c.buckets):  # the window admits once enough buckets age out
                    total -= c.buckets[s]
                    if total < limits.tokens_per_minute:
                        return Refusal("tokens_per_minute", whole_seconds(s + WINDOW - now))
        if limits.requests_per_minute:
            admitted = c.admitted
            while admitted and admitted[0] <= now - WINDOW:
                admitted.popleft()
            over = len(admitted) - limits.requests_per_minute
            if over >= 0:
                # admitted again when all but limit - 1 have left the window: the oldest, unless
                # a reload lowered the limit below the count (then the over-th oldest)
                return Refusal("requests_per_minute", whole_seconds(admitted[over] + WINDOW - now))
            admitted.append(now)
        return None

    async def record(self, key: str, limits: KeyLimits, tokens: int) -> None:
        self.record_now(key, limits, tokens, self._clock())

    def record_now(self, key: str, limits: KeyLimits, tokens: int, now: float) -> None:
        if tokens <= 0:
            return
        c = self._counts(key)
        second = math.floor(now)
        if limits.tokens_per_minute:
            c.buckets[second] = c.buckets.get(second, 0) + tokens
        if limits.tokens_per_day:
            day = second // DAY
            if c.day != day:
                c.day, c.day_tokens = day, 0
            c.day_tokens += tokens

    async def close(self) -> None:
        self._keys.clear()
