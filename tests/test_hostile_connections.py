"""Issue 8, items 4 and 5: no client without a key can hold the gateway's connections, and a
request is refused before its body is uploaded or buffered. Raw sockets against an upstream
that records the exact bytes it receives; every timeout is short so the suite stays fast."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from conftest import (
    RAW_WAIT,
    RawAnswer,
    RecordingUpstream,
    RunningGateway,
    open_raw,
    raw_exchange,
    read_answer,
    request_bytes,
    start_gateway,
    write_raw,
)
from yarl import URL

from gateway.config.load import parse_settings
from gateway.proxy import failures

TOKEN = "gateway-token-" + "T" * 40
KEY = "team-key-" + "K" * 32  # a team key (listen.api_keys), long enough for the config
WRONG_KEY = "guessed-key-" + "G" * 30
BODY = b'{"model":"m","messages":[]}'
CHAT = "/v1/chat/completions"

Start = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
async def start(recording: RecordingUpstream) -> AsyncIterator[Start]:
    """A gateway in front of ``recording`` (or ``upstream``); ``listen`` and ``route`` keys
    are merged into its config, ``team=True`` adds the key ``KEY``."""
    started: list[RunningGateway] = []

    async def factory(
        *,
        team: bool = False,
        upstream: str | None = None,
        route: dict[str, Any] | None = None,
        **listen: Any,
    ) -> RunningGateway:
        config: dict[str, Any] = {
            "listen": {"host": "127.0.0.1", "port": 0, **listen},
            "credentials": {"tok": {"type": "token", "token": TOKEN}},
            "routes": [
                {
                    "name": "a",
                    "path": "/v1",
                    "upstream": upstream or recording.url + "/v1/infers/svc-a",
                    "credential": "tok",
                    **(route or {}),
                }
            ],
        }
        if team:
            config["listen"]["api_keys"] = [{"name": "alice", "key": KEY}]
        gw = await start_gateway(parse_settings(config, {}))
        started.append(gw)
        return gw

    try:
        yield factory
    finally:
        for gw in started:
            await gw.runner.cleanup()


def host_of(gw: RunningGateway) -> str:
    return f"127.0.0.1:{URL(gw.url).port}"


def post(
    gw: RunningGateway,
    body: bytes = BODY,
    target: str = CHAT,
    key: str | None = None,
    **headers: str,
) -> bytes:
    """A whole POST request (a header ``X_Y=v`` is sent as ``X-Y: v``)."""
    fields = {name.replace("_", "-"): value for name, value in headers.items()}
    if key is not None:
        fields["Authorization"] = f"Bearer {key}"
    return request_bytes("POST", target, host_of(gw), body, fields)


def head_only(
    gw: RunningGateway, length: int, target: str = CHAT, key: str | None = None, **headers: str
) -> bytes:
    """The head of a POST announcing ``length`` body bytes, without the body."""
    whole = post(gw, b"x" * length, target, key, **headers)
    return whole[: len(whole) - length]


def error_of(answer: RawAnswer | None) -> tuple[int, str]:
    """(status, error.code) of an answer in the OpenAI error shape (asserted)."""
    assert answer is not None, "the connection closed without an answer"
    doc = json.loads(answer.body)
    assert set(doc) == {"error"}
    assert {"message", "type", "code"} <= set(doc["error"])
    assert isinstance(doc["error"]["message"], str) and doc["error"]["message"]
    return answer.status, doc["error"]["code"]


async def closed_within(reader: asyncio.StreamReader, within: float = RAW_WAIT) -> float:
    """Seconds until the server closes (asserting it sends nothing more first)."""
    loop = asyncio.get_running_loop()
    begin = loop.time()
    rest = await asyncio.wait_for(reader.read(), within)
    assert rest == b"", f"unexpected bytes before the close: {rest[:200]!r}"
    return loop.time() - begin


# --- item 4: timeouts on every request of a connection ----------------------------------------


async def test_header_timeout_applies_to_the_second_request_on_a_connection(
    start: Start,
) -> None:
    gw = await start(header_timeout="300ms", keepalive_timeout="5s")
    reader, writer = await open_raw(gw.url)
    loop = asyncio.get_running_loop()
    try:
        await write_raw(writer, post(gw))
        answer = await read_answer(reader)
        assert answer is not None and answer.status == 200
        # the idle time between requests is keepalive_timeout's, not the header timer's
        await asyncio.sleep(0.4)
        await write_raw(writer, post(gw))
        answer = await read_answer(reader)
        assert answer is not None and answer.status == 200
        # a third request whose headers trickle in a byte at a time is cut
        await write_raw(writer, f"GET /healthz HTTP/1.1\r\nHost: {host_of(gw)}\r\n".encode())
        begin = loop.time()
        eof = asyncio.ensure_future(reader.read())
        while not eof.done():
            assert loop.time() - begin < RAW_WAIT, "trickled headers held the connection"
            await write_raw(writer, b"X")
            await asyncio.wait({eof}, timeout=0.05)
        assert eof.result() == b""  # closed with no answer
        assert 0.25 <= loop.time() - begin < 2.0
    finally:
        writer.close()


async def test_keepalive_timeout_closes_an_idle_connection_after_an_answer(
    start: Start,
) -> None:
    gw = await start(keepalive_timeout="300ms")
    reader, writer = await open_raw(gw.url)
    try:
        await write_raw(writer, post(gw))
        answer = await read_answer(reader)
        assert answer is not None and answer.status == 200
        assert 0.2 <= await closed_within(reader) < 2.0
    finally:
        writer.close()


@pytest.mark.parametrize("sent", ["none", "part", "chunked"])
async def test_a_body_that_never_comes_gets_408(
    start: Start, recording: RecordingUpstream, sent: str
) -> None:
    gw = await start(body_timeout="300ms")
    if sent == "chunked":
        data = request_bytes(
            "POST", CHAT, host_of(gw), headers={"Transfer-Encoding": "chunked"}
        ).replace(b"Content-Length: 0\r\n", b"")
        data += b"5\r\nhello\r\n"  # and no last chunk
    else:
        data = head_only(gw, 100) + (b"x" * 10 if sent == "part" else b"")
    reader, writer = await open_raw(gw.url)
    loop = asyncio.get_running_loop()
    try:
        begin = loop.time()
        await write_raw(writer, data)
        answer = await read_answer(reader)
        assert 0.25 <= loop.time() - begin < 2.0
        assert error_of(answer) == (408, "request_timeout")
        assert answer is not None and answer.headers.get("Connection", "").lower() == "close"
        # (aiohttp then reads what may still come of the body for its lingering_time, 10 s,
        # before it closes: not waited for here)
    finally:
        writer.close()
    assert recording.received == []


class GatedStream:
    """A raw upstream answering every request with an event stream: its first event at once,
    the rest only once ``release`` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> GatedStream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    await reader.readexactly(int(value))
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n" + chunk(b"data: one\n\n")
            )
            await writer.drain()
            await self.release.wait()
            writer.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


