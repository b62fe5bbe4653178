"""A small answer sent whole in one write (``gateway._aiohttp.WholeResponse``) reaches the client
byte for byte as aiohttp's own ``web.Response`` would send it.

Each answer below is read off a raw socket twice, once from ``WholeResponse`` and once from
``web.Response`` built from the same parts, and the bytes compared (only the Date value, which
moves with the clock, is masked), together with what the connection does next: a second request
on it is answered, or the connection is closed. First against a bare aiohttp application (every
request form and answer shape, the ``on_response_prepare`` hook), then through the gateway
itself (its 200s, error answers, forced closes, CORS, dropped upstream headers, access log and
metrics), with the gateway's two uses of ``WholeResponse`` swapped for ``web.Response``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import generate_latest

from gateway._aiohttp import WholeResponse
from gateway.errors import MethodNotAllowed, RateLimited
from gateway.proxy import exchange as exchange_module
from gateway.proxy import response as response_module
from gateway.proxy.exchange import error_response
from gateway.proxy.guard import add_cors
from gateway.server.state import GATEWAY
from tests.conftest import RAW_WAIT, FakeCloud, GatewayFactory

_DATE = re.compile(rb"\r\nDate: [^\r]*\r\n")
JSON = b'{"id":"x","object":"chat.completion","choices":[]}'

# what one request looks like on the wire: (method, request line version, extra header lines)
FORMS = {
    "1.1": (b"GET", b"HTTP/1.1", b""),
    "1.1 close": (b"GET", b"HTTP/1.1", b"Connection: close\r\n"),
    "1.0": (b"GET", b"HTTP/1.0", b""),
    "1.0 keep-alive": (b"GET", b"HTTP/1.0", b"Connection: keep-alive\r\n"),
    "HEAD": (b"HEAD", b"HTTP/1.1", b""),
    "POST": (b"POST", b"HTTP/1.1", b"Content-Length: 2\r\n"),
}


def _request(form: str, path: str, headers: bytes = b"") -> bytes:
    method, version, extra = FORMS[form]
    body = b"{}" if method == b"POST" else b""
    return b"%s %s %s\r\nHost: 127.0.0.1\r\n%s%s\r\n%s" % (
        method,
        path.encode(),
        version,
        extra,
        headers,
        body,
    )


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    try:
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), RAW_WAIT)
    except (asyncio.IncompleteReadError, ConnectionError):
        return b""


async def _exchange(port: int, raw: bytes, head_only: bool = False) -> tuple[bytes, str]:
    """The whole answer to ``raw`` (Date masked) and what the connection did next."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        head = await _read_head(reader)
        if not head:
            return b"", "closed without an answer"
        length = re.search(rb"\r\nContent-Length: (\d+)\r\n", head)
        body = b""
        empty = head_only or head[9:12] in (b"204", b"304")
        if length and not empty:
            body = await asyncio.wait_for(reader.readexactly(int(length[1])), RAW_WAIT)
        elif not length and not empty:  # ends with the connection
            body = await asyncio.wait_for(reader.read(), RAW_WAIT)
            return _DATE.sub(b"\r\nDate: -\r\n", head) + body, "closed"
        try:
            writer.write(b"GET /next HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-Id: next\r\n\r\n")
            await writer.drain()
            nxt = await _read_head(reader)
        except ConnectionError:
            nxt = b""
        then = nxt.split(b"\r\n", 1)[0].decode() if nxt else "closed"
        return _DATE.sub(b"\r\nDate: -\r\n", head) + body, then
    finally:
        writer.close()


# --- a bare aiohttp application -------------------------------------------------------------

Build = Callable[[type[web.Response]], web.Response]


def _cors(make: type[web.Response]) -> web.Response:
    response = make(status=200, body=JSON, headers=CIMultiDict({"X-Request-Id": "r1"}))
    add_cors(response, "https://app.example")
    return response


def _closed(make: type[web.Response]) -> web.Response:
    response = make(
        status=401, body=b'{"error":{}}', headers=CIMultiDict(), content_type="application/json"
    )
    response.force_close()
    return response


