"""Issue 8, item 7: hops and browsers. No gateway key reaches the upstream in any header or
the query; client-sent forwarding headers are dropped unless trusted; cross-site requests
without an allowed Origin are refused; risky settings are warned about at start-up."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import (
    RecordingUpstream,
    RunningGateway,
    free_port,
    raw_exchange,
    request_bytes,
    start_gateway,
    start_gateway_process,
    stop_process,
    wait_healthy,
)
from yarl import URL

from gateway.config.load import parse_settings
from gateway.config.risks import start_up_risks

TOKEN = "gateway-token-" + "H" * 40
KEY = "sk-team-alice-7f3c9a1e5b2d8c4f"
OTHER_KEY = "sk-team-bob-0a9b8c7d6e5f4a3b"
BODY = b'{"model":"m","messages":[]}'

Start = Callable[..., Awaitable[RunningGateway]]


def config_for(upstream: str, **listen: Any) -> dict[str, Any]:
    return {
        "listen": {"host": "127.0.0.1", "port": 0, **listen},
        "credentials": {"tok": {"type": "token", "token": TOKEN}},
        "routes": [{"name": "a", "path": "/v1", "upstream": upstream, "credential": "tok"}],
    }


@pytest.fixture
async def start(recording: RecordingUpstream) -> AsyncIterator[Start]:
    started: list[RunningGateway] = []

    async def factory(**listen: Any) -> RunningGateway:
        gw = await start_gateway(parse_settings(config_for(recording.url, **listen), {}))
        started.append(gw)
        return gw

    try:
        yield factory
    finally:
        for gw in started:
            await gw.runner.cleanup()


def host_of(gw: RunningGateway) -> str:
    return f"127.0.0.1:{URL(gw.url).port}"


async def call(
    gw: RunningGateway, headers: dict[str, str], target: str = "/v1/chat/completions"
) -> tuple[int, str]:
    answer = await raw_exchange(gw.url, request_bytes("POST", target, host_of(gw), BODY, headers))
    assert answer is not None
    code = json.loads(answer.body)["error"]["code"] if answer.status >= 400 else ""
    return answer.status, code


TEAM = {"api_keys": [{"name": "alice", "key": KEY}, {"name": "bob", "key": OTHER_KEY}]}


@pytest.mark.parametrize(
    ("headers", "target"),
    [
        ({"api-key": KEY}, "/v1/chat/completions"),
        ({"X-Api-Key": OTHER_KEY}, "/v1/chat/completions"),
        ({"X-Custom-Auth": KEY}, "/v1/chat/completions"),
        ({"X-Custom-Auth": f"Token {OTHER_KEY}"}, "/v1/chat/completions"),
        ({}, f"/v1/chat/completions?api_key={KEY}&keep=1"),
        ({}, f"/v1/chat/completions?keep=1&k={OTHER_KEY.replace('-', '%2D')}"),
    ],
)
async def test_no_gateway_key_reaches_the_upstream(
    start: Start, recording: RecordingUpstream, headers: dict[str, str], target: str
) -> None:
    gw = await start(**TEAM)
    assert await call(gw, {"Authorization": f"Bearer {KEY}", **headers}, target) == (200, "")
    received = recording.received[0]
    assert KEY.encode() not in received and OTHER_KEY.encode() not in received
    assert b"%2D" not in received  # the encoded form went too
    if "keep=1" in target:
        assert b"keep=1" in received.split(b"\r\n", 1)[0]  # other parameters stay


FORWARDING = {
    "Forwarded": "for=10.1.2.3;proto=https",
    "X-Forwarded-For": "10.1.2.3",
    "X-Forwarded-Host": "internal.example",
    "X-Forwarded-Proto": "https",
    "X-Real-IP": "10.1.2.3",
    "Via": "1.1 trusted-hop",
}


@pytest.mark.parametrize("trusted", [False, True])
async def test_forwarding_headers_only_pass_when_trusted(
    start: Start, recording: RecordingUpstream, trusted: bool
) -> None:
    gw = await start(trust_forwarded=True) if trusted else await start()
    assert await call(gw, {**FORWARDING, "X-Other": "kept"}) == (200, "")
    head = recording.heads[0]
    assert "\r\nX-Other: kept" in head
    for name, value in FORWARDING.items():
        assert (f"\r\n{name}: {value}" in head) is trusted


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Sec-Fetch-Site": "cross-site"}, (403, "origin_not_allowed")),
        ({"Sec-Fetch-Site": "same-site"}, (403, "origin_not_allowed")),
        ({"Sec-Fetch-Site": "Cross-Site"}, (403, "origin_not_allowed")),
        (
            {"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"},
            (403, "origin_not_allowed"),
        ),
        ({"Sec-Fetch-Site": "cross-site", "Origin": "https://app.example"}, (200, "")),
        ({"Sec-Fetch-Site": "same-origin"}, (200, "")),
        ({"Sec-Fetch-Site": "none"}, (200, "")),
        ({}, (200, "")),
    ],
)
async def test_cross_site_requests_need_an_allowed_origin(
    start: Start, recording: RecordingUpstream, headers: dict[str, str], expected: tuple[int, str]
) -> None:
    gw = await start(allowed_origins=["https://app.example"])
    answer = await raw_exchange(
        gw.url, request_bytes("GET", "/v1/models/x", host_of(gw), b"", headers)
    )
    assert answer is not None
    code = json.loads(answer.body)["error"]["code"] if answer.status >= 400 else ""
    assert (answer.status, code) == expected
    assert len(recording.received) == (1 if expected[0] == 200 else 0)


def test_risky_settings_are_named() -> None:
    config = config_for("http://10.0.0.9:8000", allowed_origins=["*"])
    config["credentials"]["iam"] = {
        "type": "iam_password",
        "iam_url": "http://iam.example.com",
        "domain": "d",
        "user": "u",
        "password": "p",
        "project": "cn-north-4",
    }
    risks = start_up_risks(parse_settings(config, {}))
    assert [r.split(" ", 1)[0] for r in risks] == [
        "credentials.iam.iam_url",
        "routes[0].upstream",
        "listen.allowed_origins",
    ]
    safe = config_for("http://127.0.0.1:8000")
    safe["routes"].append(
        {"name": "b", "path": "/v2", "upstream": "https://10.0.0.9", "credential": "tok"}
    )
    assert start_up_risks(parse_settings(safe, {})) == []


async def test_start_up_warns_but_starts(tmp_path: Path) -> None:
    port = free_port()
    config = config_for("http://10.255.255.1:9", allowed_origins=["*"])
    config["listen"]["port"] = port
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    log_path = tmp_path / "log"
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    with log_path.open("wb") as log_file:
        proc = await start_gateway_process("--config", str(path), env=env, stderr=log_file)
    try:
        await wait_healthy(f"http://127.0.0.1:{port}", proc, log=log_path.read_text)
    finally:
        await stop_process(proc)
    log = log_path.read_text()
    assert "routes[0].upstream is plain http://" in log
    assert 'listen.allowed_origins is ["*"]' in log
