"""A short refresh_margin still refreshes in the background (issue 9, item 4).

The refresh starts at ``expires_at - refresh_margin``; the old token keeps serving until a safety
point strictly later, so a slow IAM delays nobody and a failing one fails nobody in between.
The cache's wall clock is shifted instead of waiting out a token's life.
"""

from __future__ import annotations

import asyncio
import copy
import time
from typing import Any

import aiohttp
import pytest
from conftest import GatewayFactory, base_config
from test_temporary_aksk import config_with
from test_tokens import DAY, cache_of, chat, shift_clock, tokens_seen, watch_refreshes

from gateway.config.load import ConfigError, parse_settings
from gateway.credentials.token_cache import Token, TokenCache, safety_point
from gateway.testing import FakeCloud


def margin(seconds: float) -> Any:
    def edit(config: dict[str, Any]) -> None:
        config["credentials"]["main"]["refresh_margin"] = seconds

    return edit


async def test_a_slow_iam_inside_a_short_margin_delays_no_request(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(margin(4))
    assert (await chat(http, gw))[0] == 200
    cache = cache_of(gw)
    refreshes = watch_refreshes(cache)
    old = tokens_seen(cloud)[-1]
    shift_clock(cache, DAY - 3.5)  # 3.5 s before expiry: inside the 4 s margin
    cloud.iam.delay = 2.0
    started = time.monotonic()
    assert (await chat(http, gw))[0] == 200
    assert time.monotonic() - started < 1.0  # not the 2 s IAM takes
    assert tokens_seen(cloud)[-1] == old
    assert refreshes.empty()  # the refresh is still running, in the background
    assert await asyncio.wait_for(refreshes.get(), 5) == "ok"
    assert cloud.iam.calls == 2


async def test_a_failing_iam_inside_a_short_margin_fails_no_request_until_the_safety_point(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(margin(3))
    assert (await chat(http, gw))[0] == 200
    cache = cache_of(gw)
    refreshes = watch_refreshes(cache)
    old = tokens_seen(cloud)[-1]
    cloud.iam.failures = [500] * 10
    shift_clock(cache, DAY - 2.5)  # inside the 3 s margin, before the safety point (1.5 s)
    assert (await chat(http, gw))[0] == 200
    assert await asyncio.wait_for(refreshes.get(), 5) == "error"
    for _ in range(3):  # back-off: no new IAM call, the old token serves
        assert (await chat(http, gw))[0] == 200
    assert set(tokens_seen(cloud)[1:]) == {old}
    assert cloud.iam.calls == 2
    shift_clock(cache, DAY - 1.0)  # past the safety point: no usable token, IAM in back-off
    status, body = await chat(http, gw)
    assert status == 502
    assert body["error"]["code"] == "credential_unavailable"


@pytest.mark.parametrize("seconds", [0.2, 1, 3, 30, 59, 60, 61, 300, 3600])
async def test_the_safety_point_comes_strictly_after_the_refresh_point(seconds: float) -> None:
    now = 1_000_000.0
    expires = now + 86400
    assert expires - seconds < safety_point(expires, seconds) < expires
    fetched: list[float] = []

    async def fetch() -> Token:
        fetched.append(clock[0])
        return Token("new", expires + 86400)

    clock = [now]
    cache = TokenCache("t", fetch, refresh_margin=seconds, wall_clock=lambda: clock[0])
    assert cache.seed(Token("old", expires))
    # just inside the margin: the old token is handed out and a background fetch starts
    clock[0] = expires - seconds + (safety_point(expires, seconds) - (expires - seconds)) / 2
    assert (await cache.get()).value == "old"
    flight = cache._flight
    assert flight is not None  # started by that call, running in the background
    assert (await flight).value == "new"
    assert fetched == [clock[0]]
    assert (await cache.get()).value == "new"


# at 0 the refresh would start at expiry: no window where the old token serves, so every request
# at expiry would wait for (or fail with) the credential service
ZERO_MARGIN = "credentials.main.refresh_margin: must be > 0"


@pytest.mark.parametrize("value", [0, "0s", "0ms"])
def test_a_zero_refresh_margin_is_refused_naming_its_key(cloud: FakeCloud, value: object) -> None:
    config = copy.deepcopy(base_config(cloud))
    margin(value)(config)
    with pytest.raises(ConfigError) as caught:
        parse_settings(config, {})
    assert ZERO_MARGIN in str(caught.value)


@pytest.mark.parametrize(
    "credential",
    [
        {"type": "ecs_metadata"},
        {"type": "pod_identity", "uri": "http://127.0.0.1:9/c", "token_file": "/t"},
    ],
)
def test_a_zero_refresh_margin_is_refused_for_temporary_keys_too(
    credential: dict[str, Any],
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings(config_with({**credential, "refresh_margin": 0}), {})
    assert ZERO_MARGIN in str(caught.value)
