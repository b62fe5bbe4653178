"""An upstream that dies mid-body never looks like a clean end (issue 9, item 1).

Every combination: framing (close-delimited, chunked, a Content-Length never reached) by how the
connection ends (FIN, reset) by where (on an SSE event boundary, inside an event) by body type
(SSE, JSON); and a small JSON answer (read whole before anything goes out) cut short. The
upstream is a raw socket; the client reads the gateway's answer off a raw socket too, so
"clean end" means exactly: the terminating chunk (or the whole Content-Length).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import RAW_WAIT, GatewayFactory, RunningGateway
from faulty_upstream import DyingUpstream, RawClient

from gateway.proxy.sse import error_event

FIRST = b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n'
ON = b'data: {"choices": [{"delta": {"content": "b"}}]}\n\n'
OFF = b'data: {"choices": [{"delta": {"cont'


def raw_route(url: str) -> Any:
    def edit(config: dict[str, Any]) -> None:
        config["credentials"]["open"] = {"type": "none"}
        config["routes"].append(
            {
                "name": "raw",
                "path": "/raw",
                "upstream": url,
                "credential": "open",
                "heartbeat": 0,
                "timeouts": {"connect": 2, "first_byte": 5, "idle": 5, "total": 30},
            }
        )

    return edit


def expected(framing: str, fault: str, boundary: bool, sse: bool) -> str:
    """What the client must see: ``clean`` end, an ``error`` event then a clean end, or a ``cut``.

    Only a FIN can end a close-delimited body; a reset ends nothing. An SSE body may end only on
    an event boundary; said inside the stream when it can be (on a boundary), else cut.
    """
    if framing == "close" and fault == "fin":
        return "clean" if boundary or not sse else "cut"
    if sse:
        return "error" if boundary else "cut"
    return "cut"


@pytest.fixture
async def upstream() -> AsyncIterator[DyingUpstream]:
    up = await DyingUpstream().start()
    try:
        yield up
    finally:
        await up.close()


async def one(
    gw: RunningGateway, upstream: DyingUpstream, framing: str, fault: str, boundary: bool, sse: bool
) -> None:
    upstream.framing, upstream.fault = framing, fault
    upstream.content_type = "text/event-stream" if sse else "application/json"
    upstream.parts = [FIRST, ON if boundary else OFF]
    upstream.go.clear()
    sent = b"".join(upstream.parts)
    client = await RawClient.post(gw.url, "/raw/v1/chat/completions", b"{}")
    assert client.status == 200
    await client.until(len(sent))  # the gateway relayed all of it before the upstream dies
    upstream.go.set()
    answer = await client.finish()
    want = expected(framing, fault, boundary, sse)
    case = f"{framing}/{fault}/{'on' if boundary else 'off'}/{'sse' if sse else 'json'}"
    if want == "clean":
        assert (answer.body, answer.complete) == (sent, True), case
    elif want == "error":
        assert (answer.body, answer.complete) == (sent + error_event("upstream_error"), True), case
        assert json.loads(answer.body.rsplit(b"data: ", 1)[1])["error"]["code"] == "upstream_error"
    else:
        assert answer.body == sent, case
        assert not answer.complete, f"{case}: a cut body ended cleanly"


@pytest.mark.parametrize("framing", ["close", "chunked", "length"])
@pytest.mark.parametrize("fault", ["fin", "reset"])
async def test_every_way_an_upstream_can_die_mid_body_is_reported_truthfully(
    make_gateway: GatewayFactory, upstream: DyingUpstream, framing: str, fault: str
) -> None:
    gw = await make_gateway(raw_route(upstream.url))
    for boundary, sse in itertools.product((True, False), (True, False)):
        await one(gw, upstream, framing, fault, boundary, sse)
    ends = {
        reason: gw.metric("gateway_stream_end_total", route="raw", reason=reason)
        for reason in ("done", "upstream_error")
    }
    clean = sum(expected(framing, fault, b, s) == "clean" for b in (1, 0) for s in (1, 0))
    assert ends == {"done": clean, "upstream_error": 4 - clean}


async def test_a_chunked_sse_body_that_ends_inside_an_event_is_cut(
    make_gateway: GatewayFactory, upstream: DyingUpstream
) -> None:
    # a terminating chunk after half an event: the upstream "ended" where no event ends
    gw = await make_gateway(raw_route(upstream.url))
    upstream.framing, upstream.fault, upstream.parts = "chunked", "end", [FIRST, OFF]
    upstream.go.set()
    client = await RawClient.post(gw.url, "/raw/v1/chat/completions", b"{}")
    answer = await client.finish()
    assert answer.body == FIRST + OFF
    assert not answer.complete


@pytest.mark.parametrize("fault", ["fin", "reset"])
@pytest.mark.parametrize("boundary", [True, False])
async def test_a_small_answer_cut_before_its_content_length_is_a_502_never_a_200(
    make_gateway: GatewayFactory, upstream: DyingUpstream, fault: str, boundary: bool
) -> None:
    # a small Content-Length answer is read whole before anything goes out: cut short, the
    # client gets the gateway's own error, not a 200 with part of a body
    gw = await make_gateway(raw_route(upstream.url))
    upstream.framing, upstream.fault = "small", fault
    upstream.content_type = "application/json"
    upstream.parts = [FIRST, ON if boundary else OFF]
    upstream.go.set()
    client = await RawClient.post(gw.url, "/raw/v1/chat/completions", b"{}")
    answer = await client.finish()
    assert answer.status == 502, answer
    assert answer.complete
    assert json.loads(answer.body)["error"]["code"] == "upstream_error"
    assert answer.headers["x-request-id"]
    assert upstream.requests == 1


async def http10(gw: RunningGateway) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, _, port = gw.url.removeprefix("http://").partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /raw/v1/chat/completions HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}")
    return reader, writer


@pytest.mark.parametrize("framing", ["close", "chunked"])
@pytest.mark.parametrize("fault", ["fin", "reset"])
async def test_an_http10_client_sees_a_cut_as_a_reset_never_as_the_end_of_its_body(
    make_gateway: GatewayFactory, upstream: DyingUpstream, framing: str, fault: str
) -> None:
    # HTTP/1.0 (or nginx's default proxy_http_version 1.0) cannot get chunked framing: its body
    # ends where the connection does, so a FIN would be a clean end. A cut must be a reset.
    gw = await make_gateway(raw_route(upstream.url))
    for boundary, sse in itertools.product((True, False), (True, False)):
        upstream.framing, upstream.fault = framing, fault
        upstream.content_type = "text/event-stream" if sse else "application/json"
        upstream.parts = [FIRST, ON if boundary else OFF]
        upstream.go.clear()
        sent = b"".join(upstream.parts)
        reader, writer = await http10(gw)
        case = f"{framing}/{fault}/{'on' if boundary else 'off'}/{'sse' if sse else 'json'}"
        async with asyncio.timeout(RAW_WAIT):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.0 200"), case
            assert b"content-length" not in head.lower() and b"chunked" not in head.lower()
            body = await reader.readexactly(len(sent))
            assert body == sent, case
            upstream.go.set()
            try:
                rest, reset = await reader.read(), False
            except ConnectionResetError:
                rest, reset = b"", True
        writer.close()
        want = expected(framing, fault, boundary, sse)
        if want == "clean":
            assert (rest, reset) == (b"", False), case
        elif want == "error":  # said inside the stream, then closed: the event tells
            assert (rest, reset) == (error_event("upstream_error"), False), case
        else:
            assert reset, f"{case}: a cut body ended with a FIN, a clean end for HTTP/1.0"