ANSWERS: dict[str, Build] = {
    "200 json": lambda make: make(
        status=200,
        reason="OK",
        body=JSON,
        headers=CIMultiDict([("Content-Type", "application/json"), ("X-Request-Id", "r1")]),
    ),
    "200 no type": lambda make: make(status=200, body=b"abc", headers=CIMultiDict()),
    "200 empty": lambda make: make(status=200, body=b"", headers=CIMultiDict()),
    "502 odd reason": lambda make: make(
        status=502, reason="Upstream Went Away", body=b"{}", headers=CIMultiDict()
    ),
    "599 no reason": lambda make: make(status=599, body=b"{}", headers=CIMultiDict()),
    "204": lambda make: make(status=204, body=b"", headers=CIMultiDict()),
    "304": lambda make: make(status=304, body=b"", headers=CIMultiDict()),
    "repeated": lambda make: make(
        status=200,
        body=b"{}",
        headers=CIMultiDict([("Vary", "A"), ("Vary", "B"), ("Server", "upstream")]),
    ),
    "own connection": lambda make: make(
        status=200, body=b"{}", headers=CIMultiDict([("Connection", "keep-alive")])
    ),
    "own date": lambda make: make(
        status=200, body=b"{}", headers=CIMultiDict([("Date", "Mon, 01 Jan 2001 00:00:00 GMT")])
    ),
    "bytearray": lambda make: make(status=200, body=bytearray(b"[1]"), headers=CIMultiDict()),
    "large": lambda make: make(status=200, body=b"z" * 70_000, headers=CIMultiDict()),
    "cors": _cors,
    "forced close": _closed,
    "header with CRLF": lambda make: make(
        status=200, body=b"{}", headers=CIMultiDict([("X-Bad", "a\r\nX-Injected: 1")])
    ),
}


@pytest.fixture
async def bare() -> AsyncIterator[int]:
    """An aiohttp application answering ``/{stock|whole}/{answer}``; its port."""

    async def answer(request: web.Request) -> web.StreamResponse:
        make = WholeResponse if request.match_info["kind"] == "whole" else web.Response
        name = request.match_info["answer"].replace("-", " ")
        if name == "gone":  # the connection is closing before the answer goes out
            assert request.transport is not None
            request.transport.close()
            name = "200 json"
        return ANSWERS[name](make)

    async def signal(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["X-Prepared"] = "yes"

    app = web.Application()
    app.router.add_route("*", "/{kind}/{answer}", answer)
    app.router.add_get("/next", answer_next)
    app.on_response_prepare.append(signal)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def answer_next(request: web.Request) -> web.Response:
    return web.Response(text="next")


@pytest.mark.parametrize("form", sorted(FORMS))
async def test_every_answer_shape_is_sent_as_aiohttp_sends_it(bare: int, form: str) -> None:
    for name in ANSWERS:
        path = name.replace(" ", "-")
        got = {
            kind: await _exchange(bare, _request(form, f"/{kind}/{path}"), form == "HEAD")
            for kind in ("stock", "whole")
        }
        assert got["whole"] == got["stock"], (form, name)
        if name == "header with CRLF":
            assert got["whole"][0] == b"", "a header with CR/LF must not go out"
        elif name not in ("204", "304") and form != "HEAD":
            assert b"X-Prepared: yes" in got["whole"][0], (form, name)


async def test_nothing_is_written_once_the_connection_is_closing(bare: int) -> None:
    for kind in ("stock", "whole"):
        answer = await _exchange(bare, _request("1.1", f"/{kind}/gone"))
        assert answer == (b"", "closed without an answer"), kind


async def test_pipelined_requests_are_answered_in_order(bare: int) -> None:
    """Two requests in one packet: the second waits for the first's whole answer."""
    raw = _request("1.1", "/whole/200-json") + _request("1.1", "/whole/repeated")
    reader, writer = await asyncio.open_connection("127.0.0.1", bare)
    try:
        writer.write(raw)
        first = await _read_head(reader)
        assert b"X-Request-Id: r1" in first
        assert await reader.readexactly(len(JSON)) == JSON
        second = await _read_head(reader)
        assert b"Vary: A\r\nVary: B\r\n" in second
        assert await reader.readexactly(2) == b"{}"
    finally:
        writer.close()


@pytest.mark.parametrize("make", [WholeResponse, web.Response])
async def test_an_answer_to_a_client_that_does_not_read_waits_before_the_next_request(
    make: type[web.Response],
) -> None:
    """Backpressure: with the client not reading, write_eof() waits (aiohttp's drain) until the
    transport has room again, so no next request is handled while the transport is paused;
    once the client reads, every byte arrives in order."""
    paused = asyncio.Event()
    paused_at_entry: list[bool] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        protocol = request.protocol
        paused_at_entry.append(protocol.writing_paused)
        writer = request.writer
        drain = writer.drain

        async def watched_drain() -> None:  # what both answers call to wait for the client
            if protocol.writing_paused:
                paused.set()
            await drain()

        writer.drain = watched_drain  # type: ignore[method-assign]
        return make(status=200, body=b"z" * 70_000, headers=CIMultiDict())

    app = web.Application()
    app.router.add_get("/large", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    count = 300  # 300 x 70 kB: beyond the socket buffers and the transport's high water mark
    reader, writer = await asyncio.open_connection("127.0.0.1", runner.addresses[0][1])
    try:
        writer.write(_request("1.1", "/large") * count)
        await asyncio.wait_for(paused.wait(), 10)  # not reading until the server waits
        for _ in range(count):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), RAW_WAIT)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"\r\nContent-Length: 70000\r\n" in head
            assert await asyncio.wait_for(reader.readexactly(70_000), RAW_WAIT) == b"z" * 70_000
    finally:
        writer.close()
        await runner.cleanup()
    assert len(paused_at_entry) == count
    assert not any(paused_at_entry), "a request was handled while the transport was paused"


