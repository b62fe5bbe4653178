"""IAM password tokens: single flight, reuse, background refresh, 401 replay, back-off, clock."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
from conftest import GatewayFactory, RunningGateway, chat_body

from gateway.credentials.token_cache import TokenCache
from gateway.server.state import GATEWAY
from gateway.testing import FakeCloud

DAY = 86400.0


def cache_of(gw: RunningGateway) -> TokenCache:
    cache = gw.app[GATEWAY].credentials["main"].cache  # type: ignore[attr-defined]
    assert isinstance(cache, TokenCache)
    return cache


def watch_refreshes(cache: TokenCache) -> asyncio.Queue[str]:
    """A queue receiving each fetch result ("ok", "error", "rejected") as the cache reports it."""
    results: asyncio.Queue[str] = asyncio.Queue()
    original = cache._on_refresh

    def listener(name: str, result: str, expires_at: float | None) -> None:
        if original is not None:
            original(name, result, expires_at)
        results.put_nowait(result)

    cache._on_refresh = listener
    return results


def shift_clock(cache: TokenCache, offset: float) -> None:
    """Make the cache's wall clock run ``offset`` seconds ahead (a laptop that slept)."""
    cache._now = lambda: time.time() + offset


async def chat(http: aiohttp.ClientSession, gw: RunningGateway) -> tuple[int, Any]:
    async with http.post(gw.url + "/v1/chat/completions", json=chat_body(stream=False)) as resp:
        return resp.status, await resp.json()


def tokens_seen(cloud: FakeCloud) -> list[str]:
    return [r.headers.get("X-Auth-Token", "") for r in cloud.modelarts.requests]


