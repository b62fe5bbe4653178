"""What OpenAI-style apps and operators trip over (issue 9, item 6).

models.retrieve, ModelArts' own /v1/sse with a custom body, APIG's request id kept, Retry-After
passed through and sent while draining, X-Request-Id on every response, the deploy curl lines.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from conftest import (
    MODEL,
    ROOT,
    GatewayFactory,
    RecordingUpstream,
    RunningGateway,
    chat_body,
    open_raw,
    read_answer,
    write_raw,
)

from gateway.config.load import ConfigError, parse_settings
from gateway.demo import DEMO_MODEL
from gateway.server.state import GATEWAY
from gateway.testing import FakeCloud

KEY = "sk-team-apps-0123456789abcdef"
OTHER_KEY = "sk-team-other-0123456789abcdef"


def with_models(*models: str) -> Any:
    def edit(config: dict[str, Any]) -> None:
        config["routes"][0]["models"] = list(models)

    return edit


# --- GET /v1/models/{id} -----------------------------------------------------------------------


async def test_models_retrieve_returns_a_configured_model_and_404_for_others(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(with_models(MODEL, "org/model-b"))
    async with openai.AsyncOpenAI(
        base_url=gw.url + "/v1", api_key="sk-anything", max_retries=0, timeout=10
    ) as client:
        found = await client.models.retrieve(MODEL)
        assert (found.id, found.object, found.owned_by) == (MODEL, "model", "modelarts")
        assert (await client.models.retrieve("org/model-b")).id == "org/model-b"
        with pytest.raises(openai.NotFoundError) as info:
            await client.models.retrieve("gpt-4")
    assert info.value.status_code == 404
    body = info.value.body
    assert isinstance(body, dict) and body["code"] == "model_not_found"
    assert gw.app[GATEWAY].settings.routes[0].models == (MODEL, "org/model-b")


async def test_models_retrieve_hides_a_model_the_key_may_not_use(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    def edit(config: dict[str, Any]) -> None:
        config["routes"][0]["models"] = [MODEL, "other"]
        config["listen"]["api_keys"] = [{"name": "ci", "key": KEY, "models": [MODEL]}]

    gw = await make_gateway(edit)
    auth = {"Authorization": f"Bearer {KEY}"}
    async with http.get(gw.url + f"/v1/models/{MODEL}", headers=auth) as resp:
        assert resp.status == 200 and (await resp.json())["id"] == MODEL
    async with http.get(gw.url + "/v1/models/other", headers=auth) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "model_not_found"
    async with http.get(gw.url + f"/v1/models/{MODEL}") as resp:
        assert resp.status == 401


# --- a body without a model goes to the path's default route -----------------------------------


async def test_sse_with_a_custom_body_goes_to_the_only_route_on_the_path(
    make_gateway: GatewayFactory, cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    cloud.modelarts.script.events = 2
    gw = await make_gateway(with_models(MODEL))
    for body in (b'{"prompt": "hi"}', b"prompt=hi&x=1", b"[1, 2]", b""):
        async with http.post(gw.url + "/v1/sse", data=body) as resp:
            assert resp.status == 200, body
            assert b"data: [DONE]" in await resp.read()
        assert cloud.modelarts.requests[-1].body == body
    # a model named in the body is still checked
    async with http.post(gw.url + "/v1/sse", json={"model": "nope"}) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "model_not_found"
    # an ambiguous model is not a missing one
    async with http.post(gw.url + "/v1/sse", data=b'{"model": "a", "model": "b"}') as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "ambiguous_model"


def two_routes(cloud: FakeCloud, default: bool) -> Any:
    def edit(config: dict[str, Any]) -> None:
        config["routes"][0]["models"] = [MODEL]
        second = dict(config["routes"][0], name="second", models=["other"])
        if default:
            second["default"] = True
        config["routes"].append(second)

    return edit


async def test_with_several_routes_the_default_true_one_takes_bodies_without_a_model(
    make_gateway: GatewayFactory, cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    cloud.modelarts.script.events = 1
    gw = await make_gateway(two_routes(cloud, default=True))
    for body in (b'{"prompt": "hi"}', b"not json"):
        async with http.post(gw.url + "/v1/sse", data=body) as resp:
            assert resp.status == 200
            await resp.read()
    assert gw.metric("gateway_requests_total", route="second", status="200") == 2
    async with http.post(gw.url + "/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 200
        await resp.read()
    assert gw.metric("gateway_requests_total", route="chat", status="200") == 1


async def test_without_a_default_route_a_body_without_a_model_is_still_a_400(
    make_gateway: GatewayFactory, cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(two_routes(cloud, default=False))
    async with http.post(gw.url + "/v1/sse", json={"prompt": "hi"}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "missing_model"
    async with http.post(gw.url + "/v1/sse", data=b"not json") as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "invalid_json"
    assert cloud.modelarts.requests == []


async def test_a_key_allowlist_still_reads_the_model(
    make_gateway: GatewayFactory, cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    cloud.modelarts.script.events = 1

    def edit(config: dict[str, Any]) -> None:
        config["routes"][0]["models"] = [MODEL]
        config["listen"]["api_keys"] = [
            {"name": "ci", "key": KEY, "models": [MODEL]},
            {"name": "all", "key": OTHER_KEY},
        ]

    gw = await make_gateway(edit)
    limited = {"Authorization": f"Bearer {KEY}"}
    free = {"Authorization": f"Bearer {OTHER_KEY}"}
    async with http.post(gw.url + "/v1/sse", json={"prompt": "hi"}, headers=limited) as resp:
        assert resp.status == 403
        assert (await resp.json())["error"]["code"] == "model_not_allowed"
    async with http.post(gw.url + "/v1/sse", data=b"not json", headers=limited) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "invalid_json"
    async with http.post(gw.url + "/v1/sse", json={"model": MODEL}, headers=limited) as resp:
        assert resp.status == 200
        await resp.read()
    async with http.post(gw.url + "/v1/sse", data=b"not json", headers=free) as resp:
        assert resp.status == 200  # no allowlist to check: the default route takes it
        await resp.read()
    assert len(cloud.modelarts.requests) == 2


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("yes", "routes[0].default: must be true or false"),
        (True, "routes[1].default: routes[0] is already the default route on path '/v1'"),
    ],
)
def test_default_is_validated(value: object, problem: str) -> None:
    route = {"path": "/v1", "upstream": "http://127.0.0.1:9/", "credential": "open"}
    raw = {
        "credentials": {"open": {"type": "none"}},
        "routes": [
            dict(route, name="a", models=["a"], default=value),
            dict(route, name="b", models=["b"], default=value is True),
        ],
    }
    with pytest.raises(ConfigError) as info:
        parse_settings(raw, {})
    assert problem in str(info.value)


# --- APIG's request id --------------------------------------------------------------------------


async def test_a_reshaped_apig_error_keeps_apigs_request_id(
    gateway: RunningGateway,
    cloud: FakeCloud,
    http: aiohttp.ClientSession,
    captured_logs: pytest.LogCaptureFixture,
) -> None:
    cloud.modelarts.script.status = 429
    async with http.post(gateway.url + "/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 429
        body = await resp.json()
        upstream_id = resp.headers["X-Upstream-Request-Id"]
        own_id = resp.headers["X-Request-Id"]
    assert re.fullmatch(r"[0-9a-f]{32}", upstream_id)
    assert own_id != upstream_id
    assert body["error"]["code"] == "APIG.0308"
    assert body["error"]["message"] == (
        f"The throttling threshold has been reached. (upstream request id {upstream_id})"
    )
    access = [r for r in captured_logs.records if r.name == "gateway.access"]
    assert [r.access["upstream_request_id"] for r in access] == [upstream_id]  # type: ignore[attr-defined]


async def test_apigs_request_id_header_is_used_when_the_body_has_none(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    error = b'{"error_code": "APIG.0201", "error_msg": "Backend unavailable."}'
    upstream = await RecordingUpstream(
        b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: application/json\r\n"
        b"X-Request-Id: 0123456789abcdef0123456789abcdef\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(error), error)
    ).start()
    try:
        gw = await make_gateway(raw_route(upstream.url))
        async with http.post(gw.url + "/v1/chat/completions", json={}) as resp:
            assert resp.status == 502
            assert resp.headers["X-Upstream-Request-Id"] == "0123456789abcdef0123456789abcdef"
            assert resp.headers["X-Request-Id"] != "0123456789abcdef0123456789abcdef"
            assert "0123456789abcdef0123456789abcdef" in (await resp.json())["error"]["message"]
    finally:
        await upstream.close()


# --- Retry-After --------------------------------------------------------------------------------


def raw_route(url: str) -> Any:
    def edit(config: dict[str, Any]) -> None:
        config["credentials"]["open"] = {"type": "none"}
        config["routes"] = [{"name": "raw", "path": "/v1", "upstream": url, "credential": "open"}]

    return edit


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (429, b'{"error_code": "APIG.0308", "error_msg": "The throttling threshold."}'),
        (503, b'{"error": {"message": "overloaded", "type": "server_error"}}'),
        (503, b"busy"),
    ],
)
async def test_the_upstreams_retry_after_is_passed_through(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession, status: int, body: bytes
) -> None:
    upstream = await RecordingUpstream(
        b"HTTP/1.1 %d Busy\r\nContent-Type: application/json\r\nRetry-After: 7\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (status, len(body), body)
    ).start()
    try:
        gw = await make_gateway(raw_route(upstream.url))
        async with http.post(gw.url + "/v1/chat/completions", json={}) as resp:
            assert resp.status == status
            assert resp.headers.getall("Retry-After") == ["7"]
    finally:
        await upstream.close()


async def test_draining_answers_503_with_retry_after(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    gateway.app[GATEWAY].proxy.draining = True
    async with http.post(gateway.url + "/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "draining"
        assert resp.headers["Retry-After"] == "1"
        assert resp.headers["X-Request-Id"]


# --- X-Request-Id on every response ------------------------------------------------------------


async def test_every_response_carries_x_request_id(
    make_gateway: GatewayFactory, cloud: FakeCloud, http: aiohttp.ClientSession
) -> None:
    cloud.modelarts.script.events = 1

    def edit(config: dict[str, Any]) -> None:
        config["routes"][0]["models"] = [MODEL]
        config["listen"]["allowed_origins"] = ["https://app.example"]

    gw = await make_gateway(edit)
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/healthz", {}),
        ("GET", "/readyz", {}),
        ("GET", "/metrics", {}),
        ("GET", "/v1/models", {}),
        ("GET", f"/v1/models/{MODEL}", {}),
        ("GET", "/v1/models/unknown", {}),
        ("POST", "/v1/chat/completions", {"json": chat_body()}),
        ("POST", "/v1/chat/completions", {"json": chat_body(model="unknown")}),
        ("POST", "/nowhere", {}),
        ("DELETE", "/v1/chat/completions", {}),
        (
            "OPTIONS",
            "/v1/chat/completions",
            {
                "headers": {
                    "Origin": "https://app.example",
                    "Access-Control-Request-Method": "POST",
                }
            },
        ),
        ("POST", "/v1/chat/completions", {"headers": {"Expect": "nonsense"}, "data": b"{}"}),
    ]
    statuses = set()
    for method, path, extra in calls:
        async with http.request(method, gw.url + path, **extra) as resp:
            await resp.read()
            statuses.add(resp.status)
            assert resp.headers.get("X-Request-Id"), (method, path, resp.status)
        # the client's own sane id is kept
        headers = {**extra.get("headers", {}), "X-Request-Id": "client-id-1"}
        async with http.request(method, gw.url + path, **{**extra, "headers": headers}) as resp:
            await resp.read()
            assert resp.headers.get("X-Request-Id") == "client-id-1", (method, path)
    assert statuses == {200, 204, 404, 405, 417}
    # a request aiohttp cannot parse gets the gateway's JSON error, with an id too
    reader, writer = await open_raw(gw.url)
    try:
        await write_raw(writer, b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
        answer = await read_answer(reader)
    finally:
        writer.close()
    assert answer is not None and answer.status == 400
    assert answer.headers.get("X-Request-Id")
    assert json.loads(answer.body)["error"]["code"] == "bad_http_request"


async def test_readyz_503_carries_x_request_id(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    gateway.app[GATEWAY].proxy.draining = True
    for path in ("/readyz", "/healthz"):
        async with http.get(gateway.url + path) as resp:
            assert resp.headers.get("X-Request-Id"), path


# --- the deploy docs' curl lines ----------------------------------------------------------------


@pytest.mark.parametrize("path", ["deploy/docker-compose.yaml", "deploy/README.md"])
def test_deploy_curl_lines_ask_for_the_model_the_demo_serves(path: str) -> None:
    text = (ROOT / Path(path)).read_text()
    models = re.findall(r'"model":\s*"([^"]+)"', text)
    assert models, f"{path} has no curl line with a model"
    assert set(models) == {DEMO_MODEL}
