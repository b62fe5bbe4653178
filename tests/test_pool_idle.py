"""Idle upstream connections are closed on time, also when no traffic comes (issue 9, item 3).

Observed from the upstream's side: a raw upstream counts the connections it has open, and holds
its answers until a whole burst has arrived, so the burst needs one connection per request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from conftest import GatewayFactory
from faulty_upstream import read_request
from multidict import CIMultiDict
from yarl import URL

from gateway.config.load import ConfigError, parse_settings
from gateway.http1 import MAX_IDLE_PER_POOL, UpstreamClient

OK = b'{"ok":true}'
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (
    len(OK),
    OK,
)


class CountingUpstream:
    """Keep-alive upstream: answers once ``burst`` requests are in, counts open connections."""

    def __init__(self, burst: int) -> None:
        self.burst = burst
        self.arrived = 0
        self.open = 0
        self.opened = 0
        self.all_in = asyncio.Event()
        self.none_open = asyncio.Event()
        self._changed = asyncio.Event()
        self.answered_at: list[float] = []
        self.closed_at: list[float] = []
        self.url = ""
        self._server: asyncio.Server | None = None

    async def start(self) -> CountingUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds; checked each time a count changes."""
        while not predicate():
            self._changed.clear()
            await self._changed.wait()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        self.open += 1
        self.opened += 1
        self.none_open.clear()
        try:
            while True:
                await read_request(reader)
                self.arrived += 1
                self._changed.set()
                if self.arrived >= self.burst:
                    self.all_in.set()
                await self.all_in.wait()
                writer.write(ANSWER)
                await writer.drain()
                self.answered_at.append(loop.time())
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed_at.append(loop.time())
            self.open -= 1
            self._changed.set()
            if not self.open:
                self.none_open.set()
            writer.close()


@pytest.fixture
async def counting() -> AsyncIterator[CountingUpstream]:
    upstream = await CountingUpstream(burst=20).start()
    try:
        yield upstream
    finally:
        await upstream.close()


POOL_IDLE = 0.5
SLACK = 1.0  # the loop may be late on a busy machine; early is what must never be


async def test_after_a_burst_idle_connections_close_on_time_without_traffic(
    make_gateway: GatewayFactory, counting: CountingUpstream, http: aiohttp.ClientSession
) -> None:
    def edit(config: dict[str, Any]) -> None:
        config["credentials"]["open"] = {"type": "none"}
        config["routes"] = [
            {
                "name": "raw",
                "path": "/v1",
                "upstream": counting.url,
                "credential": "open",
                "timeouts": {"pool_idle": POOL_IDLE},
            }
        ]

    gw = await make_gateway(edit)

    async def post() -> int:
        async with http.post(gw.url + "/v1/chat/completions", data=b"{}") as resp:
            await resp.read()
            return resp.status

    assert await asyncio.gather(*(post() for _ in range(20))) == [200] * 20
    assert counting.opened == 20 and counting.open == 20
    assert gw.metric("gateway_upstream_connections", route="raw", state="idle") == 20
    assert gw.metric("gateway_upstream_connections", route="raw", state="active") == 0

    # no request from here on: only the pool's own timer can close them
    async with asyncio.timeout(POOL_IDLE + SLACK + 1.0):
        await counting.none_open.wait()
    loop = asyncio.get_running_loop()
    first_answer, last_answer = min(counting.answered_at), max(counting.answered_at)
    print(
        f"\n20 idle connections closed {min(counting.closed_at) - first_answer:.3f}"
        f"-{max(counting.closed_at) - last_answer:.3f} s after answering (pool_idle {POOL_IDLE})"
    )
    # not before pool_idle (the pool kept them for reuse), and on time after it
    assert min(counting.closed_at) >= first_answer + POOL_IDLE - 0.02
    assert max(counting.closed_at) <= last_answer + POOL_IDLE + SLACK
    assert loop.time() <= last_answer + POOL_IDLE + SLACK
    assert gw.metric("gateway_upstream_connections", route="raw", state="idle") == 0
    assert gw.metric("gateway_upstream_connections", route="raw", state="active") == 0