async def test_concurrent_requests_share_one_iam_call(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    cloud.iam.delay = 0.3  # every request arrives while the one fetch is still under way
    gw = await make_gateway()
    results = await asyncio.gather(*(chat(http, gw) for _ in range(20)))
    assert [status for status, _ in results] == [200] * 20
    assert cloud.iam.calls == 1
    assert len(set(tokens_seen(cloud))) == 1

    # the same when a cached token has expired: one refresh serves all waiting requests
    shift_clock(cache_of(gw), 2 * DAY)
    results = await asyncio.gather(*(chat(http, gw) for _ in range(20)))
    assert [status for status, _ in results] == [200] * 20
    assert cloud.iam.calls == 2
    assert len(set(tokens_seen(cloud)[20:])) == 1


async def test_token_is_reused_across_requests(
    cloud: FakeCloud, gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    for _ in range(5):
        assert (await chat(http, gateway))[0] == 200
    assert cloud.iam.calls == 1
    assert len(set(tokens_seen(cloud))) == 1
    assert gateway.metric("gateway_token_refreshes_total", credential="main", result="ok") == 1
    cache = cache_of(gateway)
    assert cache.token is not None
    expiry = gateway.metric("gateway_token_expiry_timestamp_seconds", credential="main")
    assert expiry == cache.token.expires_at
    assert time.time() + DAY - 60 < expiry <= time.time() + DAY


async def test_token_within_refresh_margin_still_serves_while_refreshed_in_background(
    cloud: FakeCloud, gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    assert (await chat(http, gateway))[0] == 200
    cache = cache_of(gateway)
    refreshes = watch_refreshes(cache)
    old = tokens_seen(cloud)[-1]
    old_expiry = gateway.metric("gateway_token_expiry_timestamp_seconds", credential="main")
    # 100 s before expiry: inside refresh_margin (300 s) but still valid
    shift_clock(cache, DAY - 100)
    cloud.iam.delay = 0.5
    assert (await chat(http, gateway))[0] == 200
    assert tokens_seen(cloud)[-1] == old  # served at once with the old token...
    assert refreshes.empty()  # ...while the refresh is still under way
    assert await asyncio.wait_for(refreshes.get(), 3) == "ok"
    assert cloud.iam.calls == 2
    shift_clock(cache, 0)
    assert (await chat(http, gateway))[0] == 200
    assert tokens_seen(cloud)[-1] != old
    assert cloud.iam.calls == 2
    assert gateway.metric("gateway_token_refreshes_total", credential="main", result="ok") == 2
    new_expiry = gateway.metric("gateway_token_expiry_timestamp_seconds", credential="main")
    assert new_expiry > old_expiry


async def test_upstream_401_refreshes_once_and_replays(
    cloud: FakeCloud, gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    assert (await chat(http, gateway))[0] == 200
    cloud.modelarts.requests.clear()
    cloud.iam.revoke_all()  # e.g. a password change: the cached token dies before expires_at
    status, body = await chat(http, gateway)
    assert status == 200, body
    assert body["object"] == "chat.completion"
    seen = tokens_seen(cloud)
    assert len(seen) == 2
    assert seen[0] != seen[1]
    assert cloud.modelarts.unauthorized == 1
    assert cloud.iam.calls == 2


async def test_streaming_request_is_replayed_after_401_too(
    cloud: FakeCloud, gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    assert (await chat(http, gateway))[0] == 200
    cloud.iam.revoke_all()
    async with http.post(gateway.url + "/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 200
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    assert cloud.modelarts.unauthorized == 1
    assert cloud.modelarts.requests[-1].body == cloud.modelarts.requests[-2].body


async def test_iam_failure_gives_502_naming_the_credential_and_backs_off(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    cloud.iam.failures = [500]
    gw = await make_gateway()
    async with http.post(gw.url + "/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 502
        raw = await resp.read()
    error = json.loads(raw)["error"]
    assert error["code"] == "credential_unavailable"
    assert "'main'" in error["message"]
    assert cloud.iam.password.encode() not in raw
    assert cloud.iam.calls == 1
    assert not cloud.modelarts.requests

    # back-off: the next request fails fast without calling IAM again
    loop = asyncio.get_running_loop()
    start = loop.time()
    status, body = await chat(http, gw)
    assert status == 502
    assert body["error"]["code"] == "credential_unavailable"
    assert loop.time() - start < 0.5
    assert cloud.iam.calls == 1
    assert gw.metric("gateway_token_refreshes_total", credential="main", result="error") == 1


async def test_wrong_password_is_never_retried_in_a_loop(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    wrong = "Wrong-Passw0rd-4711"
    gw = await make_gateway(lambda c: c["credentials"]["main"].update(password=wrong))
    for _ in range(11):
        async with http.post(gw.url + "/v1/chat/completions", json=chat_body()) as resp:
            assert resp.status == 502
            raw = await resp.read()
        assert wrong.encode() not in raw
        assert json.loads(raw)["error"]["code"] == "credential_unavailable"
        assert b"'main'" in raw
    assert cloud.iam.calls == 1  # IAM locks accounts after repeated wrong passwords
    assert not cloud.modelarts.requests
    assert gw.metric("gateway_token_refreshes_total", credential="main", result="rejected") == 1


async def test_cached_token_keeps_serving_while_iam_is_down(
    cloud: FakeCloud, gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    assert (await chat(http, gateway))[0] == 200
    token = tokens_seen(cloud)[-1]
    cache = cache_of(gateway)
    refreshes = watch_refreshes(cache)
    cloud.iam.failures = [500] * 10
    shift_clock(cache, DAY - 100)  # refresh due, token still valid
    assert (await chat(http, gateway))[0] == 200
    assert await asyncio.wait_for(refreshes.get(), 3) == "error"
    for _ in range(3):
        assert (await chat(http, gateway))[0] == 200
    assert set(tokens_seen(cloud)) == {token}
    assert cloud.iam.calls == 2  # one failed refresh, then back-off
    assert gateway.metric("gateway_token_refreshes_total", credential="main", result="error") == 1


async def test_wall_clock_past_expiry_fetches_a_new_token(
    cloud: FakeCloud, gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    assert (await chat(http, gateway))[0] == 200
    old = tokens_seen(cloud)[-1]
    old_expiry = gateway.metric("gateway_token_expiry_timestamp_seconds", credential="main")
    cache = cache_of(gateway)
    shift_clock(cache, 2 * DAY)  # the machine slept through the token's expiry
    assert cache.usable() is None
    assert (await chat(http, gateway))[0] == 200
    assert cloud.iam.calls == 2
    assert tokens_seen(cloud)[-1] != old
    assert cloud.modelarts.unauthorized == 0  # the stale token was never sent
    assert gateway.metric("gateway_token_refreshes_total", credential="main", result="ok") == 2
    assert gateway.metric("gateway_token_expiry_timestamp_seconds", credential="main") > old_expiry
