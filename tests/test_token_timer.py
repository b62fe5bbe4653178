"""The timed refresh (issue 12: keys "refreshed refresh_margin before their expires_at"): a
TokenCache schedules its next fetch itself, so an idle gateway's token never lapses.

The end-to-end proofs (no request, the source asked in the margin, /readyz still 200) are in
test_temporary_aksk.py and test_workload_identity.py; these pin when the timer is set and that
nothing is left scheduled once the cache is closed.
"""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from gateway.credentials import token_cache
from gateway.credentials.token_cache import FetchFailed, Token, TokenCache


def timer_delay(cache: TokenCache[Token]) -> float:
    timer = cache._timer
    assert timer is not None and not timer.cancelled()
    return timer.when() - asyncio.get_running_loop().time()


async def test_the_next_fetch_is_timed_at_expiry_minus_the_margin() -> None:
    cache = TokenCache("t", lambda: _token(time.time() + 1000), refresh_margin=300)
    await cache.get()
    assert timer_delay(cache) == pytest.approx(700, abs=1)
    await cache.close()


async def test_a_token_already_due_times_the_next_fetch_refresh_interval_later() -> None:
    cache = TokenCache("t", lambda: _token(time.time() + 100), refresh_margin=300)
    await cache.get()
    assert timer_delay(cache) == pytest.approx(token_cache.REFRESH_INTERVAL, abs=1)
    await cache.close()


async def test_a_token_that_never_expires_times_nothing() -> None:
    cache = TokenCache("t", lambda: _token(math.inf), refresh_margin=300)
    await cache.get()
    assert cache._timer is None
    await cache.close()


@pytest.mark.parametrize(("rejected", "timed"), [(False, True), (True, False)])
async def test_after_a_failure_only_a_transient_one_is_retried_unasked(
    rejected: bool, timed: bool
) -> None:
    async def fail() -> Token:
        raise FetchFailed("down", rejected=rejected)

    cache = TokenCache("t", fail, refresh_margin=300)
    cache.prefetch()
    with pytest.raises(Exception, match="down"):
        await cache.get()
    if timed:  # not sooner than REFRESH_INTERVAL, whatever the (1 s) back-off says
        assert timer_delay(cache) == pytest.approx(token_cache.REFRESH_INTERVAL, abs=1)
    else:
        assert cache._timer is None
    await cache.close()


async def test_a_rejection_cancels_the_timed_refresh_of_the_token_it_replaced() -> None:
    answers: list[Token | FetchFailed] = [
        Token("v", time.time() + 1000),
        FetchFailed("password changed", rejected=True),
    ]

    async def fetch() -> Token:
        answer = answers.pop(0)
        if isinstance(answer, FetchFailed):
            raise answer
        return answer

    cache = TokenCache("t", fetch, refresh_margin=300)
    token = await cache.get()
    assert cache._timer is not None
    cache.invalidate(token.value)  # an upstream 401
    with pytest.raises(Exception, match="password changed"):
        await cache.get()
    assert cache._timer is None  # nothing will ask IAM again unasked
    await cache.close()


async def test_closing_cancels_the_timer_and_a_late_seed_times_nothing() -> None:
    cache = TokenCache("t", lambda: _token(time.time() + 1000), refresh_margin=300)
    await cache.get()
    timer = cache._timer
    await cache.close()
    assert timer is not None and timer.cancelled() and cache._timer is None
    cache.invalidate(cache.token.value if cache.token else "")
    cache.seed(Token("late", time.time() + 1000))  # a closed cache schedules no more fetches
    assert cache._timer is None


async def _token(expires_at: float) -> Token:
    return Token("v", expires_at)


def test_a_token_seeded_outside_an_event_loop_is_adopted_without_a_timer() -> None:
    cache = TokenCache("t", lambda: _token(math.inf), refresh_margin=300)
    assert cache.seed(Token("from-a-script", time.time() + 1000))
    assert cache._timer is None and cache.token is not None