@pytest.fixture
async def gated() -> AsyncIterator[GatedStream]:
    upstream = await GatedStream().start()
    try:
        yield upstream
    finally:
        upstream.release.set()
        await upstream.close()


async def test_beyond_max_connections_a_new_connection_is_closed_at_once(
    start: Start, gated: GatedStream
) -> None:
    gw = await start(upstream=gated.url, max_connections=2)
    stream_r, stream_w = await open_raw(gw.url)
    idle_r, idle_w = await open_raw(gw.url)
    try:
        await write_raw(stream_w, post(gw, b'{"model":"m","stream":true}'))
        head = await asyncio.wait_for(stream_r.readuntil(b"data: one\n\n"), RAW_WAIT)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert gw.metric("gateway_connections_refused_total") == 0
        # two open (a stream, an idle one): a third is closed before it can send anything
        extra_r, extra_w = await open_raw(gw.url)
        try:
            assert await closed_within(extra_r) < 0.5
        finally:
            extra_w.close()
        assert gw.metric("gateway_connections_refused_total") == 1
        # the stream goes on to its end, unaffected
        gated.release.set()
        rest = await asyncio.wait_for(stream_r.readuntil(b"0\r\n\r\n"), RAW_WAIT)
        assert b"data: [DONE]\n\n" in rest
        # and the idle connection, already open, is still served
        await write_raw(idle_w, request_bytes("GET", "/healthz", host_of(gw)))
        answer = await read_answer(idle_r)
        assert answer is not None and answer.status == 200
    finally:
        stream_w.close()
        idle_w.close()
    # once one has closed, a new connection is served again
    await idle_r.read()
    answer = await raw_exchange(gw.url, request_bytes("GET", "/healthz", host_of(gw)))
    assert answer is not None and answer.status == 200
    assert gw.metric("gateway_connections_refused_total") == 1


