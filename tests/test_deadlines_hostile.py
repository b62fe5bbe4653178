"""The first-byte deadline (gateway/deadlines.py, UpstreamClient.request) under a hostile upstream.

Raw upstreams on loopback that answer late, never, or close without answering; the client is the
real UpstreamClient. What must hold: each wait ends at its own deadline and no later, a timed out
connection is closed and never pooled, a retry stays inside the first deadline, and what a
finished wait leaves in the shared heap does not hold a request's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import threading
import time
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
        self.closed_by_client = 0
        self.eof = asyncio.Event()
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
    with contextlib.suppress(ConnectionError):
        await reader.read()  # until the client closes
    up.closed_by_client += 1
    up.eof.set()


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


async def late_answer(
    up: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Each request answered 0.3 s late with the connection's number; EOF noted on ``closed``."""
    number = up.connections
    while True:
        try:
            await up.read(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            up.closed_by_client += 1
            return
        await asyncio.sleep(0.3)
        body = b"conn-%d" % number
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))


async def test_a_late_answer_after_the_deadline_is_never_given_to_the_next_request(
    client: UpstreamClient,
) -> None:
    """The timed out connection is closed (the upstream sees EOF) and not pooled: the next request
    goes on a new connection and reads its own answer, not the first one's late one."""
    async with RawUpstream(late_answer) as up:
        url = URL(up.url + "/x")
        with pytest.raises(TimeoutError):
            await client.request("GET", url, CIMultiDict(), b"", 2, first_byte=0.1)
        response = await client.request("GET", url, CIMultiDict(), b"", 2, first_byte=2)
        assert await response.content.read() == b"conn-2"
        response.release()
        assert up.connections == 2
        assert up.closed_by_client == 1
        assert client.sizes() == {"": (1, 0)}


async def test_the_retry_of_a_get_whose_reused_connection_closed_stays_inside_the_deadline(
    client: UpstreamClient,
) -> None:
    """A pooled connection takes the GET, holds it 0.3 s and closes unanswered; the GET is sent
    once more on a new connection, which never answers. The 504 comes at the first deadline
    (0.5 s after the call), not a fresh first-byte time after the retry."""

    async def serve(
        up: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if up.connections == 1:
            await up.read(reader)
            writer.write(OK)
            await up.read(reader)
            await asyncio.sleep(0.3)
            return  # closed unanswered
        await never_answer(up, reader, writer)

    async with RawUpstream(serve) as up:
        url = URL(up.url + "/x")
        response = await client.request("GET", url, CIMultiDict(), b"", 2, first_byte=5)
        assert await response.content.read() == b"ok"
        response.release()
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(TimeoutError):
            await client.request("GET", url, CIMultiDict(), b"", 2, first_byte=0.5)
        took = loop.time() - start
        assert up.connections == 2 and up.requests == 3
        assert 0.45 <= took < 0.75, took


async def test_a_wait_cancelled_by_a_client_gone_stays_a_cancellation_and_its_deadline_is_harmless(
    client: UpstreamClient, caplog: pytest.LogCaptureFixture
) -> None:
    """The handler's task cancelled while it waits for headers: CancelledError (499, not 504),
    the connection closed; its deadline passing later fails nothing and logs nothing."""
    async with RawUpstream(never_answer) as up:
        url = URL(up.url + "/x")
        task = asyncio.create_task(
            client.request("GET", url, CIMultiDict(), b"", 2, first_byte=0.1)
        )
        await up.got.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await up.eof.wait()
        await asyncio.sleep(0.2)  # past the deadline (a timer, nothing to await)
        assert len(client.deadlines) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_answers_and_deadlines_due_in_the_same_loop_iteration_end_one_way_or_the_other(
    client: UpstreamClient, caplog: pytest.LogCaptureFixture
) -> None:
    """The loop is held busy while the upstream's headers arrive and the deadline passes, so both
    are ready at once (asyncio runs the read first, uvloop the timer). Either the answer is
    whole and the connection pooled, or it is a TimeoutError and the connection closed, never
    pooled with a parsed answer nobody read; nothing is logged."""
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    eof = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(4096)
            loop.call_soon_threadsafe(time.sleep, 0.3)  # the loop busy from now on
            time.sleep(0.05)  # the answer arrives while the loop is busy
            conn.sendall(OK)
            conn.settimeout(3)
            with contextlib.suppress(OSError):
                if conn.recv(4096) == b"":
                    eof.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        url = URL(f"http://127.0.0.1:{port}/x")
        try:
            response = await client.request("GET", url, CIMultiDict(), b"", 2, first_byte=0.1)
        except TimeoutError:
            await asyncio.to_thread(thread.join, 5)
            assert eof.is_set()
            assert client.sizes() == {}
        else:
            assert await response.content.read() == b"ok"
            response.release()
            assert client.sizes() == {"": (1, 0)}
            await client.close()  # the thread's read ends now
    finally:
        listener.close()
        await asyncio.to_thread(thread.join, 5)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_many_waits_with_different_first_byte_times_each_end_at_their_own(
    client: UpstreamClient,
) -> None:
    """Requests of several routes (first-byte times 0.05 to 0.4 s, started in shuffled order) to
    an upstream that never answers: each fails at its own deadline, none at another's."""
    async with RawUpstream(never_answer) as up:
        loop = asyncio.get_running_loop()
        url = URL(up.url + "/x")
        waits = [0.05 * (1 + (7 * i) % 8) for i in range(24)]

        async def one(wait: float) -> float:
            start = loop.time()
            with pytest.raises(TimeoutError):
                await client.request("GET", url, CIMultiDict(), b"", 2, first_byte=wait)
            return loop.time() - start

        took = await asyncio.gather(*(one(w) for w in waits))
        for wait, t in zip(waits, took, strict=True):
            assert wait - 0.005 <= t < wait + 0.25, (wait, t)
        assert client.sizes() == {}
        assert len(client.deadlines) == 0


def test_a_deadline_still_armed_when_the_loop_closes_warns_of_nothing() -> None:
    """A request answered well inside a 60 s first-byte time leaves the timer armed for it; the
    client closed and the loop ended, nothing waits for the timer or complains (warnings are
    errors here; a pending task or unclosed transport would show)."""

    async def main() -> float:
        client = UpstreamClient()
        async with RawUpstream(answer_ok) as up:
            response = await client.request(
                "GET", URL(up.url + "/x"), CIMultiDict(), b"", 2, first_byte=60
            )
            assert await response.content.read() == b"ok"
            response.release()
            await client.close()
        return asyncio.get_running_loop().time()

    start = time.monotonic()
    asyncio.run(main())
    gc.collect()
    assert time.monotonic() - start < 5


async def answer_ok(
    up: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    while True:
        try:
            await up.read(reader)
        except asyncio.IncompleteReadError:
            return
        writer.write(OK)
