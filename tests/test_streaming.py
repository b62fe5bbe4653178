"""End-to-end streaming through the gateway over real loopback sockets.

The upstream is the package's fake ModelArts (scripted pauses, stalls, resets, split events) or,
where exact bytes or write times matter, a tiny raw upstream defined here. Timings are bounded
and generous (the machine is shared); figures worth knowing are printed (see them with ``-s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import socket
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from conftest import (
    GatewayFactory,
    RunningGateway,
    base_config,
    chat_body,
    free_port,
    start_gateway_process,
    stop_process,
    wait_healthy,
)
from multidict import CIMultiDict

from gateway.testing import SSE_CONTENT_TYPE, FakeCloud, serve_on_loopback

CHAT = "/v1/chat/completions"
WAIT = 3.0  # bound on awaiting something that must happen soon


# --- helpers --------------------------------------------------------------------------------------


def tuned(*, heartbeat: float | None = None, **timeouts: float) -> Callable[[dict[str, Any]], None]:
    """A config edit setting the chat route's heartbeat and timeouts."""

    def edit(config: dict[str, Any]) -> None:
        route = config["routes"][0]
        route["timeouts"].update(timeouts)
        if heartbeat is not None:
            route["heartbeat"] = heartbeat

    return edit


async def until(condition: Callable[[], bool], within: float = WAIT) -> None:
    """Poll ``condition`` (for state that has no event to await) until true or fail."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        await asyncio.sleep(0.01)


async def read_chunks(resp: aiohttp.ClientResponse) -> list[tuple[float, bytes]]:
    """Every chunk as the client's reads return it, with its arrival time (loop clock)."""
    loop = asyncio.get_running_loop()
    chunks: list[tuple[float, bytes]] = []
    while chunk := await resp.content.readany():
        chunks.append((loop.time(), chunk))
    return chunks


async def read_until_error(resp: aiohttp.ClientResponse) -> tuple[bytes, BaseException | None]:
    """The bytes received and the exception that ended the read, if any."""
    received = bytearray()
    try:
        while chunk := await resp.content.readany():
            received += chunk
    except aiohttp.ClientPayloadError as exc:
        return bytes(received), exc
    return bytes(received), None


def sse_blocks(body: bytes) -> list[bytes]:
    """The stream split on blank lines; the gateway and the fake both end lines with LF."""
    parts = body.split(b"\n\n")
    assert parts[-1] == b"", f"stream does not end on an event boundary: {body[-80:]!r}"
    return parts[:-1]


def check_block(block: bytes) -> str:
    """The kind of one SSE block; fails on anything that is not a whole, valid event."""
    if block == b": keep-alive":
        return "heartbeat"
    if block == b"data: [DONE]":
        return "done"
    if block.startswith(b"event: error\ndata: "):
        json.loads(block.split(b"data: ", 1)[1])
        return "error"
    assert block.startswith(b"data: "), block[:80]
    json.loads(block[len(b"data: ") :])  # a heartbeat spliced inside would break the JSON
    return "data"


def error_of(body: bytes) -> dict[str, Any]:
    """The ``error`` object of the stream's closing ``event: error``."""
    last = sse_blocks(body)[-1]
    assert last.startswith(b"event: error\ndata: "), last[:80]
    data = json.loads(last.split(b"data: ", 1)[1])
    assert set(data["error"]) >= {"message", "type", "code"}
    error: dict[str, Any] = data["error"]
    return error


_VOLATILE = (
    (re.compile(rb"chatcmpl-[0-9a-f]{32}"), b"chatcmpl-ID"),
    (re.compile(rb'"created": \d+'), b'"created": 0'),
)


def normalise(body: bytes) -> bytes:
    """Blank out what differs between two answers of the fake: the completion id and time."""
    for pattern, replacement in _VOLATILE:
        body = pattern.sub(replacement, body)
    return body


def sent_upstream(cloud: FakeCloud) -> CIMultiDict[str]:
    """The headers of the last request the fake received (names compared case-insensitively)."""
    return CIMultiDict(cloud.modelarts.requests[-1].headers)


def token_of(cloud: FakeCloud) -> str:
    """The IAM token the gateway sent on its last request, to talk to the fake directly."""
    return sent_upstream(cloud)["X-Auth-Token"]


