"""The upstream pools follow a reload (issues 9 and 11): a shorter ``pool_idle`` applies to the
connections already open, and a route that moved to another upstream drops its idle ones.

Observed from the upstreams' side: each counts the connections it has open, so "closed" means
the upstream saw the FIN, not that the gateway's bookkeeping says so.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from conftest import base_config
from faulty_upstream import read_request
from multidict import CIMultiDict
from yarl import URL

from gateway.config.load import parse_config
from gateway.http1 import UpstreamClient
from gateway.server.app import build_app, make_runner
from gateway.server.reload import ConfigSource
from gateway.server.state import GATEWAY
from gateway.testing import FakeCloud

OK = b'{"ok":true}'
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (
    len(OK),
    OK,
)
SLACK = 1.0  # the loop may be late on a busy machine
WAIT = 10.0


class Upstream:
    """Keep-alive upstream; a request whose path has ``hold`` waits for ``gate``."""

    def __init__(self) -> None:
        self.open = 0
        self.opened = 0
        self.gate = asyncio.Event()
        self.holding = asyncio.Event()
        self.closed = asyncio.Condition()
        self.url = ""
        self._server: asyncio.Server | None = None

    async def start(self) -> Upstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def none_open(self) -> None:
        async with self.closed:
            await self.closed.wait_for(lambda: self.open == 0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        self.opened += 1
        try:
            while True:
                request = await read_request(reader)
                if b"hold" in request.split(b"\r\n", 1)[0]:
                    self.holding.set()
                    await self.gate.wait()
                writer.write(ANSWER)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            async with self.closed:
                self.open -= 1
                self.closed.notify_all()


@pytest.fixture
async def ups() -> AsyncIterator[tuple[Upstream, Upstream]]:
    one, two = await Upstream().start(), await Upstream().start()
    try:
        yield one, two
    finally:
        await one.close()
        await two.close()


def config(cloud: FakeCloud, url: str, pool_idle: float) -> dict[str, Any]:
    cfg = copy.deepcopy(base_config(cloud))
    cfg["credentials"]["open"] = {"type": "none"}
    cfg["routes"] = [
        {
            "name": "raw",
            "path": "/v1",
            "upstream": url,
            "credential": "open",
            "timeouts": {"pool_idle": pool_idle},
        }
    ]
    return cfg


async def serve(cfg: dict[str, Any], tmp_path: Path) -> tuple[str, web.Application, web.AppRunner]:
    path = tmp_path / "config.yaml"
    text = yaml.safe_dump(cfg)
    path.write_text(text)
    app = build_app(parse_config(text, path, {}), source=ConfigSource(path, {}))
    runner = make_runner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return f"http://127.0.0.1:{runner.addresses[0][1]}", app, runner


async def reload(app: web.Application, cfg: dict[str, Any]) -> None:
    reloader = app[GATEWAY].reloader
    assert reloader is not None
    assert await reloader.reload("test", yaml.safe_dump(cfg))


def gauge(app: web.Application, state: str) -> float:
    value = app[GATEWAY].metrics.registry.get_sample_value(
        "gateway_upstream_connections", {"route": "raw", "state": state}
    )
    return value if value is not None else 0.0


async def test_a_shorter_pool_idle_from_a_reload_closes_connections_already_open(
    cloud: FakeCloud, tmp_path: Path, ups: tuple[Upstream, Upstream]
) -> None:
    up, _ = ups
    url, app, runner = await serve(config(cloud, up.url, 30), tmp_path)
    try:
        async with aiohttp.ClientSession() as http:
            held = asyncio.ensure_future(http.post(url + "/v1/hold", data=b"{}"))
            async with asyncio.timeout(WAIT):
                await up.holding.wait()  # one in use by a request of the old config
            async with http.post(url + "/v1/a", data=b"{}") as resp:
                assert resp.status == 200  # a second one idle, for 30 s under this config
            assert up.open == 2
            await reload(app, config(cloud, up.url, 0.5))
            loop = asyncio.get_running_loop()
            released = loop.time()  # the held connection goes idle after this
            up.gate.set()
            async with await held as resp:
                assert resp.status == 200
            answered = loop.time()
            # both follow the new pool_idle: the idle one and the one given back afterwards
            async with asyncio.timeout(0.5 + SLACK):
                await up.none_open()
            print(f"\nclosed {loop.time() - answered:.3f} s after the last answer (pool_idle 0.5)")
            assert loop.time() - released >= 0.5 - 0.02  # the one given back: not before
            assert gauge(app, "idle") == gauge(app, "active") == 0
    finally:
        await runner.cleanup()


async def test_a_route_moved_to_another_upstream_drops_its_idle_connections_at_the_reload(
    cloud: FakeCloud, tmp_path: Path, ups: tuple[Upstream, Upstream]
) -> None:
    old, new = ups
    url, app, runner = await serve(config(cloud, old.url, 30), tmp_path)
    try:
        async with aiohttp.ClientSession() as http:
            held = asyncio.ensure_future(http.post(url + "/v1/hold", data=b"{}"))
            async with asyncio.timeout(WAIT):
                await old.holding.wait()
            async with http.post(url + "/v1/a", data=b"{}") as resp:
                assert resp.status == 200
            assert (old.open, gauge(app, "idle"), gauge(app, "active")) == (2, 1, 1)
            await reload(app, config(cloud, new.url, 30))
            async with asyncio.timeout(WAIT):  # not after 30 s: nothing can take it any more
                async with old.closed:
                    await old.closed.wait_for(lambda: old.open == 1)
            old.gate.set()  # the old config's request ends: its connection is not kept either
            async with await held as resp:
                assert resp.status == 200
            async with asyncio.timeout(WAIT):
                await old.none_open()
            async with http.post(url + "/v1/b", data=b"{}") as resp:
                assert resp.status == 200
            assert (old.opened, new.opened, new.open) == (2, 1, 1)
            assert (gauge(app, "idle"), gauge(app, "active")) == (1, 0)
    finally:
        await runner.cleanup()


async def test_a_shorter_keepalive_given_back_after_a_longer_one_still_closes_on_time(
    ups: tuple[Upstream, Upstream],
) -> None:
    # without follow(): two requests of one pool with different keepalives; the idle deque must
    # stay ordered by expiry or the short one waits behind the long one
    up, _ = ups
    client = UpstreamClient()
    url = URL(up.url + "/v1/x")
    hold = URL(up.url + "/v1/hold")

    async def post(target: URL, keepalive: float) -> bytes:
        response = await client.request(
            "POST", target, CIMultiDict(), b"{}", 5.0, pool="r", keepalive=keepalive
        )
        try:
            return await response.content.read()
        finally:
            response.release()

    try:
        held = asyncio.ensure_future(post(hold, 0.3))
        async with asyncio.timeout(WAIT):
            await up.holding.wait()
            assert await post(url, 30.0) == OK  # idle first, for 30 s
            up.gate.set()
            assert await held == OK  # idle second, for 0.3 s
        assert client.sizes() == {"r": (2, 0)}
        async with asyncio.timeout(0.3 + SLACK):
            async with up.closed:
                await up.closed.wait_for(lambda: up.open == 1)
        assert client.sizes() == {"r": (1, 0)}
    finally:
        await client.close()


async def test_two_routes_to_one_upstream_keep_separate_pools(
    cloud: FakeCloud, tmp_path: Path, ups: tuple[Upstream, Upstream]
) -> None:
    # "one pool per route": the gauge's route label is exact, and each route's pool_idle
    # applies to its own connections only
    up, _ = ups
    cfg = config(cloud, up.url, 30)
    cfg["routes"].append({**cfg["routes"][0], "name": "other", "path": "/v2"})
    url, app, runner = await serve(cfg, tmp_path)
    try:
        async with aiohttp.ClientSession() as http:
            for path in ("/v1/a", "/v2/a", "/v1/b", "/v2/b"):
                async with http.post(url + path, data=b"{}") as resp:
                    assert resp.status == 200
        assert (up.opened, up.open) == (2, 2)  # one per route, each reused once
        assert gauge(app, "idle") == 1
    finally:
        await runner.cleanup()
