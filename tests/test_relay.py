"""Unit tests of gateway/relay.py without sockets: a real aiohttp StreamReader fed by hand.

The relay's source is an ``aiohttp.StreamReader`` (what ``ClientResponse.content`` is), fed with
``feed_data``/``feed_eof``/``set_exception`` the way the client protocol feeds it. The client side
is a sink that queues every write, so a test awaits the write it expects instead of sleeping.
Only the tests that prove something does *not* happen wait a fixed, short time.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, cast

import aiohttp
import pytest

from gateway._aiohttp import ReaderSource
from gateway.metrics import ChunkStats
from gateway.proxy.sse import HEARTBEAT, Relay, ends_event, error_event

EVENT = b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n'
HALF = b'data: {"choices": [{"delta": '
REST = b'{"content": "hi"}}]}\n\n'
WAIT = 2.0  # bound on awaiting something that must happen (generous: shared 2-core machine)


class _Protocol:
    """The little of aiohttp's BaseProtocol a StreamReader touches: flow control and liveness."""

    _reading_paused = False
    connected = True

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self, resume_parser: bool = True) -> None:
        self._reading_paused = False


def make_source() -> aiohttp.StreamReader:
    loop = asyncio.get_running_loop()
    return aiohttp.StreamReader(cast(Any, _Protocol()), 2**16, loop=loop)