# --- item 4: a refusal by the guard ends the connection ---------------------------------------


@pytest.mark.parametrize(
    ("team", "headers", "expected"),
    [
        (True, {}, (401, "missing_api_key")),
        (True, {"Authorization": f"Bearer {WRONG_KEY}"}, (401, "invalid_api_key")),
        (False, {"Host": "evil.example"}, (403, "host_not_allowed")),
        (False, {"Origin": "http://evil.example"}, (403, "origin_not_allowed")),
        (False, {"Sec-Fetch-Site": "cross-site"}, (403, "origin_not_allowed")),
    ],
)
async def test_a_guard_refusal_closes_the_connection_after_its_answer(
    start: Start,
    recording: RecordingUpstream,
    team: bool,
    headers: dict[str, str],
    expected: tuple[int, str],
) -> None:
    gw = await start(team=team)  # keepalive_timeout: its default (60 s)
    fields = {"Host": host_of(gw), **headers}
    one = request_bytes("POST", CHAT, fields.pop("Host"), BODY, fields)
    # two requests pipelined: only the first is answered, then the connection closes
    reader, writer = await open_raw(gw.url)
    try:
        await write_raw(writer, one + one)
        answer = await read_answer(reader)
        assert error_of(answer) == expected
        assert answer is not None and answer.headers.get("Connection", "").lower() == "close"
        assert await closed_within(reader) < 1.0
    finally:
        writer.close()
    assert recording.received == []
    # a request that passes the guard keeps its connection
    good = post(gw, key=KEY if team else None)
    reader, writer = await open_raw(gw.url)
    try:
        await write_raw(writer, good + good)
        for _ in range(2):
            answer = await read_answer(reader)
            assert answer is not None and answer.status == 200
    finally:
        writer.close()


