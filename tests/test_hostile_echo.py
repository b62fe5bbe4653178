"""Issue 8, item 6: nothing the upstream echoes hands the credential to a client, and only the
methods a model API uses are proxied. Raw sockets against an upstream recording bytes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from conftest import (
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

from gateway.config.load import ConfigError, parse_settings

TOKEN = "MIIgateway-token-" + "Tq7" * 30
BODY = b'{"model":"m","messages":[]}'
ECHOED = (
    "X-Auth-Token",
    "X-Subject-Token",
    "X-Security-Token",
    "Authorization",
    "Proxy-Authorization",
    "Set-Cookie",
)

Start = Callable[..., Awaitable[tuple[RunningGateway, RecordingUpstream]]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    started: list[tuple[RunningGateway, RecordingUpstream]] = []

    async def factory(answer: bytes | None = None, **route: Any) -> tuple[RunningGateway, Any]:
        upstream = await RecordingUpstream(answer).start()
        config = {
            "listen": {"host": "127.0.0.1", "port": 0},
            "credentials": {"tok": {"type": "token", "token": TOKEN}},
            "routes": [{"name": "a", "path": "/v1", "upstream": upstream.url, "credential": "tok"}],
        }
        config["routes"][0].update(route)  # type: ignore[index]
        gw = await start_gateway(parse_settings(config, {}))
        started.append((gw, upstream))
        return gw, upstream

    try:
        yield factory
    finally:
        for gw, upstream in started:
            await gw.runner.cleanup()
            await upstream.close()


def host_of(gw: RunningGateway) -> str:
    return f"127.0.0.1:{URL(gw.url).port}"


def answer_with(headers: list[tuple[str, str]], body: bytes, chunked: bool = False) -> bytes:
    lines = ["HTTP/1.1 200 OK"] + [f"{n}: {v}" for n, v in headers]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        framed = b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)
    else:
        lines.append(f"Content-Length: {len(body)}")
        framed = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + framed


async def raw_post(gw: RunningGateway, target: str = "/v1/chat/completions") -> bytes:
    """The whole answer as bytes (head and body), read until the gateway closes."""
    reader, writer = await open_raw(gw.url)
    try:
        data = request_bytes("POST", target, host_of(gw), BODY, {"Connection": "close"})
        await write_raw(writer, data)
        return await reader.read()
    finally:
        writer.close()


@pytest.mark.parametrize("streamed", [False, True])
async def test_credential_headers_from_the_upstream_never_reach_the_client(
    start: Start, streamed: bool
) -> None:
    echoed = [(name, TOKEN) for name in ECHOED] + [("Set-Cookie", "session=" + TOKEN)]
    kind = [("Content-Type", "text/event-stream")] if streamed else []
    body = b"data: {}\n\n" if streamed else b"{}"
    gw, _upstream = await start(answer_with([*echoed, *kind, ("X-Kept", "yes")], body, streamed))
    raw = await raw_post(gw)
    head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    assert head.startswith("HTTP/1.1 200")
    assert "\r\nX-Kept: yes" in head  # the test can see the upstream's headers at all
    assert TOKEN.encode() not in raw
    for name in ECHOED:
        assert f"\r\n{name.lower()}:" not in head.lower()


@pytest.mark.parametrize(
    "quoted",
    [
        TOKEN,
        TOKEN[:40],  # an upstream that quotes only the start of the token
        "X-Auth-Token=" + TOKEN + ";",
    ],
)
async def test_a_reshaped_apig_error_never_quotes_the_token(start: Start, quoted: str) -> None:
    error = json.dumps(
        {"error_code": "APIG.0201", "error_msg": f"Backend timeout, request headers: {quoted}"}
    ).encode()
    answer = (
        b"HTTP/1.1 504 Gateway Timeout\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(error), error)
    )
    gw, upstream = await start(answer)
    raw = await raw_post(gw)
    assert raw.startswith(b"HTTP/1.1 504")
    body = json.loads(raw.split(b"\r\n\r\n", 1)[1])
    message = body["error"]["message"]
    assert message.startswith("Backend timeout, request headers: ")  # still says what failed
    assert "***" in message
    assert TOKEN[:12] not in message
    assert f"X-Auth-Token: {TOKEN}" in upstream.heads[0]  # the upstream did get the token


@pytest.mark.parametrize("method", ["TRACE", "DELETE", "PUT", "PATCH", "OPTIONS", "PROPFIND"])
async def test_methods_a_model_api_does_not_use_get_405_with_allow(
    start: Start, method: str
) -> None:
    gw, upstream = await start()
    answer = await raw_exchange(
        gw.url, request_bytes(method, "/v1/chat/completions", host_of(gw), BODY)
    )
    assert answer is not None
    assert answer.status == 405
    assert answer.headers["Allow"] == "GET, HEAD, POST"
    assert json.loads(answer.body)["error"]["code"] == "method_not_allowed"
    assert upstream.received == []


async def test_routes_methods_widens_what_is_proxied(start: Start) -> None:
    gw, upstream = await start(methods=["GET", "DELETE"])
    ok = await raw_exchange(gw.url, request_bytes("DELETE", "/v1/files/f1", host_of(gw)))
    assert ok is not None and ok.status == 200
    assert upstream.heads[0].startswith("DELETE /v1/files/f1 HTTP/1.1")
    refused = await raw_exchange(gw.url, request_bytes("POST", "/v1/x", host_of(gw), BODY))
    assert refused is not None and refused.status == 405
    assert refused.headers["Allow"] == "GET, DELETE"
    assert len(upstream.received) == 1


@pytest.mark.parametrize(
    ("methods", "message"),
    [
        (["GET", "TRACE"], "routes[0].methods: TRACE is never proxied"),
        (["CONNECT"], "routes[0].methods: CONNECT is never proxied"),
        (["GE T"], "routes[0].methods: 'GE T' is not an HTTP method"),
        ([], "routes[0].methods: must list at least one method"),
    ],
)
def test_methods_config_errors_name_the_key(methods: list[str], message: str) -> None:
    config = {
        "credentials": {"tok": {"type": "token", "token": TOKEN}},
        "routes": [
            {"name": "a", "upstream": "http://127.0.0.1:1", "credential": "tok", "methods": methods}
        ],
    }
    with pytest.raises(ConfigError) as err:
        parse_settings(config, {})
    assert message in str(err.value)


async def test_an_unread_answer_keeps_the_connection_usable(start: Start) -> None:
    gw, _upstream = await start()
    reader, writer = await open_raw(gw.url)
    try:
        await write_raw(writer, request_bytes("TRACE", "/v1/x", host_of(gw)))
        first = await read_answer(reader)
        await write_raw(writer, request_bytes("POST", "/v1/x", host_of(gw), BODY))
        second = await read_answer(reader)
    finally:
        writer.close()
    assert first is not None and first.status == 405
    assert second is not None and second.status == 200
