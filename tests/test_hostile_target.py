"""Issue 8, items 1 and 2: the credential goes only to the route's own upstream, and one
canonical path is routed on and forwarded. Raw sockets against an upstream recording bytes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from conftest import (
    RecordingUpstream,
    RunningGateway,
    raw_exchange,
    request_bytes,
    start_gateway,
)
from yarl import URL

from gateway.config.load import parse_settings

TOKEN = "gateway-token-" + "T" * 40
BODY = b'{"model":"m","messages":[]}'

Start = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
async def start(recording: RecordingUpstream) -> AsyncIterator[Start]:
    started: list[RunningGateway] = []

    async def factory(upstream: str | None = None, **route: Any) -> RunningGateway:
        config = {
            "listen": {"host": "127.0.0.1", "port": 0},
            "credentials": {"tok": {"type": "token", "token": TOKEN}},
            "routes": [
                {
                    "name": "a",
                    "path": "/v1",
                    "upstream": upstream or recording.url + "/v1/infers/svc-a",
                    "credential": "tok",
                    **route,
                }
            ],
        }
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


async def send(gw: RunningGateway, target: str, method: str = "POST") -> tuple[int, str]:
    answer = await raw_exchange(gw.url, request_bytes(method, target, host_of(gw), BODY))
    assert answer is not None
    code = json.loads(answer.body)["error"]["code"] if answer.status >= 400 else ""
    return answer.status, code


async def test_origin_form_goes_to_the_route_path_exactly(
    start: Start, recording: RecordingUpstream
) -> None:
    gw = await start()
    assert await send(gw, "/v1/chat/completions?x=1&y=%2F") == (200, "")
    head = recording.heads[0]
    assert head.startswith("POST /v1/infers/svc-a/v1/chat/completions?x=1&y=%2F HTTP/1.1\r\n")
    assert f"\r\nHost: {URL(recording.url).host}:{URL(recording.url).port}\r\n" in head
    assert f"\r\nX-Auth-Token: {TOKEN}\r\n" in head


@pytest.mark.parametrize(
    "target",
    [
        "http://evil.example/v1/chat/completions",
        "https://evil.example/v1/chat/completions",
        "munity://x/v1/chat/completions",
        "host://x/maas/chat/completions",
        "evil.example:443",
        "*",
        "v1/chat/completions",
    ],
)
@pytest.mark.parametrize("upstream_path", ["/v1/infers/svc-a", "", ":port"])
async def test_only_origin_form_targets_are_proxied(
    start: Start, recording: RecordingUpstream, target: str, upstream_path: str
) -> None:
    # a host-only upstream, and one with its port spelled out, were where a target glued on
    # changed the host (api.modelarts-maas.com + "munity://x" = ...community) or gave a 500
    upstream = recording.url + (upstream_path if upstream_path != ":port" else "")
    gw = await start(upstream=upstream)
    # what aiohttp's parser already refuses is a 400 bad_http_request; the rest, ours
    refused = {(400, "invalid_path"), (400, "bad_http_request")}
    assert await send(gw, target) in refused
    assert await send(gw, target, method="GET") in refused
    assert recording.received == []


@pytest.mark.parametrize(
    "path",
    [
        "/v1/..%2f..%2fsvc-b/v1/chat/completions",
        "/v1%2f..%2f..%2fsvc-b/v1/chat/completions",
        "/v1/%2e%2e%2fsvc-b/chat/completions",
        "/v1/%2e%2e/svc-b/chat/completions",
        "/v1/%2E/chat/completions",
        "/v1/../svc-b/chat/completions",
        "/v1/./chat/completions",
        "/v1/..%5csvc-b/chat/completions",
        "/v1/..\\svc-b/chat/completions",
        "/v1/..;/svc-b/chat/completions",
        "/v1/.;x/chat/completions",
        "/v1/%2e%2e;jsessionid=1/svc-b/chat/completions",
        "/v1/%252e%252e/svc-b/chat/completions",
        "/v1/%25252e/chat/completions",
        "/v1/%c0%ae%c0%ae/svc-b/chat/completions",
        "/v1/%ff/chat/completions",
        "/v1/chat%00/completions",
        "/v1/chat%2/completions",
        "/v1/chat%zz/completions",
    ],
)
async def test_paths_another_hop_could_read_differently_are_refused(
    start: Start, recording: RecordingUpstream, path: str
) -> None:
    gw = await start()
    assert await send(gw, path) == (400, "invalid_path")
    assert recording.received == []


async def test_routing_and_forwarding_use_one_canonical_path(
    start: Start, recording: RecordingUpstream
) -> None:
    gw = await start()
    # "%31" is "1": routed as /v1/..., and forwarded as what was routed on, not as received
    assert await send(gw, "/v%31/chat/completions") == (200, "")
    assert await send(gw, "/v1/caf%C3%A9%20x:y@z") == (200, "")
    assert recording.heads[0].startswith("POST /v1/infers/svc-a/v1/chat/completions HTTP/1.1")
    assert recording.heads[1].startswith("POST /v1/infers/svc-a/v1/caf%C3%A9%20x:y@z HTTP/1.1")
    # a path outside every route is a 404, never forwarded
    assert await send(gw, "/v2/chat/completions") == (404, "route_not_found")
    assert len(recording.received) == 2