async def test_auth_failures_are_counted_and_logged_once_a_minute_per_address(
    start: Start, captured_logs: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr(failures, "monotonic", lambda: now[0])
    gw = await start(team=True)
    wrong = post(gw, key=WRONG_KEY)
    for _ in range(3):
        assert error_of(await raw_exchange(gw.url, wrong)) == (401, "invalid_api_key")
    assert error_of(await raw_exchange(gw.url, post(gw))) == (401, "missing_api_key")
    assert gw.metric("gateway_auth_failures_total", reason="invalid_api_key") == 3
    assert gw.metric("gateway_auth_failures_total", reason="missing_api_key") == 1

    def auth_lines() -> list[str]:
        return [r.getMessage() for r in captured_logs.records if r.name == "gateway.auth"]

    assert len(auth_lines()) == 1 and "127.0.0.1" in auth_lines()[0]
    # another client address is logged on its own
    parsed = URL(gw.url)
    reader, writer = await asyncio.open_connection(
        parsed.host, parsed.port, local_addr=("127.0.0.2", 0)
    )
    try:
        await write_raw(writer, wrong)
        assert error_of(await read_answer(reader)) == (401, "invalid_api_key")
    finally:
        writer.close()
    assert len(auth_lines()) == 2 and "127.0.0.2" in auth_lines()[1]
    # within the minute: counted, not logged; after it, logged again
    now[0] += 59
    assert error_of(await raw_exchange(gw.url, wrong))[0] == 401
    assert len(auth_lines()) == 2
    now[0] += 2
    assert error_of(await raw_exchange(gw.url, wrong))[0] == 401
    assert len(auth_lines()) == 3 and "127.0.0.1" in auth_lines()[2]
    assert gw.metric("gateway_auth_failures_total", reason="invalid_api_key") == 6
    # the key tried, or the real one, is never in any log line
    text = captured_logs.text + "".join(r.getMessage() for r in captured_logs.records)
    assert WRONG_KEY not in text and KEY not in text
    assert "G" * 30 not in text and "K" * 32 not in text


# --- item 5: refuse before the upload, and never buffer what cannot be served ----------------

EXPECT = {"Expect": "100-continue"}


@pytest.mark.parametrize(
    ("team", "target", "length", "key", "expected"),
    [
        (False, CHAT, 4096, None, (413, "request_too_large")),
        (True, CHAT, 100, None, (401, "missing_api_key")),
        (True, CHAT, 100, WRONG_KEY, (401, "invalid_api_key")),
        (False, "/v2/chat/completions", 100, None, (404, "route_not_found")),
    ],
)
async def test_a_refusal_the_headers_decide_comes_without_100_continue(
    start: Start,
    recording: RecordingUpstream,
    team: bool,
    target: str,
    length: int,
    key: str | None,
    expected: tuple[int, str],
) -> None:
    gw = await start(team=team, route={"max_body": 1024})
    reader, writer = await open_raw(gw.url)
    try:
        await write_raw(writer, head_only(gw, length, target, key, **EXPECT))
        answer = await read_answer(reader)  # a "100 Continue" first would be read here
        assert error_of(answer) == expected
        # the body promised after a "100 Continue" never asked for cannot be waited for
        assert answer is not None and answer.headers.get("Connection", "").lower() == "close"
    finally:
        writer.close()
    assert recording.received == []


async def test_a_request_that_passes_gets_100_continue_then_is_served(
    start: Start, recording: RecordingUpstream
) -> None:
    gw = await start(team=True)
    reader, writer = await open_raw(gw.url)
    try:
        await write_raw(writer, head_only(gw, len(BODY), key=KEY, **EXPECT))
        interim = await read_answer(reader)
        assert interim is not None and interim.status == 100 and interim.body == b""
        assert recording.received == []  # nothing goes upstream before the body
        await write_raw(writer, BODY)
        answer = await read_answer(reader)
        assert answer is not None and answer.status == 200
    finally:
        writer.close()
    (received,) = recording.received
    assert received.endswith(b"\r\n\r\n" + BODY)
    assert "\r\nexpect:" not in recording.heads[0].lower()


async def test_the_concurrency_slot_is_taken_before_the_body_is_read(
    start: Start, recording: RecordingUpstream
) -> None:
    gw = await start(route={"max_concurrency": 1})
    first_r, first_w = await open_raw(gw.url)
    try:
        # the first request's headers are in, its body is not: "100 Continue" says its slot
        # is held (it is sent once every answer the headers decide is ruled out)
        await write_raw(first_w, head_only(gw, len(BODY), **EXPECT))
        interim = await read_answer(first_r)
        assert interim is not None and interim.status == 100
        # a second request, whole, is refused at once, not queued behind the upload
        assert error_of(await raw_exchange(gw.url, post(gw))) == (429, "concurrency_limit")
        # and one that asks for 100 Continue gets the 429 instead, before its upload
        assert error_of(await raw_exchange(gw.url, head_only(gw, len(BODY), **EXPECT))) == (
            429,
            "concurrency_limit",
        )
        assert recording.received == []
        await write_raw(first_w, BODY)
        answer = await read_answer(first_r)
        assert answer is not None and answer.status == 200
    finally:
        first_w.close()
    assert len(recording.received) == 1
    # the slot is given back: the next request is served
    answer = await raw_exchange(gw.url, post(gw))
    assert answer is not None and answer.status == 200


@pytest.mark.parametrize("framing", ["content-length", "chunked", "chunked-whole"])
async def test_bodies_in_flight_beyond_max_buffered_body_get_503(
    start: Start, recording: RecordingUpstream, framing: str
) -> None:
    gw = await start(max_buffered_body=1000, route={"max_body": 1_000_000})
    body = b'{"model":"m","pad":"' + b"p" * 700 + b'"}'
    first_r, first_w = await open_raw(gw.url)
    try:
        # 700-odd bytes announced: held against the budget from the headers on
        await write_raw(first_w, head_only(gw, len(body), **EXPECT))
        interim = await read_answer(first_r)
        assert interim is not None and interim.status == 100
        if framing == "content-length":
            second = post(gw, body)
        else:
            second = request_bytes(
                "POST", CHAT, host_of(gw), headers={"Transfer-Encoding": "chunked"}
            ).replace(b"Content-Length: 0\r\n", b"")
            if framing == "chunked":
                second += chunk(body[:400])  # and more to come
            else:  # the whole body at once, read without waiting (issue 13): still counted
                second += chunk(body[:400]) + chunk(body[400:]) + b"0\r\n\r\n"
        assert error_of(await raw_exchange(gw.url, second)) == (503, "buffer_full")
        await write_raw(first_w, body)
        answer = await read_answer(first_r)
        assert answer is not None and answer.status == 200
    finally:
        first_w.close()
    assert len(recording.received) == 1
    # the budget is given back once a request ends
    answer = await raw_exchange(gw.url, post(gw, body))
    assert answer is not None and answer.status == 200


@pytest.mark.parametrize("size", [1000, 1001])
async def test_a_chunked_body_arriving_whole_is_held_to_max_body(
    start: Start, recording: RecordingUpstream, size: int
) -> None:
    gw = await start(route={"max_body": 1000})
    body = b'{"model":"m","pad":"' + b"p" * (size - 22) + b'"}'
    assert len(body) == size
    request = request_bytes(
        "POST", CHAT, host_of(gw), headers={"Transfer-Encoding": "chunked"}
    ).replace(b"Content-Length: 0\r\n", b"")
    request += chunk(body[:300]) + chunk(body[300:]) + b"0\r\n\r\n"  # one write, all of it
    answer = await raw_exchange(gw.url, request)
    if size > 1000:
        assert error_of(answer) == (413, "request_too_large")
        assert recording.received == []
    else:
        assert answer is not None and answer.status == 200
        assert recording.received[-1].endswith(b"\r\n\r\n" + body)


@pytest.mark.parametrize("limit", [None, 4096])
async def test_headers_over_max_header_bytes_get_431_and_go_nowhere(
    start: Start, recording: RecordingUpstream, limit: int | None
) -> None:
    gw = await start(**({"max_header_bytes": limit} if limit else {}))
    total = limit or 64 * 1024
    size = 1000
    fields = {f"X-Pad-{i:03d}": "v" * size for i in range(total // size + 1)}
    reader, writer = await open_raw(gw.url)
    try:
        await write_raw(writer, post(gw, **fields))
        answer = await read_answer(reader)
        assert error_of(answer) == (431, "headers_too_large")
        assert await closed_within(reader) < 1.0
    finally:
        writer.close()
    assert recording.received == []
    # a little under the limit is relayed
    fewer = {name: value for name, value in list(fields.items())[: total // size - 2]}
    answer = await raw_exchange(gw.url, post(gw, **fewer))
    assert answer is not None and answer.status == 200
    assert len(recording.received) == 1


@pytest.mark.parametrize("form", ["POST", "GET", "POST 1.0 keep-alive"])
async def test_after_a_408_the_connection_carries_no_other_request(
    start: Start, recording: RecordingUpstream, form: str
) -> None:
    """The 408's close is the error's own (``GatewayError.closes``) on every path: the direct
    one (a POST), the router's (a GET with a body) and an HTTP/1.0 keep-alive client. The rest
    of the late body then comes with a second request behind it: the connection ends with no
    answer to it (a connection kept would answer it, reading the late body as its start)."""
    gw = await start(body_timeout="300ms")
    data = head_only(gw, 100, Connection="keep-alive")
    if form == "GET":
        data = data.replace(b"POST ", b"GET ", 1)
    elif form.endswith("1.0 keep-alive"):
        data = data.replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)
    reader, writer = await open_raw(gw.url)
    try:
        await write_raw(writer, data)
        answer = await read_answer(reader)
        assert error_of(answer) == (408, "request_timeout")
        assert answer is not None
        assert answer.headers.get("Connection", "close").lower() == "close"
        await write_raw(writer, b"x" * 100 + post(gw))
        assert await closed_within(reader) < RAW_WAIT
    finally:
        writer.close()
    assert recording.received == []


async def test_a_header_holding_the_key_sent_in_two_spellings_is_dropped_not_a_500(
    start: Start, recording: RecordingUpstream
) -> None:
    """The key scrub walks the filtered headers by name and drops a name with the gateway's key
    in it, every spelling at once; sent twice in two spellings (``X-Trace`` holding the key,
    ``x-trace``), the second spelling's turn found it gone. On multidict 6.x (aiohttp 3.13's
    range) that raised KeyError: a 500 internal_error for a request the gateway should send."""
    gw = await start(team=True)
    data = post(gw, key=KEY, X_Trace=KEY)
    data = data.replace(b"\r\n\r\n", b"\r\nx-trace: b\r\n\r\n", 1)
    answer = await raw_exchange(gw.url, data)
    assert answer is not None and answer.status == 200
    assert b"x-trace" not in recording.received[0].lower()
    assert KEY.encode() not in recording.received[0]
