"""Issue 8, item 3: the gateway reads the body the way any upstream would. A body whose
``model`` another parser could read differently is refused; bad or too-deep JSON is a 400;
large bodies are parsed off the event loop. Raw sockets against an upstream recording bytes."""

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
from gateway.proxy.body import OFF_LOOP, parse_model

TOKEN = "gateway-token-" + "B" * 40
BOB = "sk-team-bob-allowed-only-1a2b3c"
PAD = "x" * (OFF_LOOP + 1000)  # makes a body large enough for the worker process

Start = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
async def start(recording: RecordingUpstream) -> AsyncIterator[Start]:
    started: list[RunningGateway] = []

    async def factory(keys: bool = True) -> RunningGateway:
        config: dict[str, Any] = {
            "listen": {"host": "127.0.0.1", "port": 0},
            "credentials": {"tok": {"type": "token", "token": TOKEN}},
            "routes": [
                {
                    "name": "allowed",
                    "upstream": recording.url + "/allowed",
                    "credential": "tok",
                    "models": ["m-allowed"],
                },
                {
                    "name": "expensive",
                    "upstream": recording.url + "/expensive",
                    "credential": "tok",
                    "models": ["m-expensive"],
                },
            ],
        }
        if keys:
            config["listen"]["api_keys"] = [{"name": "bob", "key": BOB, "models": ["m-allowed"]}]
        gw = await start_gateway(parse_settings(config, {}))
        started.append(gw)
        return gw

    try:
        yield factory
    finally:
        for gw in started:
            await gw.runner.cleanup()


async def post(gw: RunningGateway, body: bytes) -> tuple[int, str]:
    host = f"127.0.0.1:{URL(gw.url).port}"
    headers = {"Authorization": f"Bearer {BOB}", "Content-Type": "application/json"}
    answer = await raw_exchange(gw.url, request_bytes("POST", "/v1/chat", host, body, headers))
    assert answer is not None
    code = json.loads(answer.body)["error"]["code"] if answer.status >= 400 else ""
    return answer.status, code


AMBIGUOUS = [
    b'{"model":"m-expensive","model":"m-allowed"}',
    b'{"model":"m-allowed","model":"m-expensive"}',
    b'{"model":"m-allowed","MODEL":"m-expensive"}',
    b'{"Model":"m-expensive","model":"m-allowed"}',
    b'{"model":"m-allowed","mod\\u0065L":"m-expensive"}',
    b'{"stream":true,"stream":false,"model":"m-allowed"}',
]


@pytest.mark.parametrize("large", [False, True])
@pytest.mark.parametrize("body", AMBIGUOUS)
@pytest.mark.parametrize("keys", [True, False])
async def test_a_body_other_parsers_could_read_differently_is_refused(
    start: Start, recording: RecordingUpstream, body: bytes, large: bool, keys: bool
) -> None:
    if large:
        body = body[:-1] + b',"pad":"' + PAD.encode() + b'"}'
    gw = await start(keys=keys)
    assert await post(gw, body) == (400, "ambiguous_model")
    assert recording.received == []


@pytest.mark.parametrize("large", [False, True])
async def test_unambiguous_bodies_route_and_allowlist_as_before(
    start: Start, recording: RecordingUpstream, large: bool
) -> None:
    extra = ',"pad":"' + PAD + '"' if large else ""
    gw = await start()
    nested = '"messages":[{"role":"user","role":"user","content":"hi"}]'  # nested: not ours
    ok = f'{{"model":"m-allowed",{nested}{extra}}}'.encode()
    assert await post(gw, ok) == (200, "")
    assert recording.heads[0].startswith("POST /allowed/v1/chat HTTP/1.1")
    assert recording.received[0].endswith(ok)  # forwarded byte for byte
    denied = f'{{"model":"m-expensive"{extra}}}'.encode()
    assert await post(gw, denied) == (403, "model_not_allowed")
    assert len(recording.received) == 1


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 60_000,  # parsed on the loop (under OFF_LOOP)
        b'{"model":' + b"[" * 100_000,  # in the worker process
        b"{" * 100_000,
        b'{"model":"m-allowed"',
        b'{"model":"m-allowed"}' + b" " * OFF_LOOP + b"x",
        b"\xff\xfe{}",
        b'"just a string"',
        b'["model"]',
    ],
)
async def test_bad_or_too_deep_json_is_always_a_400(
    start: Start, recording: RecordingUpstream, body: bytes
) -> None:
    gw = await start()
    assert await post(gw, body) == (400, "invalid_json")
    assert recording.received == []


def test_parse_model_outcomes() -> None:
    assert parse_model(b'{"model":"a","x":{"model":"b","model":"c"}}') == ("a", None, None)
    assert parse_model(b"  ") == (None, None, None)
    assert parse_model(b'{"x":1}') == (None, None, None)
    assert parse_model(b'{"model":1}')[1] == "invalid_model"
    assert parse_model(b"[" * 200_000)[1] == "invalid_json"