async def test_a_connection_in_use_is_counted_active(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    upstream = await CountingUpstream(burst=2).start()  # holds the first request's answer

    def edit(config: dict[str, Any]) -> None:
        config["credentials"]["open"] = {"type": "none"}
        config["routes"] = [
            {"name": "raw", "path": "/v1", "upstream": upstream.url, "credential": "open"}
        ]

    try:
        gw = await make_gateway(edit)
        first = asyncio.ensure_future(http.post(gw.url + "/v1/a", data=b"{}"))
        async with asyncio.timeout(5):
            await upstream.until(lambda: upstream.arrived >= 1)
        assert gw.metric("gateway_upstream_connections", route="raw", state="active") == 1
        assert gw.metric("gateway_upstream_connections", route="raw", state="idle") == 0
        async with http.post(gw.url + "/v1/b", data=b"{}") as resp:  # releases both
            assert resp.status == 200
        async with await first as resp:
            assert resp.status == 200
        assert gw.metric("gateway_upstream_connections", route="raw", state="idle") == 2
        assert gw.metric("gateway_upstream_connections", route="raw", state="active") == 0
    finally:
        await upstream.close()


async def test_the_idle_pool_keeps_at_most_its_cap_and_closes_the_rest() -> None:
    burst = MAX_IDLE_PER_POOL + 4
    upstream = await CountingUpstream(burst=burst).start()
    client = UpstreamClient()
    url = URL(upstream.url + "/v1/x")

    async def post() -> bytes:
        response = await client.request("POST", url, CIMultiDict(), b"{}", 5.0, pool="r")
        try:
            return await response.content.read()
        finally:
            response.release()

    try:
        async with asyncio.timeout(30):
            assert await asyncio.gather(*(post() for _ in range(burst))) == [OK] * burst
            assert upstream.opened == burst
            assert client.sizes() == {"r": (MAX_IDLE_PER_POOL, 0)}
            await upstream.until(lambda: upstream.open <= MAX_IDLE_PER_POOL)
        assert upstream.open == MAX_IDLE_PER_POOL
        assert len(upstream.closed_at) == 4
    finally:
        await client.close()
        await upstream.close()


def test_pool_idle_must_be_positive() -> None:
    raw = {
        "credentials": {"open": {"type": "none"}},
        "routes": [
            {
                "name": "r",
                "upstream": "http://127.0.0.1:9/",
                "credential": "open",
                "timeouts": {"pool_idle": 0},
            }
        ],
    }
    with pytest.raises(ConfigError) as info:
        parse_settings(raw, {})
    assert "routes[0].timeouts.pool_idle: must be > 0" in str(info.value)


def block_the_loop(seconds: float) -> None:
    """What a busy event loop does to its timers: nothing runs for ``seconds``."""
    time.sleep(seconds)


async def test_a_connection_past_pool_idle_is_not_reused_even_if_the_timer_is_late() -> None:
    # A busy loop runs the pool's timer late; the next request must still not take a
    # connection idle for longer than pool_idle (the upstream may be closing it right now).
    upstream = await CountingUpstream(burst=1).start()
    client = UpstreamClient()
    url = URL(upstream.url + "/v1/x")

    async def post() -> bytes:
        response = await client.request(
            "POST", url, CIMultiDict(), b"{}", 5.0, pool="r", keepalive=0.05
        )
        try:
            return await response.content.read()
        finally:
            response.release()

    try:
        async with asyncio.timeout(10):
            assert await post() == OK
            block_the_loop(0.1)  # past the expiry, and the timer cannot run meanwhile
            assert await post() == OK
        assert upstream.opened == 2
    finally:
        await client.close()
        await upstream.close()