# --- through the gateway ----------------------------------------------------------------------


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    """An upstream whose answers carry headers the gateway must drop or keep; its URL."""

    async def answer(request: web.Request) -> web.StreamResponse:
        kind = request.match_info["kind"]
        headers = CIMultiDict(
            [
                ("Content-Type", "application/json"),
                ("X-Upstream-Own", "kept"),
                ("Set-Cookie", "session=upstream"),
                ("X-Subject-Token", "secret-token"),
                ("Connection", "X-Hop"),
                ("X-Hop", "dropped because Connection names it"),
                ("Keep-Alive", "timeout=5"),
                ("Server", "upstream-server"),
            ]
        )
        if kind == "apig":
            headers["X-Request-Id"] = "0123456789abcdef0123456789abcdef"
            body = json.dumps({"error_code": "APIG.0308", "error_msg": "too fast"}).encode()
            return web.Response(status=429, body=body, headers=headers)
        if kind == "error":
            return web.Response(status=503, reason="Busy Upstream", body=b"{}", headers=headers)
        if kind == "empty":
            return web.Response(status=204, headers=headers)
        usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        body = json.dumps({"id": "c", "object": "chat.completion", "usage": usage}).encode()
        return web.Response(status=200, body=body, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/v1/{kind}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


KEY = "sk-whole-response-test"
AUTH = b"Authorization: Bearer %s\r\n" % KEY.encode()
ORIGIN = b"Origin: https://app.example\r\n"
RID = b"X-Request-Id: fixed-id\r\n"

# (form, path, headers): proxied answers, the gateway's own errors, forced closes
GATEWAY_REQUESTS = [
    (form, path, AUTH + RID + extra)
    for form in ("POST", "1.1", "1.1 close", "1.0", "1.0 keep-alive")
    for path in ("/v1/ok", "/v1/apig", "/v1/error", "/v1/empty")
    for extra in (b"", ORIGIN)
] + [
    ("POST", "/v1/ok", RID),  # no key: 401, closed after
    ("POST", "/v1/ok", AUTH + RID + b"Origin: https://evil.example\r\n"),  # 403, closed
    ("1.1", "/v1/ok", b"X-Request-Id: fixed-id\r\n" + ORIGIN),  # 401 with CORS
    ("POST", "/elsewhere", AUTH + RID),  # 404
    ("HEAD", "/v1/ok", AUTH + RID),  # HEAD: aiohttp's own path
    ("POST", "/v1/limited", AUTH + RID),  # 405 with Allow
    ("1.0", "/v1/limited", AUTH + RID),
]


DRAINING = [("POST", "/v1/ok", AUTH + RID), ("1.0 keep-alive", "/v1/ok", AUTH + RID)]


def _config(upstream_url: str) -> Callable[[dict[str, Any]], None]:
    def edit(config: dict[str, Any]) -> None:
        config["listen"]["api_keys"] = [{"name": "team", "key": KEY}]
        config["listen"]["allowed_origins"] = ["https://app.example"]
        route = config["routes"][0]
        route["upstream"] = upstream_url
        config["routes"].append(
            {**route, "name": "limited", "path": "/v1/limited", "methods": ["GET"]}
        )

    return edit


async def _gateway_answers(
    make_gateway: GatewayFactory, upstream_url: str, caplog: pytest.LogCaptureFixture
) -> tuple[list[tuple[bytes, str]], list[dict[str, Any]], str]:
    gw = await make_gateway(_config(upstream_url))
    port = int(gw.url.rsplit(":", 1)[1])
    caplog.clear()
    answers = [
        await _exchange(port, _request(form, path, headers), form == "HEAD")
        for form, path, headers in GATEWAY_REQUESTS
    ]
    # the drain (SIGTERM): a request that comes after it began gets 503 and a close
    gw.app[GATEWAY].proxy.draining = True
    for form in ("POST", "1.0 keep-alive"):
        answers.append(await _exchange(port, _request(form, "/v1/ok", AUTH + RID)))
    lines = [
        {k: v for k, v in r.access.items() if k not in ("duration_ms", "ttfb_ms")}
        for r in caplog.records
        if r.name == "gateway.access"
    ]
    text = "\n".join(
        line
        for line in generate_latest(gw.metrics.registry).decode().splitlines()
        if line.startswith(("gateway_requests_total", "gateway_stream_end", "gateway_tokens"))
        and "_created" not in line
    )
    await gw.runner.cleanup()
    return answers, lines, text


async def test_the_gateway_sends_what_it_sent_with_aiohttps_response(
    make_gateway: GatewayFactory,
    cloud: FakeCloud,
    upstream: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO)
    whole = await _gateway_answers(make_gateway, upstream, caplog)
    monkeypatch.setattr(response_module, "WholeResponse", web.Response)
    monkeypatch.setattr(exchange_module, "WholeResponse", web.Response)
    stock = await _gateway_answers(make_gateway, upstream, caplog)
    for request, new, old in zip(GATEWAY_REQUESTS + DRAINING, whole[0], stock[0], strict=True):
        assert new == old, request
    for new_line, old_line in zip(whole[1], stock[1], strict=True):
        assert new_line == old_line  # the access lines, bytes field and all
    assert whole[2] == stock[2]  # the metrics
    answers = b"\n".join(answer for answer, _ in whole[0])
    # the cases the comparison is about did happen
    assert b"X-Upstream-Own: kept" in answers
    for dropped in (b"Set-Cookie", b"X-Subject-Token", b"X-Hop", b"Keep-Alive", b"upstream-server"):
        assert dropped not in answers
    assert b"X-Upstream-Request-Id: 0123456789abcdef0123456789abcdef" in answers
    assert b"Access-Control-Allow-Origin: https://app.example" in answers
    assert b"Allow: GET" in answers
    assert b"HTTP/1.1 503 Busy Upstream" in answers
    thens = {then for _, then in whole[0]}
    assert "closed" in thens  # (401, 403, HTTP/1.0 without keep-alive, Connection: close)
    assert any(then.startswith("HTTP/1.1 ") for then in thens)  # kept open, next one answered
    assert whole[0][-1][0].startswith(b"HTTP/1.0 503 Service Unavailable\r\n")
    assert whole[0][-1][1] == "closed"
    assert sum(line["request_id"] == "fixed-id" for line in whole[1]) == len(whole[0])
    assert {line["bytes"] for line in whole[1]} > {0}
    assert "gateway_tokens_total" in whole[2]


def test_error_answers_keep_their_headers_in_order() -> None:
    limited = error_response(RateLimited("slow down", retry_after=7), "rid")
    assert list(limited.headers.items()) == [
        ("X-Request-Id", "rid"),
        ("Retry-After", "7"),
        ("Content-Type", "application/json"),
    ]
    allow = error_response(MethodNotAllowed("PUT", ("GET", "POST")), "rid")
    assert list(allow.headers.items())[1] == ("Allow", "GET, POST")
