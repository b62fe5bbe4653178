"""One limit across replicas: the counts in Redis, each check one atomic Lua script.

``admit`` and ``record`` are one ``EVALSHA`` each (one round trip; ``EVAL`` once more only
after a Redis restart has dropped the script cache). The scripts take the time from Redis
(``TIME``), so replicas with skewed clocks still share one window and one UTC day. Per key
three Redis keys, with a hash tag so a proxy or cluster keeps them on one node:

    {prefix}{name}:rpm   sorted set, admission times in the last 60 s (member: a unique id)
    {prefix}{name}:tpm   hash, whole second -> tokens recorded in it (last 60 s)
    {prefix}{name}:tpd   hash, UTC day number -> tokens recorded on it (today only)

All three expire when the key is idle, so Redis holds nothing for keys no longer used.
Any failure (refused, reset, timed out) becomes a :class:`StoreError`; the caller applies
``on_error``. Short socket timeouts keep a dead Redis from stalling requests.
"""

from __future__ import annotations

import itertools
import secrets

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.config.model import KeyLimits, LimitsStore
from gateway.limits import Refusal, StoreError, whole_seconds

# KEYS: rpm, tpm, tpd. ARGV: requests_per_minute, tokens_per_minute, tokens_per_day (0 = none),
# a unique member id. Returns {0, 0} (admitted and counted) or {limit, milliseconds to wait}.
ADMIT = """
local t = redis.call('TIME')
local second = tonumber(t[1])
local now = second + tonumber(t[2]) / 1000000
local rpm, tpm, tpd = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local function wait(seconds) return math.ceil(seconds * 1000) end
if tpd > 0 then
  local day = math.floor(second / 86400)
  local used = tonumber(redis.call('HGET', KEYS[3], tostring(day)) or '0')
  if used >= tpd then return {3, wait((day + 1) * 86400 - now)} end
end
if tpm > 0 then
  local flat = redis.call('HGETALL', KEYS[2])
  local buckets, total = {}, 0
  for i = 1, #flat, 2 do
    local s = tonumber(flat[i])
    if s <= second - 60 then
      redis.call('HDEL', KEYS[2], flat[i])
    else
      local n = tonumber(flat[i + 1])
      total = total + n
      buckets[#buckets + 1] = {s, n}
    end
  end
  if total >= tpm then
    table.sort(buckets, function(a, b) return a[1] < b[1] end)
    for _, b in ipairs(buckets) do
      total = total - b[2]
      if total < tpm then return {2, wait(b[1] + 60 - now)} end
    end
  end
end
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 60)
  local over = redis.call('ZCARD', KEYS[1]) - rpm
  if over >= 0 then
    -- the over-th oldest: the oldest, unless the limit was lowered below the count
    local oldest = redis.call('ZRANGE', KEYS[1], over, over, 'WITHSCORES')
    return {1, wait(tonumber(oldest[2]) + 60 - now)}
  end
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], 61000)
end
return {0, 0}
"""

# KEYS: tpm, tpd. ARGV: tokens, count per minute (1/0), count per day (1/0).
RECORD = """
local t = redis.call('TIME')
local second = tonumber(t[1])
local n = tonumber(ARGV[1])
if ARGV[2] == '1' then
  redis.call('HINCRBY', KEYS[1], tostring(second), n)
  redis.call('EXPIRE', KEYS[1], 61)
end
if ARGV[3] == '1' then
  local today = tostring(math.floor(second / 86400))
  redis.call('HINCRBY', KEYS[2], today, n)
  if redis.call('HLEN', KEYS[2]) > 1 then
    for _, day in ipairs(redis.call('HKEYS', KEYS[2])) do
      if day ~= today then redis.call('HDEL', KEYS[2], day) end
    end
  end
  redis.call('EXPIRE', KEYS[2], 2 * 86400)
end
return 0
"""

LIMIT_OF = {1: "requests_per_minute", 2: "tokens_per_minute", 3: "tokens_per_day"}


class RedisStore:
    """Counts shared by every gateway that uses the same Redis and ``key_prefix``."""

    def __init__(self, config: LimitsStore) -> None:
        assert config.url is not None  # the loader requires it for type: redis
        self._prefix = config.key_prefix
        self._redis = aioredis.Redis.from_url(
            config.url.reveal(),
            socket_timeout=config.timeout,
            socket_connect_timeout=config.timeout,
            # one more try on a fresh connection: a pooled one may be dead after a restart
            retry=Retry(NoBackoff(), 1),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
            health_check_interval=0,
        )
        self._admit = self._redis.register_script(ADMIT)
        self._record = self._redis.register_script(RECORD)
        self._ids = f"{secrets.token_hex(6)}:"
        self._next = itertools.count(1).__next__
        self._names: dict[str, tuple[str, str, str]] = {}

    def _keys(self, key: str) -> tuple[str, str, str]:
        names = self._names.get(key)
        if names is None:
            base = f"{self._prefix}{{{key}}}:"
            names = self._names[key] = (base + "rpm", base + "tpm", base + "tpd")
        return names

    async def admit(self, key: str, limits: KeyLimits) -> Refusal | None:
        args = (
            limits.requests_per_minute or 0,
            limits.tokens_per_minute or 0,
            limits.tokens_per_day or 0,
            f"{self._ids}{self._next()}",
        )
        try:
            which, wait_ms = await self._admit(keys=self._keys(key), args=args)
        except (RedisError, OSError) as exc:
            raise StoreError(type(exc).__name__) from None
        if not which:
            return None
        return Refusal(LIMIT_OF[int(which)], whole_seconds(int(wait_ms) / 1000))

    async def record(self, key: str, limits: KeyLimits, tokens: int) -> None:
        if tokens <= 0:
            return
        _, tpm, tpd = self._keys(key)
        args = (tokens, int(bool(limits.tokens_per_minute)), int(bool(limits.tokens_per_day)))
        try:
            await self._record(keys=(tpm, tpd), args=args)
        except (RedisError, OSError) as exc:
            raise StoreError(type(exc).__name__) from None

    async def close(self) -> None:
        await self._redis.aclose()
