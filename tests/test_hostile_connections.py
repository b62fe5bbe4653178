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
    read_answer,
    request_bytes,
    start_gateway,
    write_raw,
)
from yarl import URL

from gateway.config.load import parse_settings

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
