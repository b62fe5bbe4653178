"""Limits (413, 429), routing (400, 404, model choice), forwarding and header hygiene."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from conftest import MODEL, GatewayFactory, RawAnswer, RunningGateway, chat_body, raw_exchange
from yarl import URL

from gateway.testing import FakeCloud, FakeModelArts, serve_on_loopback

CHAT = "/v1/chat/completions"


def check_error(status: int, headers: Any, raw: bytes, expected: int, code: str | None) -> None:
    """Every gateway error: the right status, OpenAI-shaped JSON body, an X-Request-Id."""
    assert status == expected, raw
    assert headers.get("Content-Type", "").startswith("application/json")
    assert headers.get("X-Request-Id")
    error = json.loads(raw)["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert isinstance(error["code"], str) and error["code"]
    if code is not None:
        assert error["code"] == code


async def expect_error(
    resp: aiohttp.ClientResponse, expected: int, code: str | None = None
) -> dict[str, Any]:
    raw = await resp.read()
    check_error(resp.status, resp.headers, raw, expected, code)
    error: dict[str, Any] = json.loads(raw)["error"]
    return error


async def raw_request(gw: RunningGateway, head: bytes) -> RawAnswer:
    """Send ``head`` (request line and headers, no body) and read the one answer."""
    answer = await raw_exchange(gw.url, head)
    assert answer is not None, "the gateway closed the connection without an answer"
    return answer


def request_head(gw: RunningGateway, method: str, target: str, *extra: str) -> bytes:
    host = URL(gw.url).authority
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Connection: close", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def with_models(*models: str) -> Any:
    def edit(config: dict[str, Any]) -> None:
        config["routes"][0]["models"] = list(models)

    return edit


def with_two_model_routes(config: dict[str, Any]) -> None:
    """Two routes on /v1, neither ``default``: a body must name its model (issue 9, item 6)."""
    config["routes"][0]["models"] = [MODEL]
    config["routes"].append(dict(config["routes"][0], name="other", models=["other"]))


# --- 413 ----------------------------------------------------------------------------------------


async def test_content_length_over_max_body_returns_413_before_reading(
    cloud: FakeCloud, make_gateway: GatewayFactory
) -> None:
    gw = await make_gateway(lambda c: c["routes"][0].update(max_body="1KiB"))
    # announces a gigabyte and sends none of it: only Content-Length can have decided
    head = request_head(
        gw, "POST", CHAT, "Content-Type: application/json", "Content-Length: 1000000000"
    )
    answer = await raw_request(gw, head)
    check_error(answer.status, answer.headers, answer.body, 413, "request_too_large")
    assert cloud.modelarts.requests == []


async def test_chunked_body_over_max_body_returns_413(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(lambda c: c["routes"][0].update(max_body="1KiB"))

    async def chunks(total: int) -> AsyncIterator[bytes]:
        sent = 0
        while sent < total:
            yield b" " * 256
            sent += 256

    async with http.post(gw.url + CHAT, data=chunks(4096)) as resp:
        assert "Content-Length" not in resp.request_info.headers
        await expect_error(resp, 413, "request_too_large")
    assert cloud.modelarts.requests == []

    # just under the limit, chunked, still goes through
    body = json.dumps(chat_body(stream=False)).encode()

    async def small() -> AsyncIterator[bytes]:
        yield body[:10]
        yield body[10:]

    async with http.post(gw.url + CHAT, data=small()) as resp:
        assert resp.status == 200
    assert cloud.modelarts.requests[-1].body == body


async def test_body_within_route_limit_but_over_selected_model_route_returns_413(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    def edit(config: dict[str, Any]) -> None:
        first = config["routes"][0]
        first.update(models=[MODEL], max_body="1KiB")
        config["routes"].append({**first, "name": "big", "models": ["big"], "max_body": "1MiB"})

    gw = await make_gateway(edit)
    padded = chat_body(stream=False, padding="x" * 4096)
    async with http.post(gw.url + CHAT, json=padded) as resp:
        await expect_error(resp, 413, "request_too_large")
    assert cloud.modelarts.requests == []


# --- 429 ----------------------------------------------------------------------------------------


async def test_requests_beyond_max_concurrency_get_429_with_retry_after(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(lambda c: c["routes"][0].update(max_concurrency=2))
    cloud.modelarts.script.stall_after = 1  # headers and the first event, then silence
    held = [await http.post(gw.url + CHAT, json=chat_body()) for _ in range(2)]
    try:
        assert [r.status for r in held] == [200, 200]  # both slots taken, streams open
        async with http.post(gw.url + CHAT, json=chat_body()) as resp:
            error = await expect_error(resp, 429, "concurrency_limit")
            assert resp.headers["Retry-After"].isdigit()
        assert error["type"] == "rate_limit_error"
        assert len(cloud.modelarts.requests) == 2
    finally:
        for resp in held:
            resp.close()
    # the slots are given back once the streams end (the gateway releases a slot before it
    # closes the upstream connection, so the fake seeing both streams closed is late enough)
    fake = cloud.modelarts
    while fake.open_streams:
        fake.stream_closed.clear()
        await asyncio.wait_for(fake.stream_closed.wait(), 3)
    fake.script.stall_after = None
    async with http.post(gw.url + CHAT, json=chat_body()) as resp:
        assert resp.status == 200


# --- routing ------------------------------------------------------------------------------------


async def test_bad_json_when_routing_must_read_the_body_returns_400(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(with_two_model_routes)
    headers = {"Content-Type": "application/json"}
    async with http.post(gw.url + CHAT, data=b'{"model": "qwen', headers=headers) as resp:
        await expect_error(resp, 400, "invalid_json")
    async with http.post(gw.url + CHAT, data=b"[1, 2]", headers=headers) as resp:
        await expect_error(resp, 400)


async def test_path_without_a_route_returns_404(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    for path in ("/v2/chat/completions", "/", "/v1x/models", "/other"):
        async with http.post(gateway.url + path, json=chat_body()) as resp:
            await expect_error(resp, 404, "route_not_found")


async def test_unknown_model_returns_404_and_missing_model_400(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(with_two_model_routes)
    async with http.post(gw.url + CHAT, json=chat_body(model="gpt-9")) as resp:
        error = await expect_error(resp, 404, "model_not_found")
        assert "gpt-9" in error["message"]
    body = chat_body()
    del body["model"]
    async with http.post(gw.url + CHAT, json=body) as resp:
        await expect_error(resp, 400, "missing_model")
    async with http.post(gw.url + CHAT) as resp:  # no body at all
        await expect_error(resp, 400, "missing_model")
    assert cloud.modelarts.requests == []


async def test_model_chooses_between_routes_on_the_same_path(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    other = FakeModelArts(token_checker=cloud.iam.is_valid, service_id="f" * 32, model="glm-4")
    runner, base = await serve_on_loopback(other.app)
    try:

        def edit(config: dict[str, Any]) -> None:
            first = config["routes"][0]
            first["models"] = [MODEL]
            config["routes"].append(
                {**first, "name": "glm", "models": ["glm-4"], "upstream": base + other.base_path}
            )

        gw = await make_gateway(edit)
        for model, fake in ((MODEL, cloud.modelarts), ("glm-4", other), (MODEL, cloud.modelarts)):
            async with http.post(gw.url + CHAT, json=chat_body(stream=False, model=model)) as r:
                assert r.status == 200
                assert (await r.json())["model"] == model
            assert json.loads(fake.requests[-1].body)["model"] == model
        assert len(cloud.modelarts.requests) == 2
        assert len(other.requests) == 1
        assert other.requests[0].path == f"{other.base_path}{CHAT}"
        assert other.requests[0].headers["X-Auth-Token"]
    finally:
        await runner.cleanup()


# --- forwarding ---------------------------------------------------------------------------------


async def test_full_path_and_query_are_appended_to_upstream(
    cloud: FakeCloud, gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    async with http.post(gateway.url + "/v1/sse?x=1&y=a%20b", json={"q": 1}) as resp:
        assert resp.status == 200
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    seen = cloud.modelarts.requests[-1]
    assert seen.path == f"{cloud.modelarts.base_path}/v1/sse"
    assert seen.query_string == "x=1&y=a b"
    assert json.loads(seen.body) == {"q": 1}

    async with http.post(gateway.url + CHAT, json=chat_body(stream=False)) as resp:
        assert resp.status == 200
    assert cloud.modelarts.requests[-1].path == f"{cloud.modelarts.base_path}{CHAT}"
    assert cloud.modelarts.requests[-1].query_string == ""


async def test_client_credentials_and_hop_by_hop_headers_are_not_forwarded(
    cloud: FakeCloud, gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    sent = {
        "Authorization": "Bearer sk-client-key",
        "X-Auth-Token": "client-token",
        "X-Apig-AppCode": "client-appcode",
        "Cookie": "session=abc",
        "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
        "Connection": "keep-alive, X-Secret-Hop",
        "X-Secret-Hop": "hop-value",
        "Keep-Alive": "timeout=5",
        "X-Custom": "passes",
        "OpenAI-Organization": "org-1",
        "X-Request-Id": "client-rid-1",
    }
    async with http.post(gateway.url + CHAT, json=chat_body(stream=False), headers=sent) as resp:
        assert resp.status == 200
        assert resp.headers["X-Request-Id"] == "client-rid-1"
        on_the_wire = resp.request_info.headers
        assert all(on_the_wire.get(name) == value for name, value in sent.items())
    seen = {k.lower(): v for k, v in cloud.modelarts.requests[-1].headers.items()}
    for name in ("authorization", "x-apig-appcode", "cookie", "proxy-authorization"):
        assert name not in seen, name
    assert "x-secret-hop" not in seen
    assert "keep-alive" not in seen
    assert "hop-value" not in seen.values()
    assert seen.get("connection", "").lower() in ("", "keep-alive", "close")
    assert seen["x-auth-token"] != "client-token"  # the gateway's own token, applied last
    assert cloud.iam.is_valid(seen["x-auth-token"])
    assert seen["x-custom"] == "passes"
    assert seen["openai-organization"] == "org-1"
    assert seen["content-type"] == "application/json"
    assert seen["x-request-id"] == "client-rid-1"


@pytest.mark.parametrize(
    "target",
    ["/v1/../x", "/v1/%2e%2e/x", "/v1/%2E%2E/infers", "/v1/./chat/completions", "/v1/chat/.."],
)
async def test_dot_segments_in_the_path_return_400(
    cloud: FakeCloud, gateway: RunningGateway, target: str
) -> None:
    head = request_head(gateway, "GET", target)
    answer = await raw_request(gateway, head)
    check_error(answer.status, answer.headers, answer.body, 400, "invalid_path")
    assert cloud.modelarts.requests == []


# --- the gateway's own endpoints ----------------------------------------------------------------


async def test_models_endpoint_lists_configured_models(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    def edit(config: dict[str, Any]) -> None:
        first = config["routes"][0]
        first["models"] = [MODEL, "qwen2-72b"]
        config["routes"].append({**first, "name": "glm", "models": ["glm-4"]})

    gw = await make_gateway(edit)
    async with http.get(gw.url + "/v1/models") as resp:
        assert resp.status == 200
        listing = await resp.json()
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == [MODEL, "qwen2-72b", "glm-4"]
    for model in listing["data"]:
        assert model["object"] == "model"
        assert isinstance(model["created"], int)
        assert isinstance(model["owned_by"], str)
    assert cloud.modelarts.requests == []  # answered from config


async def test_healthz_answers_200(gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    async with http.get(gateway.url + "/healthz") as resp:
        assert resp.status == 200
