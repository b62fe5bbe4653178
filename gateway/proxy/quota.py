"""Per-key limits: ``admit(key)`` before a request, ``record_tokens(key, n)`` when it ends.

The concurrency of a key is counted here, in this process; the per-minute and per-day
limits are counted by the limits store (memory, or Redis shared by replicas). A refusal is a
429 with Retry-After; a store that cannot answer follows ``limits_store.on_error``: ``allow``
admits unchecked, ``deny`` answers 503 ``limits_unavailable``. Either way it is counted in
``gateway_limits_store_errors_total`` and warned about at most once a minute. After a
failure the store is tried again by one request a second (the others follow ``on_error``
meanwhile without waiting for a timeout), so enforcement resumes by itself within about a
second of Redis coming back.
"""

from __future__ import annotations

import logging
from time import monotonic

from gateway.config.model import ApiKey, LimitsStore
from gateway.errors import LimitsUnavailable, QuotaExceeded, RateLimited
from gateway.limits import Refusal, Store, StoreError
from gateway.metrics import Metrics
from gateway.proxy.limits import ConcurrencyLimit

log = logging.getLogger("gateway.limits")

RETRY_DOWN = 1.0  # seconds between tries of a store that failed
WARN_EVERY = 60.0  # seconds between warnings about a failing store


class Ticket:
    """An admitted request of one key: holds its concurrency slot until ``release()``."""

    __slots__ = ("key", "slot")

    def __init__(self, key: ApiKey, slot: ConcurrencyLimit | None) -> None:
        self.key = key
        self.slot = slot

    def release(self) -> None:
        if self.slot is not None:
            self.slot.release()
            self.slot = None


class KeyLimiter:
    """Applies a key's limits: its concurrency slot (the caller's counter, which may outlive a
    config) and the store's counts. One per process: the store and its health outlive reloads.
    """

    def __init__(self, store: Store, config: LimitsStore, metrics: Metrics) -> None:
        self.store = store
        self.deny_on_error = config.on_error == "deny"
        self.metrics = metrics
        self._down = False
        self._probing = False
        self._retry_at = 0.0
        self._warned_at = -WARN_EVERY
        self._unwarned = 0

    async def admit(self, key: ApiKey, slot: ConcurrencyLimit | None) -> Ticket:
        """A ticket for ``key``'s request, holding ``slot`` (the key's in-flight counter, None
        without ``max_concurrency``), or raises the refusal (429, or 503 on_error deny)."""
        if slot is not None:
            if slot.active >= slot.limit:
                self._refuse(key, Refusal("max_concurrency", 1))
            slot.active += 1
        ticket = Ticket(key, slot)
        if not key.limits.counted:
            return ticket
        try:
            refusal = await self._store_admit(key)
        except BaseException:
            ticket.release()
            raise
        if refusal is not None:
            ticket.release()
            self._refuse(key, refusal)
        return ticket

    async def record_tokens(self, key: ApiKey, tokens: int) -> None:
        """Count a finished request's prompt plus completion tokens against ``key``."""
        if tokens <= 0 or not key.limits.counts_tokens or self._skip():
            return
        # a record after the retry second is the probe, as an admit would be: the requests
        # ending meanwhile (a JSON answer goes out only after this) do not all wait on it
        probing = self._down
        self._probing = probing
        try:
            await self.store.record(key.name, key.limits, tokens)
        except StoreError as exc:
            self._failed("record", exc)
        else:
            self._recovered()
        finally:
            if probing:
                self._probing = False

    async def _store_admit(self, key: ApiKey) -> Refusal | None:
        if self._skip():
            self._unchecked()
            return None
        probing = self._down
        self._probing = probing
        try:
            refusal = await self.store.admit(key.name, key.limits)
        except StoreError as exc:
            self._failed("admit", exc)
            self._unchecked()
            return None
        finally:
            if probing:
                self._probing = False
        self._recovered()
        return refusal

    def _skip(self) -> bool:
        """While the store is down, only one call a second tries it; the rest follow on_error."""
        return self._down and (self._probing or monotonic() < self._retry_at)

    def _unchecked(self) -> None:
        """on_error: deny refuses (503); allow lets the request go on unchecked."""
        if self.deny_on_error:
            raise LimitsUnavailable(
                "the limits store is unavailable; retry later", code="limits_unavailable"
            )

    def _failed(self, operation: str, exc: StoreError) -> None:
        self.metrics.child(self.metrics.limits_store_errors, operation).inc()
        self._down = True
        self._retry_at = monotonic() + RETRY_DOWN
        now = monotonic()
        if now - self._warned_at >= WARN_EVERY:
            also = f" ({self._unwarned} more since the last warning)" if self._unwarned else ""
            log.warning(
                "limits store failed (%s on %s)%s: requests are %s unchecked",
                exc,
                operation,
                also,
                "refused" if self.deny_on_error else "admitted",
            )
            self._warned_at, self._unwarned = now, 0
        else:
            self._unwarned += 1

    def _recovered(self) -> None:
        if self._down:
            self._down = False
            log.info("limits store answers again: limits are enforced")

    def _refuse(self, key: ApiKey, refusal: Refusal) -> None:
        self.metrics.child(self.metrics.rate_limited, key.name, refusal.limit).inc()
        what = refusal.limit.replace("_", " ")
        if refusal.limit == "tokens_per_day":
            raise QuotaExceeded(
                f"API key {key.name!r} used its tokens per day (limit "
                f"{key.limits.tokens_per_day}); the quota renews at 00:00 UTC",
                retry_after=refusal.retry_after,
            )
        limit = getattr(key.limits, refusal.limit)
        raise RateLimited(
            f"API key {key.name!r} is over its {what} (limit {limit}); retry later",
            retry_after=refusal.retry_after,
            type_="tokens" if refusal.limit == "tokens_per_minute" else "requests",
        )