def assert_openai_error(body: dict[str, Any], code: str) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) >= {"message", "type", "code"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


class RawUpstream:
    """An upstream that writes given chunks verbatim and records when it wrote each one.

    ``then`` says how the body ends after the chunks: ``eof`` (cleanly), ``stall`` (never; only
    the client going away ends it) or ``abort`` (the TCP connection is dropped).
    """

    def __init__(self) -> None:
        self.status = 200
        self.chunks: list[bytes] = []
        self.interval = 0.0
        self.content_type = SSE_CONTENT_TYPE
        self.extra_headers: dict[str, str] = {}
        self.then = "eof"
        self.write_times: list[float] = []
        self.closed = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        loop = asyncio.get_running_loop()
        response = web.StreamResponse(
            status=self.status, headers={"Content-Type": self.content_type}
        )
        response.headers.update(self.extra_headers)
        try:
            await response.prepare(request)
            for i, chunk in enumerate(self.chunks):
                if i and self.interval:
                    await asyncio.sleep(self.interval)
                self.write_times.append(loop.time())
                await response.write(chunk)
            if self.then == "stall":
                await loop.create_future()
            if self.then == "abort" and request.transport is not None:
                request.transport.abort()
                return response
            await response.write_eof()
            return response
        finally:
            self.closed.set()


@pytest.fixture
async def raw() -> AsyncIterator[tuple[RawUpstream, str]]:
    upstream = RawUpstream()
    runner, url = await serve_on_loopback(upstream.app)
    try:
        yield upstream, url
    finally:
        await runner.cleanup()


def with_raw_route(url: str, **timeouts: float) -> Callable[[dict[str, Any]], None]:
    """A config edit adding route ``raw`` at /raw → ``url``, with no credential."""

    def edit(config: dict[str, Any]) -> None:
        config["credentials"]["open"] = {"type": "none"}
        config["routes"].append(
            {
                "name": "raw",
                "path": "/raw",
                "upstream": url,
                "credential": "open",
                "heartbeat": 0,
                "timeouts": {"connect": 2, "first_byte": 5, "idle": 5, "total": 30, **timeouts},
            }
        )

    return edit


# --- bytes and framing ----------------------------------------------------------------------------


async def test_stream_bytes_match_a_direct_request_to_the_upstream(
    cloud: FakeCloud, gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    cloud.modelarts.script.events = 20
    body = chat_body(stream_options={"include_usage": True})
    async with http.post(gateway.url + CHAT, json=body) as resp:
        assert resp.status == 200
        via_gateway = await resp.read()
    async with http.post(
        cloud.service_url + CHAT, json=body, headers={"X-Auth-Token": token_of(cloud)}
    ) as resp:
        assert resp.status == 200
        direct = await resp.read()
    assert via_gateway.endswith(b"data: [DONE]\n\n")
    assert normalise(via_gateway) == normalise(direct)
    assert len(via_gateway) == len(direct)


async def test_raw_bytes_pass_unchanged_whatever_their_line_ends_or_encoding(
    raw: tuple[RawUpstream, str], make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = raw
    upstream.chunks = [
        b"retry: 100\r\n\r\n",
        b"id: 1\r\ndata: \xff\xfe not utf-8 \x00\r\n\r\n",
        b": a comment\r\r",
        b"event: custom\ndata: line one\ndata: line two\n\n",
        b"data: " + b"y" * 300_000 + b"\n\n",  # bigger than any socket or reader buffer
        b"data: half an ev",
        b"ent\n\n",
    ]
    upstream.extra_headers = {"X-Upstream-Thing": "kept", "X-Request-Id": "the-upstreams-own"}
    gw = await make_gateway(with_raw_route(url))
    async with http.post(
        gw.url + "/raw/v1/sse", data=b"{}", headers={"X-Request-Id": "mine"}
    ) as resp:
        assert resp.status == 200
        assert resp.headers["X-Upstream-Thing"] == "kept"
        assert resp.headers.getall("X-Request-Id") == ["mine"]
        received = await resp.read()
    assert received == b"".join(upstream.chunks)
    assert gw.metric("gateway_stream_end_total", route="raw", reason="done") == 1


async def test_each_upstream_write_reaches_the_client_as_its_own_chunk(
    cloud: FakeCloud, gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    script = cloud.modelarts.script
    script.events, script.interval = 4, 0.15  # 7 writes: role, 4 tokens, finish, [DONE]
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with http.post(gateway.url + CHAT, json=chat_body()) as resp:
        assert resp.status == 200
        chunks = await read_chunks(resp)
    end = loop.time()
    reads = [c for _, c in chunks]
    events = [b for c in reads for b in sse_blocks(c)]  # every read ends on a boundary
    assert len(events) == 7 and events[-1] == b"data: [DONE]"
    # one read per write; a loaded test loop may, rarely, find two writes waiting at once
    assert len(reads) >= 6, [r[:40] for r in reads]
    first = chunks[0][0]
    # the first event is in the client's hands ~6 intervals before the stream ends
    print(f"first event after {first - start:.3f} s, stream ended after {end - start:.3f} s")
    assert first - start < 2 * script.interval
    assert end - first > 4 * script.interval


async def test_sse_response_headers_are_kept_and_no_compression_is_added(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    async with http.post(
        gateway.url + CHAT,
        json=chat_body(),
        headers={"Accept-Encoding": "gzip, deflate, br"},
        auto_decompress=False,
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream;charset=UTF-8"
        assert resp.headers["Cache-Control"] == "no-cache"
        assert resp.headers["X-Accel-Buffering"] == "no"
        assert "Content-Encoding" not in resp.headers
        assert "Content-Length" not in resp.headers
        assert resp.headers["X-Request-Id"]
        body = await resp.read()
    assert body.startswith(b"data: {") and body.endswith(b"data: [DONE]\n\n")


async def test_inter_arrival_gaps_follow_the_upstream_interval(
    cloud: FakeCloud, gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    script = cloud.modelarts.script
    script.events, script.interval = 20, 0.05
    async with http.post(gateway.url + CHAT, json=chat_body()) as resp:
        chunks = await read_chunks(resp)
    assert sum(len(sse_blocks(c)) for _, c in chunks) == 23
    # one read per event; allow a couple merged by a busy test loop (the machine is shared)
    assert len(chunks) >= 20
    gaps = [t1 - t0 for (t0, _), (t1, _) in itertools.pairwise(chunks)]
    median = statistics.median(gaps)
    print(
        f"inter-arrival with a {script.interval * 1000:.0f} ms upstream interval: "
        f"median {median * 1000:.1f} ms, min {min(gaps) * 1000:.1f} ms, "
        f"max {max(gaps) * 1000:.1f} ms over {len(gaps)} gaps"
    )
    assert 0.03 < median < 0.15
    assert sum(g < 0.01 for g in gaps) <= 3, "events arrived bunched together"


async def test_delay_between_an_upstream_write_and_the_client_read_is_small(
    raw: tuple[RawUpstream, str], make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = raw
    upstream.chunks = [f"data: {i}\n\n".encode() for i in range(40)]
    upstream.interval = 0.02
    gw = await make_gateway(with_raw_route(url))
    async with http.post(gw.url + "/raw/v1/sse", data=b"{}") as resp:
        chunks = await read_chunks(resp)
    arrival: dict[int, float] = {}
    for t, chunk in chunks:
        for block in sse_blocks(chunk):
            arrival[int(block.removeprefix(b"data: "))] = t
    assert sorted(arrival) == list(range(40))
    delays = sorted(arrival[i] - upstream.write_times[i] for i in range(40))
    median, p95 = statistics.median(delays), delays[int(0.95 * (len(delays) - 1))]
    print(
        f"upstream write -> client read through the gateway: median {median * 1000:.2f} ms, "
        f"p95 {p95 * 1000:.2f} ms, max {delays[-1] * 1000:.2f} ms"
    )
    assert median < 0.05
    assert delays[-1] < 0.5


# --- heartbeats -----------------------------------------------------------------------------------


async def test_heartbeat_is_sent_between_events_after_upstream_silence(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(tuned(heartbeat=0.1))
    script = cloud.modelarts.script
    script.events, script.interval = 2, 0.35
    async with http.post(gw.url + CHAT, json=chat_body()) as resp:
        body = await resp.read()
    kinds = [check_block(b) for b in sse_blocks(body)]
    beats = kinds.count("heartbeat")
    assert beats >= 3, kinds  # 4 silences of 0.35 s with a 0.1 s heartbeat
    assert kinds[-1] == "done"
    assert [k for k in kinds if k != "heartbeat"] == ["data"] * 4 + ["done"]
    assert gw.metric("gateway_heartbeats_total", route="chat") == beats
    # heartbeats are the gateway's own: without them the bytes are the upstream's
    assert b"keep-alive" not in body.replace(b": keep-alive\n\n", b"")


async def test_heartbeat_never_appears_inside_a_split_event(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(tuned(heartbeat=0.1))
    script = cloud.modelarts.script
    # each event is written in two halves 0.3 s apart: three heartbeat periods inside an event
    script.events, script.split_events, script.split_pause, script.interval = 1, True, 0.3, 0.3
    async with http.post(gw.url + CHAT, json=chat_body()) as resp:
        chunks = await read_chunks(resp)
    body = b"".join(c for _, c in chunks)
    kinds = [check_block(b) for b in sse_blocks(body)]  # fails on a heartbeat inside an event
    assert [k for k in kinds if k != "heartbeat"] == ["data"] * 3 + ["done"]
    assert kinds.count("heartbeat") >= 2, kinds  # the pauses between events do get them
    assert gw.metric("gateway_heartbeats_total", route="chat") == kinds.count("heartbeat")
    # and the halves really were relayed separately, with the pause in between
    assert any(not c.endswith(b"\n\n") for _, c in chunks)


async def test_heartbeat_zero_disables_heartbeats(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(tuned(heartbeat=0))
    script = cloud.modelarts.script
    script.events, script.interval = 1, 0.3
    async with http.post(gw.url + CHAT, json=chat_body()) as resp:
        body = await resp.read()
    assert b"keep-alive" not in body
    assert body.endswith(b"data: [DONE]\n\n")
    assert gw.metric("gateway_heartbeats_total", route="chat") == 0


# --- timeouts and upstream faults -----------------------------------------------------------------


async def test_idle_timeout_after_headers_sends_an_error_event_then_ends(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(tuned(idle=0.3, heartbeat=0))
    fake = cloud.modelarts
    fake.script.stall_after = 2  # role chunk and one token, then silence
    fake.stream_closed.clear()
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with http.post(gw.url + CHAT, json=chat_body()) as resp:
        assert resp.status == 200
        body = await resp.read()  # a clean end of the body: the event says what happened
    elapsed = loop.time() - start
    kinds = [check_block(b) for b in sse_blocks(body)]
    assert kinds == ["data", "data", "error"]
    error = error_of(body)
    assert error["code"] == "upstream_idle_timeout"
    assert error["type"] == "timeout"
    assert 0.25 < elapsed < 2.5
    await asyncio.wait_for(fake.stream_closed.wait(), WAIT)  # the upstream request was closed
    assert fake.disconnects == 1
    assert gw.metric("gateway_stream_end_total", route="chat", reason="idle_timeout") == 1


async def test_total_timeout_mid_stream_sends_a_total_timeout_event(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(tuned(total=0.6, idle=5, heartbeat=0))
    script = cloud.modelarts.script
    script.events, script.interval = 50, 0.1
    async with http.post(gw.url + CHAT, json=chat_body()) as resp:
        assert resp.status == 200
        body = await resp.read()
    kinds = [check_block(b) for b in sse_blocks(body)]
    assert kinds[-1] == "error" and "done" not in kinds
    assert 1 <= kinds.count("data") < 20
    assert error_of(body)["code"] == "upstream_total_timeout"
    assert gw.metric("gateway_stream_end_total", route="chat", reason="total_timeout") == 1


async def test_total_timeout_before_the_headers_is_a_504(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(tuned(total=0.3, first_byte=5))
    cloud.modelarts.script.header_delay = 5
    async with http.post(gw.url + CHAT, json=chat_body()) as resp:
        assert resp.status == 504
        assert_openai_error(await resp.json(), "upstream_total_timeout")


async def test_stall_inside_an_event_closes_the_connection_without_a_clean_end(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(tuned(idle=0.3, heartbeat=0.1))
    fake = cloud.modelarts
    # the first event's second half never comes (within the test): a stall mid-event
    fake.script.split_events, fake.script.split_pause = True, 30
    fake.stream_closed.clear()
    async with http.post(gw.url + CHAT, json=chat_body()) as resp:
        assert resp.status == 200
        received, error = await read_until_error(resp)
    assert isinstance(error, aiohttp.ClientPayloadError)
    assert received.startswith(b"data: {") and b"\n\n" not in received  # half an event, no more
    await asyncio.wait_for(fake.stream_closed.wait(), WAIT)
    assert gw.metric("gateway_stream_end_total", route="chat", reason="idle_timeout") == 1
    assert gw.metric("gateway_heartbeats_total", route="chat") == 0


async def test_upstream_reset_mid_stream_is_never_a_clean_end_and_the_gateway_carries_on(
    cloud: FakeCloud, gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    script = cloud.modelarts.script
    script.events, script.reset_after = 10, 3
    async with http.post(gateway.url + CHAT, json=chat_body()) as resp:
        assert resp.status == 200
        received, error = await read_until_error(resp)
    # the fake resets between events, so the gateway can (and must) say so in the stream
    assert error is None
    kinds = [check_block(b) for b in sse_blocks(received)]
    assert kinds == ["data"] * 3 + ["error"]
    assert error_of(received)["code"] == "upstream_error"
    assert gateway.metric("gateway_stream_end_total", route="chat", reason="upstream_error") == 1

    script.reset_after = None
    async with http.post(gateway.url + CHAT, json=chat_body()) as resp:
        assert resp.status == 200
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    async with http.get(gateway.url + "/healthz") as resp:
        assert resp.status == 200


async def test_upstream_reset_inside_an_event_closes_the_connection_without_a_clean_end(
    raw: tuple[RawUpstream, str], make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = raw
    upstream.chunks, upstream.then = [b"data: 1\n\n", b'data: {"half'], "abort"
    gw = await make_gateway(with_raw_route(url))
    async with http.post(gw.url + "/raw/v1/sse", data=b"{}") as resp:
        assert resp.status == 200
        received, error = await read_until_error(resp)
    assert isinstance(error, aiohttp.ClientPayloadError)
    assert received == b"".join(upstream.chunks)  # no error event spliced into the half event
    assert gw.metric("gateway_stream_end_total", route="raw", reason="upstream_error") == 1


async def test_upstream_reset_before_answering_is_a_502(
    cloud: FakeCloud, gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    cloud.modelarts.script.reset_after = 0
    async with http.post(gateway.url + CHAT, json=chat_body(stream=False)) as resp:
        assert resp.status == 502
        assert resp.headers["X-Request-Id"]
        assert_openai_error(await resp.json(), "upstream_unreachable")


async def test_no_headers_within_first_byte_is_a_504_and_closes_the_upstream_request(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(tuned(first_byte=0.3))
    fake = cloud.modelarts
    fake.script.header_delay = 30
    fake.stream_closed.clear()
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with http.post(gw.url + CHAT, json=chat_body()) as resp:
        assert resp.status == 504
        assert resp.content_type == "application/json"
        assert resp.headers["X-Request-Id"]
        body = await resp.json()
    assert 0.25 < loop.time() - start < 2.5
    assert_openai_error(body, "upstream_timeout")
    assert body["error"]["type"] == "timeout"
    await asyncio.wait_for(fake.stream_closed.wait(), WAIT)
    assert fake.disconnects == 1


async def test_unreachable_upstream_is_a_502(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession, request: pytest.FixtureRequest
) -> None:
    # A port held bound but not listening refuses connections, and no other process can take it
    # while the test runs (a port that was merely free could be taken by a parallel test).
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]

    def edit(config: dict[str, Any]) -> None:
        config["routes"][0]["upstream"] = f"http://127.0.0.1:{port}/v1/infers/gone"

    gw = await make_gateway(edit)
    request.addfinalizer(holder.close)
    async with http.post(gw.url + CHAT, json=chat_body()) as resp:
        assert resp.status == 502
        assert resp.headers["X-Request-Id"]
        body = await resp.json()
    assert_openai_error(body, "upstream_unreachable")
    assert str(port) not in json.dumps(body)  # no internals in the error body


async def test_a_non_sse_body_cut_by_an_upstream_reset_is_not_a_clean_end(
    raw: tuple[RawUpstream, str], make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = raw
    upstream.content_type = "application/json"
    upstream.chunks, upstream.then = [b'{"choices": [{"message": '], "abort"
    gw = await make_gateway(with_raw_route(url))
    async with http.post(gw.url + "/raw/v1/chat/completions", data=b"{}") as resp:
        assert resp.status == 200
        received, error = await read_until_error(resp)
    assert isinstance(error, aiohttp.ClientPayloadError)
    assert received == upstream.chunks[0]
    assert gw.metric("gateway_stream_end_total", route="raw", reason="upstream_error") == 1


async def test_a_small_sized_body_cut_by_an_upstream_reset_is_a_502_before_any_header(
    raw: tuple[RawUpstream, str], make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    # a small answer of known length is read whole before the client gets headers, so a cut
    # can still be reported as an error status
    upstream, url = raw
    upstream.content_type = "application/json"
    upstream.chunks, upstream.then = [b'{"choices": [{"message": '], "abort"
    upstream.extra_headers["Content-Length"] = "100"
    gw = await make_gateway(with_raw_route(url))
    async with http.post(gw.url + "/raw/v1/chat/completions", data=b"{}") as resp:
        assert resp.status == 502
        body = await resp.json()
    assert body["error"]["code"] == "upstream_error"
    assert gw.metric("gateway_requests_total", route="raw", status="502") == 1


async def test_a_non_sse_body_stalled_past_idle_is_cut_not_ended(
    raw: tuple[RawUpstream, str], make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = raw
    upstream.content_type = "application/json"
    upstream.chunks, upstream.then = [b'{"choices": [{"message": '], "stall"
    gw = await make_gateway(with_raw_route(url, idle=0.3))
    async with http.post(gw.url + "/raw/v1/chat/completions", data=b"{}") as resp:
        assert resp.status == 200
        received, error = await read_until_error(resp)
    assert isinstance(error, aiohttp.ClientPayloadError)
    assert received == upstream.chunks[0]
    await asyncio.wait_for(upstream.closed.wait(), WAIT)  # and the upstream request is closed
    assert gw.metric("gateway_stream_end_total", route="raw", reason="idle_timeout") == 1


async def test_a_small_upstream_error_whose_body_stalls_is_answered_within_idle(
    raw: tuple[RawUpstream, str], make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    # headers say 100 bytes of JSON error follow; 12 come, then silence
    upstream, url = raw
    upstream.status, upstream.content_type = 429, "application/json"
    upstream.extra_headers["Content-Length"] = "100"
    upstream.chunks, upstream.then = [b'{"error_code'], "stall"
    gw = await make_gateway(with_raw_route(url, idle=0.3))
    async with http.post(
        gw.url + "/raw/v1/chat/completions",
        data=b"{}",
        headers={"X-Request-Id": "stalled-error"},
        timeout=aiohttp.ClientTimeout(total=3),  # fail fast instead of hanging the test
    ) as resp:
        assert resp.status == 504  # the upstream went silent: its idle timeout, not a 502
        assert resp.headers["X-Request-Id"] == "stalled-error"
        assert (await resp.json())["error"]["code"] == "upstream_idle_timeout"
    await asyncio.wait_for(upstream.closed.wait(), WAIT)


async def test_a_small_upstream_error_whose_body_is_cut_is_a_502_json(
    raw: tuple[RawUpstream, str], make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    upstream, url = raw
    upstream.status, upstream.content_type = 500, "application/json"
    upstream.extra_headers["Content-Length"] = "100"
    upstream.chunks, upstream.then = [b'{"error_code'], "abort"
    gw = await make_gateway(with_raw_route(url))
    async with http.post(
        gw.url + "/raw/v1/chat/completions", data=b"{}", headers={"X-Request-Id": "cut-error"}
    ) as resp:
        assert resp.status == 502
        assert resp.headers["X-Request-Id"] == "cut-error"
        assert_openai_error(await resp.json(), "upstream_error")


async def test_idle_and_total_zero_mean_no_limit(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(tuned(idle=0, total=0, heartbeat=0))
    script = cloud.modelarts.script
    script.events, script.interval = 3, 0.1
    async with http.post(gw.url + CHAT, json=chat_body()) as resp:
        assert resp.status == 200
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    assert gw.metric("gateway_stream_end_total", route="chat", reason="done") == 1


async def test_a_stalled_stream_does_not_hold_up_other_requests(
    cloud: FakeCloud,
    raw: tuple[RawUpstream, str],
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    upstream, url = raw
    upstream.chunks, upstream.then = [b"data: 1\n\n"], "stall"
    gw = await make_gateway(with_raw_route(url, idle=30))
    async with http.post(gw.url + "/raw/v1/sse", data=b"{}") as stalled:
        assert await stalled.content.readany() == b"data: 1\n\n"
        for _ in range(3):  # meanwhile, other clients are served at once
            async with http.post(gw.url + CHAT, json=chat_body()) as resp:
                assert (await resp.read()).endswith(b"data: [DONE]\n\n")
        async with http.get(gw.url + "/healthz") as resp:
            assert resp.status == 200
        assert gw.metric("gateway_active_streams", route="raw") == 1
        stalled.close()
    await asyncio.wait_for(upstream.closed.wait(), WAIT)


# --- clients that go away -------------------------------------------------------------------------


async def test_client_disconnect_mid_stream_closes_the_upstream_request_at_once(
    cloud: FakeCloud, gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    fake = cloud.modelarts
    fake.script.events, fake.script.interval = 100, 0.2
    fake.stream_closed.clear()
    async with http.post(gateway.url + CHAT, json=chat_body()) as resp:
        assert resp.status == 200
        assert (await resp.content.readany()).startswith(b"data: ")
        loop = asyncio.get_running_loop()
        gone = loop.time()
        resp.close()  # drop the connection mid-stream
    await asyncio.wait_for(fake.stream_closed.wait(), WAIT)
    print(f"upstream closed {(loop.time() - gone) * 1000:.1f} ms after the client went away")
    assert fake.disconnects == 1
    assert fake.open_streams == 0
    await until(
        lambda: gateway.metric("gateway_stream_end_total", route="chat", reason="client_gone") == 1
    )
    await until(lambda: gateway.metric("gateway_requests_total", route="chat", status="499") == 1)
    assert gateway.metric("gateway_active_streams", route="chat") == 0


async def test_client_disconnect_while_waiting_for_the_first_byte_closes_the_upstream_request(
    cloud: FakeCloud, gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    fake = cloud.modelarts
    fake.script.header_delay = 30
    fake.stream_closed.clear()

    async def call() -> None:
        async with http.post(gateway.url + CHAT, json=chat_body()) as resp:
            await resp.read()

    task = asyncio.create_task(call())
    await until(lambda: fake.open_streams == 1)  # the upstream is working on it
    task.cancel()  # the client gives up before any header arrived
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await asyncio.wait_for(fake.stream_closed.wait(), WAIT)
    assert fake.disconnects == 1
    await until(lambda: gateway.metric("gateway_requests_total", route="chat", status="499") == 1)
    async with http.get(gateway.url + "/healthz") as resp:
        assert resp.status == 200


# --- request ids ----------------------------------------------------------------------------------


async def test_the_clients_request_id_is_echoed_and_forwarded_upstream(
    cloud: FakeCloud, gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    for stream in (True, False):
        rid = f"client-id-{stream}"
        async with http.post(
            gateway.url + CHAT, json=chat_body(stream=stream), headers={"X-Request-Id": rid}
        ) as resp:
            assert resp.status == 200
            assert resp.headers["X-Request-Id"] == rid
            await resp.read()
        assert sent_upstream(cloud)["X-Request-Id"] == rid


@pytest.mark.parametrize("given", [None, "has spaces in it", "x" * 200, "semi;colon"])
async def test_a_fresh_request_id_is_made_when_none_or_an_unusable_one_is_given(
    cloud: FakeCloud, gateway: RunningGateway, http: aiohttp.ClientSession, given: str | None
) -> None:
    headers = {} if given is None else {"X-Request-Id": given}
    seen = []
    for _ in range(2):
        async with http.post(gateway.url + CHAT, json=chat_body(), headers=headers) as resp:
            rid = resp.headers["X-Request-Id"]
            await resp.read()
        assert rid and rid != given and re.fullmatch(r"[A-Za-z0-9._:\-]{1,128}", rid)
        assert sent_upstream(cloud)["X-Request-Id"] == rid
        seen.append(rid)
    assert seen[0] != seen[1]


ErrorCase = Callable[[FakeCloud, GatewayFactory], Awaitable[tuple[RunningGateway, str, Any]]]


async def _no_route(cloud: FakeCloud, make: GatewayFactory) -> tuple[RunningGateway, str, Any]:
    return await make(), "/nowhere", chat_body()


async def _too_large(cloud: FakeCloud, make: GatewayFactory) -> tuple[RunningGateway, str, Any]:
    def edit(config: dict[str, Any]) -> None:
        config["routes"][0]["max_body"] = 100

    return await make(edit), CHAT, chat_body(padding="x" * 1000)


async def _first_byte(cloud: FakeCloud, make: GatewayFactory) -> tuple[RunningGateway, str, Any]:
    cloud.modelarts.script.header_delay = 30
    return await make(tuned(first_byte=0.2)), CHAT, chat_body()


async def _unreachable(cloud: FakeCloud, make: GatewayFactory) -> tuple[RunningGateway, str, Any]:
    port = free_port()

    def edit(config: dict[str, Any]) -> None:
        config["routes"][0]["upstream"] = f"http://127.0.0.1:{port}/v1/infers/gone"

    return await make(edit), CHAT, chat_body()


async def _upstream_429(cloud: FakeCloud, make: GatewayFactory) -> tuple[RunningGateway, str, Any]:
    cloud.modelarts.script.status = 429
    return await make(), CHAT, chat_body()


async def _upstream_400(cloud: FakeCloud, make: GatewayFactory) -> tuple[RunningGateway, str, Any]:
    return await make(), CHAT, {"model": "qwen2-7b"}  # no messages: vLLM-style 400


@pytest.mark.parametrize(
    ("case", "status"),
    [
        (_no_route, 404),
        (_too_large, 413),
        (_first_byte, 504),
        (_unreachable, 502),
        (_upstream_429, 429),
        (_upstream_400, 400),
    ],
)
async def test_error_responses_carry_the_clients_request_id(
    cloud: FakeCloud,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    case: ErrorCase,
    status: int,
) -> None:
    gw, path, body = await case(cloud, make_gateway)
    async with http.post(gw.url + path, json=body, headers={"X-Request-Id": "err-123"}) as resp:
        assert resp.status == status
        await resp.read()
        assert resp.headers.getall("X-Request-Id") == ["err-123"]


# --- non-streaming and upstream errors ------------------------------------------------------------


async def test_non_streaming_json_is_relayed_intact_with_its_status(
    cloud: FakeCloud, gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    cloud.modelarts.script.events = 3
    async with http.post(gateway.url + CHAT, json=chat_body(stream=False)) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        via_gateway = await resp.read()
        assert resp.headers["Content-Length"] == str(len(via_gateway))
    async with http.post(
        cloud.service_url + CHAT,
        json=chat_body(stream=False),
        headers={"X-Auth-Token": token_of(cloud)},
    ) as resp:
        direct = await resp.read()
    assert normalise(via_gateway) == normalise(direct)
    data = json.loads(via_gateway)
    assert data["choices"][0]["message"]["content"] == "token0 token1 token2 "
    assert gateway.metric("gateway_requests_total", route="chat", status="200") == 1


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize(
    ("status", "code", "message"),
    [
        (429, "APIG.0308", "The throttling threshold has been reached."),
        (503, "APIG.0613", "The IAM service is currently unavailable."),
        (404, "APIG.0101", "The API does not exist or has not been published in the environment."),
    ],
)
async def test_an_apig_error_is_reshaped_into_the_openai_shape_with_the_same_status(
    cloud: FakeCloud,
    gateway: RunningGateway,
    http: aiohttp.ClientSession,
    stream: bool,
    status: int,
    code: str,
    message: str,
) -> None:
    cloud.modelarts.script.status = status
    async with http.post(gateway.url + CHAT, json=chat_body(stream=stream)) as resp:
        assert resp.status == status
        assert resp.content_type == "application/json"
        body = await resp.json()
        upstream_id = resp.headers["X-Upstream-Request-Id"]  # APIG's, for support (issue 9)
    assert_openai_error(body, code)
    assert body["error"]["message"] == f"{message} (upstream request id {upstream_id})"
    assert body["error"]["type"] == "upstream_error"


async def test_an_openai_shaped_upstream_error_passes_through_unchanged(
    cloud: FakeCloud, gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    async with http.post(gateway.url + CHAT, json={"model": "qwen2-7b"}) as resp:
        assert resp.status == 400
        body = await resp.json()
    assert body["object"] == "error" and body["code"] == 400  # vLLM's own shape, as sent


# --- memory: a 100 MB stream through a gateway process --------------------------------------------


MAX_GROWTH = 3 * 1024 * 1024  # RSS growth allowed while 100 MiB stream through


def _vm(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` memory field in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{field} not in /proc/{pid}/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("client_pause", [0.0, 1.5], ids=["fast-client", "client-stops-reading"])
async def test_a_100mb_stream_keeps_the_gateway_process_rss_flat(
    cloud: FakeCloud, tmp_path: Path, http: aiohttp.ClientSession, client_pause: float
) -> None:
    # with client_pause, the client stops reading after the first chunk while the upstream
    # writes as fast as it can: flow control must hold the upstream back, not the gateway's memory
    port = free_port()
    config = base_config(cloud)
    config["listen"]["port"] = port
    config["routes"][0]["timeouts"] = {"connect": 2, "first_byte": 5, "idle": 5, "total": 60}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    log_path = tmp_path / "gateway.log"
    log = log_path.open("wb")
    proc = await start_gateway_process(
        "--config",
        str(path),
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(url, proc, within=15, log=log_path.read_text)

        script = cloud.modelarts.script
        # warm up: token, connection pool, code paths
        script.events, script.payload_size = 20, 64 * 1024
        async with http.post(url + CHAT, json=chat_body()) as resp:
            assert resp.status == 200
            await resp.read()
        before = _vm(proc.pid, "VmRSS")

        script.events = 1600  # 1600 x 64 KiB of content: ~105 MB of SSE
        peak = before
        total = 0
        loop = asyncio.get_running_loop()
        start = loop.time()
        async with http.post(url + CHAT, json=chat_body()) as resp:
            assert resp.status == 200
            tail = b""
            async for chunk in resp.content.iter_any():  # read and discard
                total += len(chunk)
                tail = (tail + chunk)[-64:]
                peak = max(peak, _vm(proc.pid, "VmRSS"))
                if client_pause and total == len(chunk):
                    for _ in range(int(client_pause / 0.1)):
                        await asyncio.sleep(0.1)  # not reading: the pause is the scenario
                        peak = max(peak, _vm(proc.pid, "VmRSS"))
        assert tail.endswith(b"data: [DONE]\n\n")
        elapsed = loop.time() - start
        after = _vm(proc.pid, "VmRSS")
        hwm = _vm(proc.pid, "VmHWM")
        mib = 1024 * 1024
        print(
            f"{total / mib:.1f} MiB streamed in {elapsed:.2f} s "
            f"({total / mib / elapsed:.0f} MiB/s); "
            f"gateway RSS before {before / mib:.1f} MiB, sampled peak {peak / mib:.1f} MiB "
            f"(+{(peak - before) / mib:.1f}), after {after / mib:.1f} MiB "
            f"(+{(after - before) / mib:.1f}), VmHWM {hwm / mib:.1f} MiB"
        )
        assert total > 100 * 1000 * 1000
        # measured +0.6 to +0.9 MiB at the peak either way (issue 9); the README promises under
        # 3 MiB, so does this bound; VmHWM also catches a peak between two samples
        assert peak - before < MAX_GROWTH
        assert hwm - before < MAX_GROWTH
        assert after - before < MAX_GROWTH

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        await stop_process(proc)
        log.close()
