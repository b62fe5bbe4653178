"""The real ``openai`` package as the client, against the gateway over loopback sockets.

Both the async client and the sync one (run in a worker thread, so the event loop keeps serving
the fakes and the gateway) are used; every client is closed (``filterwarnings = error``) and
``max_retries=0`` so a failure shows at once instead of being retried.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import openai
import pytest
from conftest import MODEL, GatewayFactory, RunningGateway

from gateway.testing import FakeCloud

MESSAGES: list[Any] = [{"role": "user", "content": "Hi"}]


def client_for(gw: RunningGateway) -> openai.AsyncOpenAI:
    # any API key works: the gateway has none configured and never forwards the client's
    return openai.AsyncOpenAI(
        base_url=gw.url + "/v1", api_key="sk-anything", max_retries=0, timeout=10
    )


@pytest.fixture
async def client(gateway: RunningGateway) -> AsyncIterator[openai.AsyncOpenAI]:
    async with client_for(gateway) as c:
        yield c


def tuned(**route: Any) -> Callable[[dict[str, Any]], None]:
    """A config edit merging ``route`` into the chat route (``timeouts`` merged too)."""

    def edit(config: dict[str, Any]) -> None:
        target = config["routes"][0]
        timeouts = route.pop("timeouts", {})
        target.update(route)
        target["timeouts"].update(timeouts)

    return edit


def expected_text(events: int) -> str:
    return "".join(f"token{i} " for i in range(events))


async def test_async_streaming_yields_the_tokens_in_order(
    cloud: FakeCloud, client: openai.AsyncOpenAI
) -> None:
    cloud.modelarts.script.events = 8
    stream = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    pieces: list[str] = []
    usage = None
    async with stream:
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content:
                    pieces.append(choice.delta.content)
    assert pieces == [f"token{i} " for i in range(8)]
    assert usage is not None and usage.completion_tokens == 8
    assert chunk.model == MODEL


async def test_async_non_streaming_returns_the_content(
    cloud: FakeCloud, client: openai.AsyncOpenAI
) -> None:
    cloud.modelarts.script.events = 4
    completion = await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert completion.choices[0].message.content == expected_text(4)
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens == 4


async def test_raw_response_carries_the_request_id(
    cloud: FakeCloud, client: openai.AsyncOpenAI
) -> None:
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, extra_headers={"X-Request-Id": "from-openai-sdk"}
    )
    assert raw.headers["x-request-id"] == "from-openai-sdk"
    assert raw.parse().choices[0].message.content == expected_text(5)


async def test_sync_client_in_a_thread_streams_and_completes(
    cloud: FakeCloud, gateway: RunningGateway
) -> None:
    cloud.modelarts.script.events = 6

    def run() -> tuple[list[str], str | None]:
        with openai.OpenAI(
            base_url=gateway.url + "/v1", api_key="sk-anything", max_retries=0, timeout=10
        ) as sync_client:
            with sync_client.chat.completions.create(
                model=MODEL, messages=MESSAGES, stream=True
            ) as stream:
                pieces = [
                    c.choices[0].delta.content
                    for c in stream
                    if c.choices and c.choices[0].delta.content
                ]
            completion = sync_client.chat.completions.create(model=MODEL, messages=MESSAGES)
            return pieces, completion.choices[0].message.content

    pieces, content = await asyncio.to_thread(run)
    assert pieces == [f"token{i} " for i in range(6)]
    assert content == expected_text(6)


async def test_idle_timeout_mid_stream_raises_api_error(
    cloud: FakeCloud, make_gateway: GatewayFactory
) -> None:
    gw = await make_gateway(tuned(heartbeat=0.1, timeouts={"idle": 0.3}))
    cloud.modelarts.script.stall_after = 3  # role chunk, two tokens, then silence
    pieces: list[str] = []
    async with client_for(gw) as c:
        stream = await c.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIError) as caught:
            async with stream:
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        pieces.append(chunk.choices[0].delta.content)
    assert pieces == ["token0 ", "token1 "]  # what came before the stall was delivered
    body = caught.value.body
    assert isinstance(body, dict) and body["code"] == "upstream_idle_timeout"
    assert not isinstance(caught.value, openai.APIStatusError)  # inside the 200 stream


async def test_upstream_reset_mid_stream_raises_in_the_openai_stream(
    cloud: FakeCloud, client: openai.AsyncOpenAI
) -> None:
    cloud.modelarts.script.events, cloud.modelarts.script.reset_after = 10, 2
    stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    pieces: list[str] = []
    # an `event: error` (APIError) or a broken connection (APIConnectionError, also an APIError)
    with pytest.raises(openai.APIError):
        async with stream:
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
    assert pieces == ["token0 "]


async def test_unknown_model_raises_not_found(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(tuned(models=[MODEL]))
    async with client_for(gw) as c:
        with pytest.raises(openai.NotFoundError) as caught:
            await c.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        models = await c.models.list()
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"
    assert caught.value.response.headers["x-request-id"]
    assert [m.id for m in models.data] == [MODEL]


async def test_body_over_max_body_raises_status_413(
    cloud: FakeCloud, make_gateway: GatewayFactory
) -> None:
    gw = await make_gateway(tuned(max_body="1KiB"))
    before = len(cloud.modelarts.requests)
    async with client_for(gw) as c:
        with pytest.raises(openai.APIStatusError) as caught:
            await c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x" * 5000}], stream=True
            )
    assert caught.value.status_code == 413
    assert caught.value.code == "request_too_large"
    assert len(cloud.modelarts.requests) == before  # the upstream was not contacted


async def test_upstream_throttling_raises_rate_limit_error_with_apig_text(
    cloud: FakeCloud, client: openai.AsyncOpenAI
) -> None:
    cloud.modelarts.script.status = 429
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    assert caught.value.status_code == 429
    body = caught.value.body  # the OpenAI-shaped error's object
    assert isinstance(body, dict)
    assert body["message"].startswith("The throttling threshold has been reached. (upstream req")
    assert caught.value.code == "APIG.0308"


async def test_first_byte_timeout_raises_a_504(
    cloud: FakeCloud, make_gateway: GatewayFactory
) -> None:
    gw = await make_gateway(tuned(timeouts={"first_byte": 0.3}))
    cloud.modelarts.script.header_delay = 30
    async with client_for(gw) as c:
        with pytest.raises(openai.InternalServerError) as caught:
            await c.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    assert caught.value.status_code == 504
    assert caught.value.code == "upstream_timeout"
