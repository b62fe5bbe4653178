"""Per-key counting for ``requests_per_minute``, ``tokens_per_minute`` and ``tokens_per_day``.

A store answers two questions, each in one step (one Redis round trip): may this key start a
request now (``admit``: ``None``, or the :class:`Refusal` with its Retry-After), and how many
tokens did a finished request of this key use (``record``). The windows, the same in every
store:

- requests per minute: exact, a log of admission times; refused while the key already has
  that many admissions in the last 60 s, until the oldest of them is 60 s old;
- tokens per minute: counted in one-second buckets; a request is admitted while the buckets
  of the last 60 s sum to less than the limit (a request's tokens are known only at its end);
- tokens per day: one counter per UTC calendar day, admitted while it is below the limit.

``max_concurrency`` is not here: it is a count of requests in flight in this process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from gateway.config.model import KeyLimits

WINDOW = 60  # seconds, for both per-minute limits
DAY = 86400


class StoreError(Exception):
    """The store could not answer (Redis unreachable, timed out, ...): ``on_error`` decides."""


@dataclass(frozen=True)
class Refusal:
    """Which limit refused, and the whole seconds until the window admits the key again."""

    limit: str  # requests_per_minute | tokens_per_minute | tokens_per_day | max_concurrency
    retry_after: int


class Store(Protocol):
    """Counts per key name; ``StoreError`` when it cannot answer."""

    async def admit(self, key: str, limits: KeyLimits) -> Refusal | None:
        """Check every counted limit of ``key`` and, when all admit, count the request."""
        ...

    async def record(self, key: str, limits: KeyLimits, tokens: int) -> None:
        """Add a finished request's tokens to the key's minute and day."""
        ...

    async def close(self) -> None: ...


def whole_seconds(seconds: float) -> int:
    """A Retry-After value: at least 1, rounded up (waiting less would be refused again)."""
    return max(1, math.ceil(seconds - 1e-9))
