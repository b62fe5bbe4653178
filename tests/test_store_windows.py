"""The limits stores' windows and Retry-After, exactly, in each store (issue 11, items 2 and 3).

The memory store is driven on its own clock. The Redis store takes its time from Redis
(``TIME``), which a test cannot move: its counts are seeded straight into a real
``redis-server`` at times relative to Redis's own clock (admissions 59 s and 61 s old,
buckets about to leave the window), so each edge of a window is tried without waiting.
A reload may lower a limit below a key's count: Retry-After is then when enough admissions
have left the window, not when the oldest does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis_server import RedisServer

from gateway.config.model import KeyLimits, LimitsStore, Secret
from gateway.limits import Refusal
from gateway.limits.memory import MemoryStore
from gateway.limits.redis_store import RedisStore

PREFIX = "t:"


@pytest.fixture
async def redis() -> AsyncIterator[tuple[RedisStore, aioredis.Redis]]:
    """The store under test and a plain client of the same redis-server, to seed and read."""
    server = await RedisServer().start()
    store = RedisStore(LimitsStore(type="redis", url=Secret(server.url), key_prefix=PREFIX))
    plain = aioredis.Redis.from_url(server.url)
    try:
        yield store, plain
    finally:
        await store.close()
        await plain.aclose()
        await server.stop()


async def redis_now(plain: aioredis.Redis) -> float:
    seconds, micros = await plain.time()
    return float(seconds) + micros / 1e6


def test_memory_retry_after_when_a_lowered_limit_is_under_the_count() -> None:
    store = MemoryStore()
    t0 = 1_700_000_000.0
    for i in range(5):
        assert store.admit_now("k", KeyLimits(requests_per_minute=5), t0 + 10 * i) is None
    lowered = KeyLimits(requests_per_minute=2)  # a reload; admissions at t0, +10 ... +40
    # two may be in the window: the one of t0 + 30 must leave it (the oldest is not enough)
    assert store.admit_now("k", lowered, t0 + 45) == Refusal("requests_per_minute", 45)
    assert store.admit_now("k", lowered, t0 + 89.5) == Refusal("requests_per_minute", 1)
    assert store.admit_now("k", lowered, t0 + 90) is None


async def test_redis_requests_window_slides_at_exactly_60_seconds(
    redis: tuple[RedisStore, aioredis.Redis],
) -> None:
    store, plain = redis
    limits = KeyLimits(requests_per_minute=2)
    now = await redis_now(plain)
    key = PREFIX + "{k}:rpm"
    await plain.zadd(key, {"gone": now - 61, "old": now - 59})
    # "gone" has left the window, "old" has not: one more fits
    assert await store.admit("k", limits) is None
    refusal = await store.admit("k", limits)
    assert refusal == Refusal("requests_per_minute", 1), "old turns 60 s old within a second"
    assert await plain.zcard(key) == 2, "the refused request is not counted"


async def test_redis_retry_after_is_when_the_window_admits_again_also_under_a_lowered_limit(
    redis: tuple[RedisStore, aioredis.Redis],
) -> None:
    store, plain = redis
    now = await redis_now(plain)
    await plain.zadd(PREFIX + "{k}:rpm", {"a": now - 50, "b": now - 40, "c": now - 10.5})
    # at the limit: the oldest (10 s to go) decides
    assert await store.admit("k", KeyLimits(requests_per_minute=3)) == Refusal(
        "requests_per_minute", 10
    )
    # a reload lowered the limit to 1: "c" too must leave, 49.5 s from now
    assert await store.admit("k", KeyLimits(requests_per_minute=1)) == Refusal(
        "requests_per_minute", 50
    )


async def test_redis_tokens_window_drops_buckets_60_seconds_old(
    redis: tuple[RedisStore, aioredis.Redis],
) -> None:
    store, plain = redis
    limits = KeyLimits(tokens_per_minute=100)
    second = int(await redis_now(plain))
    key = PREFIX + "{k}:tpm"
    await plain.hset(key, mapping={str(second - 60): 500, str(second - 30): 60})
    assert await store.admit("k", limits) is None, "500 left the window; 60 < 100"
    await store.record("k", limits, 40)  # 100 in the window: refused until the 60 leave it
    refusal = await store.admit("k", limits)
    assert refusal is not None and refusal.limit == "tokens_per_minute"
    assert refusal.retry_after in (29, 30, 31), refusal  # bucket second - 30 leaves at +30
    ttl = await plain.pttl(key)
    assert ttl > 59_000, "the minute's tokens outlive the window, not vanish before it ends"


async def test_redis_tokens_per_day_counts_today_only(
    redis: tuple[RedisStore, aioredis.Redis],
) -> None:
    store, plain = redis
    limits = KeyLimits(tokens_per_day=10)
    day = int(await redis_now(plain)) // 86400
    key = PREFIX + "{k}:tpd"
    await plain.hset(key, mapping={str(day - 1): 1000})
    assert await store.admit("k", limits) is None, "yesterday's tokens do not count"
    await store.record("k", limits, 10)
    refusal = await store.admit("k", limits)
    assert refusal is not None and refusal.limit == "tokens_per_day"
    assert await plain.hkeys(key) == [str(day).encode()], "only today is kept"
    assert await plain.ttl(key) > 86400
