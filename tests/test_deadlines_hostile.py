"""The first-byte deadline (gateway/deadlines.py, UpstreamClient.request) under a hostile upstream.

Raw upstreams on loopback that answer late, never, or close without answering; the client is the
real UpstreamClient. What must hold: each wait ends at its own deadline and no later, a timed out
connection is closed and never pooled, a retry stays inside the first deadline, and what a
finished wait leaves in the shared heap does not hold a request's memory.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from faulty_upstream import read_request
from multidict import CIMultiDict
from yarl import URL

from gateway.deadlines import Deadlines
from gateway.http1 import ClosedBeforeResponse, UpstreamClient

Handler = Callable[["RawUpstream", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    c = UpstreamClient()
    try:
        yield c
    finally:
        await c.close()


class RawUpstream:
    """A loopback server whose connections each run ``handler``; counts connections and
    requests (``got`` is set at each request read)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests = 0
        self.got = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.url = ""

    async def __aenter__(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def read(self, reader: asyncio.StreamReader) -> bytes:
        request = await read_request(reader)
        self.requests += 1
        self.got.set()
        return request

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handler(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()


async def never_answer(
    up: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    await up.read(reader)
    await reader.read()  # until the client closes
    writer.close()


async def close_unanswered(
    up: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    await up.read(reader)
    writer.close()


async def test_failed_exchanges_behind_a_waiting_one_do_not_keep_their_request_bodies(
    client: UpstreamClient,
) -> None:
    """One request still waiting for headers (the earliest deadline, at the heap's top) and many
    POSTs of 1 MiB whose connections close unanswered: each failed POST's future stays in the
    deadline heap until the waiting one's deadline passes. What it holds must be small: not its
    exception's traceback, whose frames hold the request's body and headers (the credential
    among them). Measured: 20 such POSTs kept 20 MiB until the first one's deadline (120 s by
    default)."""
    async with RawUpstream(never_answer) as slow, RawUpstream(close_unanswered) as closing:
        stuck = asyncio.create_task(
            client.request("GET", URL(slow.url + "/s"), CIMultiDict(), b"", 2, first_byte=30)
        )
        await slow.got.wait()
        tracemalloc.start()
        try:
            gc.collect()
            before = tracemalloc.get_traced_memory()[0]
            for i in range(20):
                body = bytes([i]) * (1 << 20)
                with pytest.raises(ClosedBeforeResponse):
                    await client.request(
                        "POST", URL(closing.url + "/p"), CIMultiDict(), body, 2, first_byte=30
                    )
                del body
            gc.collect()
            kept = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        stuck.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stuck
    assert kept < 4 << 20, f"{kept / (1 << 20):.1f} MiB kept after 20 failed 1 MiB requests"


async def test_a_deadline_fires_its_timer_once_not_until_the_clock_catches_up() -> None:
    """uvloop's clock counts whole milliseconds and its timers round: a timer armed for a
    deadline between two ticks fires when ``loop.time()`` still reads a little before it. The
    deadline is then due (the loop said so, as asyncio.timeout takes it), not re-armed for
    "now" again and again until the clock ticks: that spun the loop about 48 times a deadline.
    """
    loop = asyncio.get_running_loop()
    fires = 0

    class Counted(Deadlines):
        def _fire(self) -> None:
            nonlocal fires
            fires += 1
            super()._fire()

    deadlines = Counted(loop)
    for k in range(20):
        waiter: asyncio.Future[None] = loop.create_future()
        deadlines.add(waiter, loop.time() + 0.0107 + k * 0.00013)  # between millisecond ticks
        with pytest.raises(TimeoutError):
            await waiter
    assert fires <= 25, f"{fires} timer callbacks for 20 deadlines"
