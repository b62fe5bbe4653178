"""A cached, expiring token with one fetch in flight, background refresh and back-off.

Rules (IAM tokens live 24 h; IAM locks an account after repeated wrong passwords):
- one fetch serves every concurrent caller (single flight);
- from ``expires_at - refresh_margin`` on, callers keep getting the old token while a
  background fetch runs, up to a safety point strictly later (``safety_point``), so even a short
  margin leaves a window where a slow or failing IAM costs no request anything;
- expiry is judged by the wall clock at each use, so a laptop that slept past expiry does not
  keep using a dead token;
- the refresh is also timed: at ``expires_at - refresh_margin`` a background fetch starts with
  no request asking (an idle sidecar whose token lapsed would fail ``/readyz``, and an unready
  pod gets no traffic that could wake it); after a transient failure the fetch is retried
  unasked when its back-off ends (``REFRESH_INTERVAL`` at the soonest), a rejected identity
  only when a request asks;
- a fetch that returns a token already inside the margin (a source that rotates its temporary
  keys later than we refresh: the metadata service hands out the same keys until then) does not
  make every request start another fetch: background refreshes wait ``REFRESH_INTERVAL``;
- a failed fetch sets a back-off window during which no fetch is attempted and callers without
  a usable token fail fast; a rejected identity (HTTP 401/403 from IAM) backs off for minutes,
  never retried in a tight loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from gateway.errors import CredentialUnavailable

log = logging.getLogger("gateway.credentials")

# Back-off after a transient failure (IAM down, 5xx, timeout) and after a rejection (401/403).
TRANSIENT_BACKOFF = (1.0, 300.0)
REJECTED_BACKOFF = (60.0, 3600.0)
# A token is not handed out in its last seconds: a request could outlive it. With a margin
# shorter than twice this, the last half of the margin is kept instead, so the background
# refresh (at ``expires_at - refresh_margin``) always starts strictly before the old token stops.
EXPIRY_SAFETY = 30.0
# Between background refreshes when a fetch returned a token already due for refresh.
REFRESH_INTERVAL = 30.0


def safety_point(expires_at: float, margin: float) -> float:
    """When a token stops being handed out: after ``expires_at - margin`` when margin > 0."""
    return expires_at - min(EXPIRY_SAFETY, margin / 2)


@dataclass(frozen=True)
class Token:
    value: str = field(repr=False)  # a repr or traceback must not show the token
    expires_at: float  # wall clock (epoch seconds)
    project: str = ""  # what it is scoped to, for diagnostics
    project_id: str = ""
    origin: str = ""  # where it came from ("IAM", "cache_file", ...), for diagnostics


class FetchFailed(Exception):
    """A fetch failed: ``reason`` is safe to show; ``rejected``: IAM refused the identity."""

    def __init__(self, reason: str, *, rejected: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.rejected = rejected


RefreshListener = Callable[[str, str, float | None], None]  # (credential, result, expires_at)
T = TypeVar("T", bound=Token)


class TokenCache(Generic[T]):
    """One expiring credential (an IAM token, temporary AK/SK: any ``Token``), kept fresh."""

    def __init__(
        self,
        name: str,
        fetch: Callable[[], Awaitable[T]],
        *,
        refresh_margin: float,
        on_refresh: RefreshListener | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self._fetch = fetch
        self._margin = refresh_margin
        self._on_refresh = on_refresh
        self._now = wall_clock
        self._token: T | None = None
        self._flight: asyncio.Task[T] | None = None
        self._failures = 0
        self._retry_at = 0.0  # monotonic
        self._last_error = ""
        self._refresh_after = 0.0  # monotonic: no background refresh before
        self._timer: asyncio.TimerHandle | None = None  # the next timed refresh
        self._closed = False

    def now(self) -> float:
        """The wall clock expiry is judged by (tests shift it instead of waiting)."""
        return self._now()

    @property
    def token(self) -> T | None:
        return self._token

    def usable(self) -> T | None:
        token = self._token
        if token is None:
            return None
        if self._now() >= safety_point(token.expires_at, self._margin):
            return None
        return token

    async def get(self) -> T:
        """A token usable now, fetching one (or joining the fetch under way) when needed."""
        token = self.usable()
        if token is not None:
            if self.due(token) and time.monotonic() >= self._refresh_after:
                self._start_fetch()  # refresh in the background; the old token still serves
            return token
        flight = self._start_fetch()
        if flight is None:
            wait = max(0.0, self._retry_at - time.monotonic())
            raise CredentialUnavailable(
                f"credential {self.name!r} has no token: {self._last_error}; "
                f"next attempt in {wait:.0f} s"
            )
        try:
            # shield: one caller going away must not cancel the fetch the others wait on
            return await asyncio.shield(flight)
        except FetchFailed as exc:
            raise CredentialUnavailable(
                f"credential {self.name!r} has no token: {exc.reason}"
            ) from None

    def due(self, token: Token) -> bool:
        """True from ``token``'s refresh point on (``expires_at - refresh_margin``)."""
        return self._now() >= token.expires_at - self._margin

    def seed(self, token: T) -> bool:
        """Adopt a token obtained elsewhere (an on-disk cache) if none is cached; True if used."""
        if self._token is not None or self._now() >= safety_point(token.expires_at, self._margin):
            return False
        self._token = token
        self._schedule(token.expires_at - self._margin - self._now())
        return True

    def prefetch(self) -> None:
        """Start a fetch now if none is under way and no back-off is in force."""
        self._start_fetch()

    def invalidate(self, value: str) -> None:
        """Forget ``value`` if it is still the cached token (concurrent 401s drop it once)."""
        if self._token is not None and self._token.value == value:
            self._token = None

    def ready(self) -> str | None:
        if self.usable() is not None:
            return None
        if self._last_error:
            return f"credential {self.name!r}: {self._last_error}"
        return f"credential {self.name!r}: no token yet"

    def _start_fetch(self) -> asyncio.Task[T] | None:
        if self._flight is not None:
            return self._flight
        if time.monotonic() < self._retry_at:
            return None
        self._flight = asyncio.get_running_loop().create_task(self._run_fetch())
        self._flight.add_done_callback(self._fetch_done)
        return self._flight

    async def _run_fetch(self) -> T:
        try:
            token = await self._fetch()
        except FetchFailed as exc:
            self._failed(exc.reason, exc.rejected)
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in a fetcher must not leave the cache stuck
            log.exception("credential %r: unexpected error fetching a token", self.name)
            self._failed(f"unexpected {type(exc).__name__}", False)
            raise FetchFailed(f"unexpected {type(exc).__name__}") from None
        self._token = token
        self._failures = 0
        self._retry_at = 0.0
        self._last_error = ""
        left = token.expires_at - self._now()
        log.info("credential %r: new token, expires in %.0f s", self.name, left)
        if left <= self._margin:
            self._refresh_after = time.monotonic() + REFRESH_INTERVAL
            self._schedule(REFRESH_INTERVAL)
            log.warning(
                "credential %r: the new token is already within refresh_margin (%.0f s) of its "
                "expiry; next refresh in %.0f s",
                self.name,
                self._margin,
                REFRESH_INTERVAL,
            )
        else:
            self._refresh_after = 0.0
            self._schedule(left - self._margin)
        if self._on_refresh:
            self._on_refresh(self.name, "ok", token.expires_at)
        return token

    def _failed(self, reason: str, rejected: bool) -> None:
        self._failures += 1
        base, cap = REJECTED_BACKOFF if rejected else TRANSIENT_BACKOFF
        delay = min(cap, base * 2 ** (self._failures - 1))
        self._retry_at = time.monotonic() + delay
        self._last_error = reason
        # retried unasked, not sooner than REFRESH_INTERVAL (requests may ask sooner); a
        # rejected identity only when asked (IAM lock-outs): its timer, if any, is cancelled
        self._schedule(math.inf if rejected else max(delay, REFRESH_INTERVAL))
        log.warning(
            "credential %r: token fetch failed (%s); next attempt in %.0f s",
            self.name,
            reason,
            delay,
        )
        if self._on_refresh:
            self._on_refresh(self.name, "rejected" if rejected else "error", None)

    def _schedule(self, delay: float) -> None:
        """Start a background fetch in ``delay`` seconds (none for a token that never expires)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._closed or not math.isfinite(delay):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # seeded outside a loop (a script): requests still refresh it
            return
        self._timer = loop.call_later(max(0.0, delay), self._timed)

    def _timed(self) -> None:
        self._timer = None
        if not self._closed:
            self._start_fetch()

    def _fetch_done(self, task: asyncio.Task[T]) -> None:
        self._flight = None
        if not task.cancelled():
            task.exception()  # retrieved here so a background failure is not reported as lost

    async def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._flight is not None:
            self._flight.cancel()
            await asyncio.gather(self._flight, return_exceptions=True)