class Sink:
    """The client side: records writes in order and queues them for tests to await."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.aborted = False
        self.fail: BaseException | None = None
        self.block = False

    def write(self, chunk: bytes) -> bool:
        if self.fail is not None:
            raise self.fail
        self.writes.append(chunk)
        self.queue.put_nowait(chunk)
        return self.block  # a client that stopped reading: its send buffer stays full

    async def drain(self) -> None:
        if self.block:
            await asyncio.get_running_loop().create_future()

    def abort(self) -> None:
        self.aborted = True

    async def next(self) -> bytes:
        return await asyncio.wait_for(self.queue.get(), WAIT)

    @property
    def body(self) -> bytes:
        return b"".join(self.writes)


class Harness:
    """A relay over a hand-fed source, running as its own task (like a request handler)."""

    def __init__(self, *, sse: bool = True, **kwargs: Any) -> None:
        self.source = make_source()
        self.sink = Sink()
        self.stats = ChunkStats()
        self.beats = 0
        self.relay = Relay(
            ReaderSource(self.source),
            self.sink,
            sse=sse,
            stats=self.stats,
            on_heartbeat=self._beat,
            **kwargs,
        )
        self.task: asyncio.Task[str] = asyncio.get_running_loop().create_task(self.relay.run())

    def _beat(self) -> None:
        self.beats += 1

    async def send(self, chunk: bytes) -> None:
        """Feed one upstream chunk and wait until the relay has written it to the client."""
        self.source.feed_data(chunk)
        assert await self.sink.next() == chunk

    async def result(self) -> str:
        return await asyncio.wait_for(self.task, WAIT)


# --- ends_event --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prev", "tail"),
    [
        (b"", b""),  # nothing relayed yet
        (b"", b"data: x\n\n"),
        (b"", b"data: x\r\n\r\n"),
        (b"", b"data: x\r\r"),
        (b"", b"data: x\n\r\n"),
        (b"", b": comment\n\n"),
        (b"data: x\n", b"\n"),  # the blank line arrives as its own chunk
        (b"data: x\r\n\r", b"\n"),
        (b"data: x\r\n", b"\r\n"),
        (b"data: x", b"\n\n"),
        (b"data: a\n\ndata: b\n\n", b"data: c\n\n"),
    ],
)
def test_ends_event_true_on_a_blank_line(prev: bytes, tail: bytes) -> None:
    assert ends_event(prev, tail)


@pytest.mark.parametrize(
    ("prev", "tail"),
    [
        (b"", b"data: x"),
        (b"", b"data: x\n"),
        (b"", b"data: x\r\n"),
        (b"", b"data: x\r"),
        (b"data: x\n\n", b"data: y"),  # an earlier boundary does not count
        (b"data: x\n\n", b"data: y\n"),
        (b"data: x\r\n", b"\r"),
        (b"", b'data: {"a": "\\n\\n"}'),  # escaped newlines inside JSON are not line ends
    ],
)
def test_ends_event_false_inside_an_event(prev: bytes, tail: bytes) -> None:
    assert not ends_event(prev, tail)


@pytest.mark.parametrize(
    "pieces",
    [
        [b"data: x", b"\r\n", b"\r", b"\n"],  # a CRLF blank line split over three chunks
        [b"data: x", b"\r", b"\n", b"\r", b"\n"],
        [b"data: x\n", b"\n", b"data: y", b"\n", b"\n"],
    ],
)
async def test_an_event_end_split_into_tiny_chunks_is_still_a_boundary(
    pieces: list[bytes],
) -> None:
    # the relay keeps the last two chunks only; tiny ones must not push the boundary out of view
    h = Harness(heartbeat=0)
    for piece in pieces:
        await h.send(piece)
    h.source.feed_eof()
    assert await h.result() == "done"
    assert h.sink.body == b"".join(pieces)
    assert not h.sink.aborted


async def test_a_tiny_chunk_inside_an_event_is_not_a_boundary() -> None:
    h = Harness(heartbeat=0)
    for piece in [b"data: x\n\n", b"d", b"\n"]:  # "d\n" is a line, not a blank line
        await h.send(piece)
    h.source.feed_eof()
    assert await h.result() == "upstream_error"
    assert h.sink.aborted


# --- error_event -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "type_", "code"),
    [
        ("idle_timeout", "timeout", "upstream_idle_timeout"),
        ("total_timeout", "timeout", "upstream_total_timeout"),
        ("upstream_error", "upstream_error", "upstream_error"),
        ("shutdown", "server_error", "shutdown"),
    ],
)
def test_error_event_is_one_sse_event_with_an_openai_error(
    reason: str, type_: str, code: str
) -> None:
    raw = error_event(reason)
    assert raw.startswith(b"event: error\ndata: ")
    assert raw.endswith(b"\n\n")
    assert raw.count(b"\n\n") == 1  # exactly one event
    data = json.loads(raw.split(b"data: ", 1)[1])
    assert data["error"]["type"] == type_
    assert data["error"]["code"] == code
    assert isinstance(data["error"]["message"], str) and data["error"]["message"]


# --- the copy loop -----------------------------------------------------------------------------


async def test_each_upstream_chunk_is_one_unchanged_write_and_eof_ends_done() -> None:
    h = Harness(heartbeat=0)
    chunks = [EVENT, HALF, REST, b"data: \xff\xfe not utf-8\r\n\r\n", b"data: [DONE]\n\n"]
    for chunk in chunks:
        await h.send(chunk)
    h.source.feed_eof()
    assert await h.result() == "done"
    assert h.sink.writes == chunks
    assert not h.sink.aborted
    size = sum(map(len, chunks))
    assert h.relay.bytes == size
    assert h.stats.bytes == size
    assert h.stats.gap_count == len(chunks)


async def test_chunks_buffered_together_are_written_together_unchanged() -> None:
    h = Harness(heartbeat=0)
    h.source.feed_data(HALF)
    h.source.feed_data(REST)
    h.source.feed_eof()
    assert await h.result() == "done"
    assert h.sink.body == HALF + REST


async def test_heartbeat_is_sent_after_upstream_silence_between_events() -> None:
    h = Harness(heartbeat=0.05)
    await h.send(EVENT)
    assert await h.sink.next() == HEARTBEAT
    assert await h.sink.next() == HEARTBEAT  # and again while the silence lasts
    await h.send(EVENT)
    h.source.feed_eof()
    assert await h.result() == "done"
    assert h.beats == h.sink.writes.count(HEARTBEAT) >= 2
    # the relayed byte count is the upstream's; heartbeats are the gateway's own
    assert h.relay.bytes == 2 * len(EVENT)


async def test_heartbeat_is_never_written_inside_a_half_received_event() -> None:
    h = Harness(heartbeat=0.03)
    await h.send(HALF)
    await asyncio.sleep(0.25)  # ~8 heartbeat periods of silence inside the event
    assert h.sink.writes == [HALF]
    await h.send(REST)
    assert await h.sink.next() == HEARTBEAT  # back on a boundary: heartbeats resume
    h.source.feed_eof()
    assert await h.result() == "done"
    assert h.sink.body.startswith(HALF + REST)


async def test_heartbeat_zero_sends_none() -> None:
    h = Harness(heartbeat=0)
    await h.send(EVENT)
    await asyncio.sleep(0.2)
    h.source.feed_eof()
    assert await h.result() == "done"
    assert h.sink.writes == [EVENT]
    assert h.beats == 0


async def test_heartbeat_is_not_sent_on_a_non_sse_body() -> None:
    h = Harness(sse=False, heartbeat=0.03)
    await h.send(b'{"partial": ')
    await h.send(b"1}")
    await asyncio.sleep(0.2)
    h.source.feed_eof()
    assert await h.result() == "done"
    assert h.sink.body == b'{"partial": 1}'
    assert h.beats == 0


async def test_idle_on_a_boundary_ends_with_an_idle_error_event() -> None:
    h = Harness(idle=0.1, heartbeat=0)
    await h.send(EVENT)
    assert await h.sink.next() == error_event("idle_timeout")
    assert await h.result() == "idle_timeout"
    assert not h.sink.aborted  # the event says why; the body itself ends cleanly


async def test_idle_keeps_counting_through_heartbeats() -> None:
    # heartbeats are the gateway's own bytes: they must not reset the upstream's idle clock
    h = Harness(idle=0.2, heartbeat=0.03)
    await h.send(EVENT)
    assert await h.result() == "idle_timeout"
    assert h.sink.writes[-1] == error_event("idle_timeout")
    assert h.beats >= 1


async def test_idle_inside_an_event_aborts_instead_of_a_clean_end() -> None:
    h = Harness(idle=0.1, heartbeat=0.03)
    await h.send(EVENT)
    await h.send(HALF)
    assert await h.result() == "idle_timeout"
    assert h.sink.aborted
    assert h.sink.writes[-1] == HALF  # nothing written after the half event
    assert b"event: error" not in h.sink.body


async def test_idle_before_any_byte_sends_the_error_event() -> None:
    h = Harness(idle=0.1)
    assert await h.result() == "idle_timeout"
    assert h.sink.writes == [error_event("idle_timeout")]


async def test_total_deadline_ends_with_a_total_timeout_event() -> None:
    loop = asyncio.get_running_loop()
    h = Harness(idle=5, deadline=loop.time() + 0.15, heartbeat=0)
    await h.send(EVENT)
    assert await h.result() == "total_timeout"
    assert h.sink.writes == [EVENT, error_event("total_timeout")]


async def test_total_deadline_fires_even_while_chunks_keep_arriving() -> None:
    loop = asyncio.get_running_loop()
    h = Harness(idle=5, deadline=loop.time() + 0.2, heartbeat=0)
    while not h.task.done():
        h.source.feed_data(EVENT)
        await asyncio.sleep(0.02)
    assert await h.result() == "total_timeout"
    assert h.sink.writes[-1] == error_event("total_timeout")


async def test_total_deadline_inside_an_event_aborts() -> None:
    loop = asyncio.get_running_loop()
    h = Harness(idle=5, deadline=loop.time() + 0.15)
    await h.send(HALF)
    assert await h.result() == "total_timeout"
    assert h.sink.aborted
    assert h.sink.writes == [HALF]


async def test_upstream_failure_on_a_boundary_ends_with_an_upstream_error_event() -> None:
    h = Harness(heartbeat=0)
    await h.send(EVENT)
    h.source.set_exception(aiohttp.ClientPayloadError("Response payload is not completed"))
    assert await h.result() == "upstream_error"
    assert h.sink.writes == [EVENT, error_event("upstream_error")]
    assert not h.sink.aborted


async def test_upstream_failure_inside_an_event_aborts() -> None:
    h = Harness(heartbeat=0)
    await h.send(HALF)
    h.source.set_exception(aiohttp.ClientPayloadError("Response payload is not completed"))
    assert await h.result() == "upstream_error"
    assert h.sink.aborted
    assert h.sink.writes == [HALF]


async def test_an_sse_body_ending_inside_an_event_is_cut_not_done() -> None:
    h = Harness(heartbeat=0)
    await h.send(EVENT)
    await h.send(HALF)
    h.source.feed_eof()
    assert await h.result() == "upstream_error"
    assert h.sink.aborted
    assert h.sink.writes == [EVENT, HALF]


async def test_a_non_sse_body_may_end_anywhere() -> None:
    h = Harness(sse=False, heartbeat=0)
    await h.send(HALF)
    h.source.feed_eof()
    assert await h.result() == "done"
    assert not h.sink.aborted


async def test_upstream_os_error_counts_as_upstream_error() -> None:
    h = Harness(heartbeat=0)
    h.source.set_exception(ConnectionResetError())
    assert await h.result() == "upstream_error"
    assert h.sink.writes == [error_event("upstream_error")]


async def test_a_failing_client_write_is_client_gone() -> None:
    h = Harness(heartbeat=0)
    await h.send(EVENT)
    h.sink.fail = ConnectionResetError()
    h.source.feed_data(EVENT)
    assert await h.result() == "client_gone"
    assert h.sink.writes == [EVENT]


async def test_a_client_that_stops_reading_for_idle_is_client_gone() -> None:
    h = Harness(idle=0.1, heartbeat=0)
    await h.send(EVENT)
    h.sink.block = True
    h.source.feed_data(EVENT)
    assert await h.result() == "client_gone"
    # the second event went into the full send buffer; then nothing more, no error event
    # towards a client that is not reading, and its connection is closed
    assert h.sink.writes == [EVENT, EVENT]
    assert h.sink.aborted


async def test_many_tiny_chunks_waiting_for_a_stalled_client_pause_the_upstream() -> None:
    # the relayed reader keeps no chunk boundaries (gateway/_aiohttp.py, _RelayedReader): the
    # upstream must still be paused by the number of chunks waiting, long before their bytes
    # reach the reader's byte limit (128 KiB here), as aiohttp's own reader would
    h = Harness(heartbeat=0)
    await h.send(EVENT)
    h.sink.block = True
    h.source.feed_data(EVENT)  # into a full send buffer: the relay stops taking chunks
    assert await h.sink.next() == EVENT
    protocol = cast(_Protocol, h.source._protocol)
    fed = 0
    while not protocol._reading_paused and fed < 20_000:
        h.source.feed_data(b"x")
        fed += 1
    assert protocol._reading_paused
    assert fed <= h.source._high_water_chunks + 1
    assert h.source._size < h.source._high_water
    h.task.cancel()


async def test_stop_from_outside_ends_with_its_reason() -> None:
    h = Harness(heartbeat=0)
    await h.send(EVENT)
    h.relay.stop("shutdown")
    h.relay.stop("idle_timeout")  # the first reason wins
    assert await h.result() == "shutdown"
    assert h.sink.writes == [EVENT, error_event("shutdown")]


async def test_foreign_cancellation_propagates() -> None:
    # a client that goes away cancels the handler (handler_cancellation): the relay must not
    # swallow that cancellation or write anything more
    h = Harness(idle=5, heartbeat=0)
    await h.send(EVENT)
    h.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(h.task, WAIT)
    assert h.sink.writes == [EVENT]


async def test_timer_is_disarmed_after_the_end() -> None:
    h = Harness(idle=0.05, heartbeat=0.02)
    await h.send(EVENT)
    h.source.feed_eof()
    assert await h.result() == "done"
    await asyncio.sleep(0.15)  # past both deadlines: nothing may fire any more
    assert h.sink.writes == [EVENT]
