"""Usage accounting through real sockets (issue 11, item 1): the ``usage`` of JSON and SSE
answers in ``gateway_tokens_total`` and the access log, and ``routes[].include_usage`` asking
for it upstream while the client gets exactly the stream it asked for.

Two upstreams: the fake ModelArts (with the real ``openai`` client), and a scripted one that
records the body bytes it received and answers with given chunks, written one by one.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from conftest import MODEL, GatewayFactory, RunningGateway, chat_body

from gateway.config.load import ConfigError, parse_settings
from gateway.log import TextFormatter
from gateway.testing import FakeCloud
from gateway.testing.common import serve_on_loopback

ALICE_KEY = "sk-alice-usage-0a1b2c3d4e5f"
CHAT = "/v1/chat/completions"
RAW = "/raw/v1/chat/completions"
USAGE = {"prompt_tokens": 17, "completion_tokens": 5, "total_tokens": 22}


class ScriptedUpstream:
    """Records each request body's exact bytes; answers with ``chunks``, one write each."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.chunks: list[bytes] = []
        self.content_type = "text/event-stream"
        self.headers: dict[str, str] = {}
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.bodies.append(await request.read())
        response = web.StreamResponse(headers={"Content-Type": self.content_type, **self.headers})
        await response.prepare(request)
        for i, piece in enumerate(self.chunks):
            if i:
                # a pause so that each write reaches the gateway as a read of its own; what is
                # asserted holds however the chunks arrive (test_usage_tap.py tries every cut)
                await asyncio.sleep(0.002)
            await response.write(piece)
        await response.write_eof()
        return response


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[ScriptedUpstream, str]]:
    upstream = ScriptedUpstream()
    runner, url = await serve_on_loopback(upstream.app)
    try:
        yield upstream, url
    finally:
        await runner.cleanup()


def sse(payload: object) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def content_chunk(i: int) -> bytes:
    choice = {"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}
    return sse({"id": "c1", "object": "chat.completion.chunk", "model": "m", "choices": [choice]})


EVENTS = [content_chunk(i) for i in range(4)]
USAGE_EVENT = sse({"id": "c1", "object": "chat.completion.chunk", "choices": [], "usage": USAGE})
DONE = b"data: [DONE]\n\n"


def config(
    url: str | None = None,
    *,
    keys: bool = True,
    models: list[Any] | None = None,
    include_usage: bool = False,
    chat: dict[str, Any] | None = None,
) -> Callable[[dict[str, Any]], None]:
    """Config edit: key ``alice`` (unless ``keys=False``), the fake's route ``chat`` (edited by
    ``chat``), and with ``url`` a route ``raw`` at /raw to the scripted upstream."""

    def edit(cfg: dict[str, Any]) -> None:
        if keys:
            cfg["listen"]["api_keys"] = [{"name": "alice", "key": ALICE_KEY}]
        cfg["routes"][0].update(chat or {})
        if url is not None:
            cfg["credentials"]["open"] = {"type": "none"}
            route: dict[str, Any] = {
                "name": "raw",
                "path": "/raw",
                "upstream": url,
                "credential": "open",
                "heartbeat": 0,
                "include_usage": include_usage,
                "timeouts": {"connect": 2, "first_byte": 5, "idle": 5, "total": 30},
            }
            if models is not None:
                route["models"] = models
            cfg["routes"].append(route)

    return edit


AUTH = {"Authorization": f"Bearer {ALICE_KEY}", "Content-Type": "application/json"}


async def post(
    http: aiohttp.ClientSession, gw: RunningGateway, path: str, body: bytes
) -> tuple[int, bytes]:
    async with http.post(gw.url + path, data=body, headers=AUTH) as resp:
        return resp.status, await resp.read()


def tokens(gw: RunningGateway, route: str, key: str, model: str) -> tuple[float, float]:
    """(prompt, completion) of gateway_tokens_total for these labels."""
    labels = {"route": route, "key": key, "model": model}
    return (
        gw.metric("gateway_tokens_total", **labels, kind="prompt"),
        gw.metric("gateway_tokens_total", **labels, kind="completion"),
    )


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.access for r in caplog.records if r.name == "gateway.access"]  # type: ignore[attr-defined]


# --- JSON answers ---------------------------------------------------------------------------


async def test_non_streaming_usage_is_counted_by_route_key_and_model_and_logged(
    cloud: FakeCloud,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    captured_logs: pytest.LogCaptureFixture,
) -> None:
    cloud.modelarts.script.events = 6
    gw = await make_gateway(config(chat={"models": [MODEL]}))
    body = chat_body(stream=False, messages=[{"role": "user", "content": "one two three"}])
    for _ in range(2):
        status, answer = await post(http, gw, CHAT, json.dumps(body).encode())
        assert status == 200 and json.loads(answer)["usage"]["completion_tokens"] == 6
    assert tokens(gw, "chat", "alice", MODEL) == (6.0, 12.0)  # 3 prompt words, 6 events, twice
    line = access_lines(captured_logs)[-1]
    assert line["prompt_tokens"] == 3 and line["completion_tokens"] == 6


async def test_without_keys_or_models_the_labels_are_dashes_never_the_clients_model(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    cloud.modelarts.script.events = 2
    gw = await make_gateway(config(keys=False))
    body = chat_body(stream=False, model="anything-a-client-likes")
    status, _ = await post(http, gw, CHAT, json.dumps(body).encode())
    assert status == 200
    assert tokens(gw, "chat", "-", "-") == (1.0, 2.0)
    exposed = (await (await http.get(gw.url + "/metrics")).read()).decode()
    assert "anything-a-client-likes" not in exposed


async def test_a_model_the_route_does_not_list_is_labelled_dash_on_a_catch_all_route(
    scripted: tuple[ScriptedUpstream, str],
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    # /raw has a route for model "m" and a catch-all route without models: any other name a
    # client sends goes to the catch-all, and its label is "-", never the client's string
    upstream, url = scripted
    upstream.content_type = "application/json"
    upstream.chunks = [json.dumps({"usage": USAGE}).encode()]

    def edit(cfg: dict[str, Any]) -> None:
        config(url, models=["m"])(cfg)
        anything = {**cfg["routes"][-1], "name": "anything"}
        del anything["models"]
        cfg["routes"].append(anything)

    gw = await make_gateway(edit)
    for model in ("m", "made-up-by-a-client-7f3a"):
        status, _ = await post(http, gw, RAW, json.dumps({"model": model}).encode())
        assert status == 200
    assert tokens(gw, "raw", "alice", "m") == (17.0, 5.0)
    assert tokens(gw, "anything", "alice", "-") == (17.0, 5.0)
    exposed = (await (await http.get(gw.url + "/metrics")).read()).decode()
    assert "made-up-by-a-client-7f3a" not in exposed


async def test_a_large_json_answer_is_relayed_and_its_usage_still_counted(
    scripted: tuple[ScriptedUpstream, str],
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    upstream, url = scripted
    content = "x" * 200_000  # over the size read whole: relayed chunk by chunk
    answer = json.dumps({"choices": [{"message": {"content": content}}], "usage": USAGE})
    upstream.content_type = "application/json"
    upstream.chunks = [answer.encode()[i : i + 50_000] for i in range(0, len(answer), 50_000)]
    gw = await make_gateway(config(url))
    status, got = await post(http, gw, RAW, json.dumps(chat_body(stream=False)).encode())
    assert status == 200 and got == answer.encode()
    assert tokens(gw, "raw", "alice", "-") == (17.0, 5.0)


async def test_a_compressed_answer_passes_unchanged_and_its_usage_is_unknown(
    scripted: tuple[ScriptedUpstream, str],
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    captured_logs: pytest.LogCaptureFixture,
) -> None:
    upstream, url = scripted
    upstream.content_type = "application/json"
    upstream.headers = {"Content-Encoding": "gzip"}
    packed = gzip.compress(json.dumps({"usage": USAGE}).encode())
    upstream.chunks = [packed]
    gw = await make_gateway(config(url))
    async with http.post(gw.url + RAW, data=b"{}", headers=AUTH, auto_decompress=False) as resp:
        assert resp.status == 200 and await resp.read() == packed
    assert tokens(gw, "raw", "alice", "-") == (0.0, 0.0)
    line = access_lines(captured_logs)[-1]
    assert line["prompt_tokens"] == "-" and line["completion_tokens"] == "-"


# --- SSE answers ----------------------------------------------------------------------------


async def test_stream_usage_the_client_asked_for_is_counted_and_reaches_the_openai_client(
    cloud: FakeCloud,
    make_gateway: GatewayFactory,
    captured_logs: pytest.LogCaptureFixture,
) -> None:
    cloud.modelarts.script.events = 7
    cloud.modelarts.script.split_events = True  # every event in two writes, cut in its JSON
    gw = await make_gateway(config(chat={"models": [MODEL], "include_usage": True}))
    async with openai.AsyncOpenAI(
        base_url=gw.url + "/v1", api_key=ALICE_KEY, max_retries=0, timeout=10
    ) as client:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "a b"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 7
    sent = json.loads(cloud.modelarts.requests[-1].body)
    assert sent["stream_options"] == {"include_usage": True}
    assert tokens(gw, "chat", "alice", MODEL) == (2.0, 7.0)
    line = access_lines(captured_logs)[-1]
    assert (line["prompt_tokens"], line["completion_tokens"]) == (2, 7)


async def test_include_usage_asks_upstream_and_the_openai_client_sees_no_usage_chunk(
    cloud: FakeCloud, make_gateway: GatewayFactory
) -> None:
    cloud.modelarts.script.events = 5
    gw = await make_gateway(config(chat={"include_usage": True}))
    async with openai.AsyncOpenAI(
        base_url=gw.url + "/v1", api_key=ALICE_KEY, max_retries=0, timeout=10
    ) as client:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "a b c d"}], stream=True
        )
        chunks = [c async for c in stream]
    assert chunks and all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks).startswith("token0 ")
    sent = json.loads(cloud.modelarts.requests[-1].body)
    assert sent["stream_options"] == {"include_usage": True}
    assert tokens(gw, "chat", "alice", "-") == (4.0, 5.0)


async def test_without_include_usage_a_stream_that_asks_for_nothing_has_unknown_usage(
    cloud: FakeCloud,
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    captured_logs: pytest.LogCaptureFixture,
) -> None:
    gw = await make_gateway(config())
    body = json.dumps(chat_body()).encode()
    status, _ = await post(http, gw, CHAT, body)
    assert status == 200
    assert cloud.modelarts.requests[-1].body == body  # nothing added
    assert tokens(gw, "chat", "alice", "-") == (0.0, 0.0)
    line = access_lines(captured_logs)[-1]
    assert line["prompt_tokens"] == "-" and line["completion_tokens"] == "-"


# body bytes as a client may send them: odd spacing, key order, non-ASCII, no stream_options
CLIENT_BODY = (
    b'{ "messages" : [ {"role":"user","content":"caf\xc3\xa9 \\u00e9"} ],\n'
    b'  "model":"m", "stream" : true, "temperature": 0.70 }'
)
ASKED = b',"stream_options":{"include_usage":true}'


@pytest.mark.parametrize(
    "cuts",
    [
        "whole",  # each event in a write of its own
        "split",  # the usage event cut inside "usage" and again inside its numbers
        "joined",  # the usage event and [DONE] in one write with the last content event
    ],
)
async def test_include_usage_adds_stream_options_and_hides_exactly_the_usage_event(
    cuts: str,
    scripted: tuple[ScriptedUpstream, str],
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    captured_logs: pytest.LogCaptureFixture,
) -> None:
    upstream, url = scripted
    at = USAGE_EVENT.index(b'"usage"') + 3
    chunks = {
        "whole": [*EVENTS, USAGE_EVENT, DONE],
        "split": [
            *EVENTS,
            USAGE_EVENT[:at],
            USAGE_EVENT[at : at + 20],
            USAGE_EVENT[at + 20 :],
            DONE,
        ],
        "joined": [*EVENTS[:-1], EVENTS[-1] + USAGE_EVENT + DONE],
    }[cuts]
    upstream.chunks = chunks
    gw = await make_gateway(config(url, include_usage=True))
    status, got = await post(http, gw, RAW, CLIENT_BODY)
    assert status == 200
    assert got == b"".join(EVENTS) + DONE  # the stream the client asked for, byte for byte
    assert b"usage" not in got
    # upstream got the client's bytes with one member added before the closing brace
    assert upstream.bodies[-1] == CLIENT_BODY[:-1] + ASKED + b"}"
    assert tokens(gw, "raw", "alice", "-") == (17.0, 5.0)
    line = access_lines(captured_logs)[-1]
    assert (line["prompt_tokens"], line["completion_tokens"]) == (17, 5)
    assert line["bytes"] == len(got) and line["end"] == "done"


@pytest.mark.parametrize(
    ("options", "sent"),
    [
        (b'{"include_usage": false}', b'{"include_usage": true}'),
        (b"null", b'{"include_usage":true}'),
        (
            b'{ "continuous_usage_stats": false }',
            b'{"include_usage":true, "continuous_usage_stats": false }',
        ),
    ],
)
async def test_stream_options_without_usage_get_it_and_nothing_else_changes(
    options: bytes,
    sent: bytes,
    scripted: tuple[ScriptedUpstream, str],
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    upstream, url = scripted
    upstream.chunks = [*EVENTS, USAGE_EVENT, DONE]
    gw = await make_gateway(config(url, include_usage=True))
    body = b'{"model":"m","stream":true,"stream_options":%b,"n":1}' % options
    status, got = await post(http, gw, RAW, body)
    assert status == 200 and got == b"".join(EVENTS) + DONE
    assert upstream.bodies[-1] == body.replace(options, sent)


async def test_a_client_that_asked_for_usage_gets_the_stream_and_its_body_untouched(
    scripted: tuple[ScriptedUpstream, str],
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    upstream, url = scripted
    upstream.chunks = [*EVENTS, USAGE_EVENT, DONE]
    gw = await make_gateway(config(url, include_usage=True))
    body = b'{"model":"m", "stream":true, "stream_options": {"include_usage": true}}'
    status, got = await post(http, gw, RAW, body)
    assert status == 200
    assert got == b"".join(upstream.chunks)
    assert upstream.bodies[-1] == body
    assert tokens(gw, "raw", "alice", "-") == (17.0, 5.0)


@pytest.mark.parametrize("value", [b"1", b'"true"', b"{}"])
async def test_a_non_boolean_include_usage_is_left_to_the_upstream_and_nothing_is_hidden(
    value: bytes,
    scripted: tuple[ScriptedUpstream, str],
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    # a lenient upstream (vLLM's pydantic reads 1 or "true" as true) sends usage the client
    # expects: the gateway neither rewrites the value nor cuts the event, and still counts it
    upstream, url = scripted
    upstream.chunks = [*EVENTS, USAGE_EVENT, DONE]
    gw = await make_gateway(config(url, include_usage=True))
    body = b'{"model":"m","stream":true,"stream_options":{"include_usage":%b}}' % value
    status, got = await post(http, gw, RAW, body)
    assert status == 200
    assert upstream.bodies[-1] == body
    assert got == b"".join(upstream.chunks)
    assert tokens(gw, "raw", "alice", "-") == (17.0, 5.0)


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"m","stream":false}',  # not a stream
        b'{"model":"m"}',
        b"not json at all",  # not ours to judge: the upstream answers it
        b"",
    ],
)
async def test_include_usage_leaves_every_other_body_untouched(
    body: bytes,
    scripted: tuple[ScriptedUpstream, str],
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    upstream, url = scripted
    upstream.content_type = "application/json"
    upstream.chunks = [json.dumps({"usage": USAGE}).encode()]
    gw = await make_gateway(config(url, include_usage=True))
    status, _ = await post(http, gw, RAW, body)
    assert status == 200
    assert upstream.bodies[-1] == body


@pytest.mark.parametrize("path", ["/raw/v1/responses", "/raw/v1/sse", "/raw/v1/embeddings"])
async def test_include_usage_edits_only_the_completions_endpoints(
    path: str,
    scripted: tuple[ScriptedUpstream, str],
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    # stream_options belongs to /chat/completions and /completions: any other path on the
    # route gets the client's body unchanged and its stream whole (nothing hidden)
    upstream, url = scripted
    upstream.chunks = [*EVENTS, USAGE_EVENT, DONE]
    gw = await make_gateway(config(url, include_usage=True))
    status, got = await post(http, gw, path, CLIENT_BODY)
    assert status == 200
    assert upstream.bodies[-1] == CLIENT_BODY
    assert got == b"".join(upstream.chunks)
    status, got = await post(http, gw, "/raw/v1/completions", CLIENT_BODY)
    assert status == 200 and upstream.bodies[-1] == CLIENT_BODY[:-1] + ASKED + b"}"
    assert got == b"".join(EVENTS) + DONE


async def test_a_stream_cut_inside_the_held_usage_event_is_not_a_clean_end(
    scripted: tuple[ScriptedUpstream, str],
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    captured_logs: pytest.LogCaptureFixture,
) -> None:
    upstream, url = scripted
    upstream.chunks = [*EVENTS, USAGE_EVENT[:30]]  # then a clean EOF, inside the event
    gw = await make_gateway(config(url, include_usage=True))
    got = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(gw.url + RAW, data=CLIENT_BODY, headers=AUTH) as resp:
            async for piece in resp.content.iter_any():
                got += piece
    assert got == b"".join(EVENTS)
    assert access_lines(captured_logs)[-1]["end"] == "upstream_error"


async def test_usage_metric_series_appear_in_the_metrics_endpoint(
    cloud: FakeCloud, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await make_gateway(config(chat={"models": [MODEL]}))
    await post(http, gw, CHAT, json.dumps(chat_body(stream=False)).encode())
    async with http.get(gw.url + "/metrics") as resp:
        text = (await resp.read()).decode()
    assert (
        f'gateway_tokens_total{{key="alice",kind="completion",model="{MODEL}",route="chat"}}'
        in text
    )
    assert ALICE_KEY not in text


def test_access_log_text_line_shows_the_token_fields() -> None:
    record = logging.LogRecord("gateway.access", logging.INFO, "", 0, "access", None, None)
    record.access = {"key": "alice", "prompt_tokens": 3, "completion_tokens": "-"}
    record.request_id = "r1"
    line = TextFormatter().format(record)
    assert line.endswith("key=alice prompt_tokens=3 completion_tokens=-")


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_include_usage_must_be_a_boolean_and_the_message_names_the_key(
    cloud: FakeCloud, value: object
) -> None:
    cfg: dict[str, Any] = {
        "credentials": {"main": cloud.iam_password_config()},
        "routes": [
            {"name": "a", "upstream": cloud.service_url, "credential": "main"},
            {
                "name": "b",
                "path": "/b",
                "upstream": cloud.service_url,
                "credential": "main",
                "include_usage": value,
            },
        ],
    }
    with pytest.raises(ConfigError) as info:
        parse_settings(cfg, {})
    assert "routes[1].include_usage: must be true or false" in info.value.problems


@pytest.mark.parametrize("size", [700, 1000, 1500])
async def test_a_long_usage_event_is_found_by_the_relay_and_hidden(
    size: int,
    scripted: tuple[ScriptedUpstream, str],
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    upstream, url = scripted

    def usage_event(pad: str) -> bytes:
        return sse({"id": pad, "object": "chat.completion.chunk", "choices": [], "usage": USAGE})

    long_usage = usage_event("x" * (size - len(usage_event(""))))
    assert len(long_usage) == size
    upstream.chunks = [*EVENTS, long_usage, DONE]
    gw = await make_gateway(config(url, include_usage=True))
    status, got = await post(http, gw, RAW, CLIENT_BODY)
    assert status == 200 and got == b"".join(EVENTS) + DONE
    assert tokens(gw, "raw", "alice", "-") == (17.0, 5.0)


@pytest.mark.parametrize("hide", [True, False], ids=["route_asks", "client_asks"])
async def test_usage_far_from_the_end_of_its_chunk_is_found_by_the_relay(
    hide: bool,
    scripted: tuple[ScriptedUpstream, str],
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    # OpenAI's usage chunk: usage with its details, then fields after it ("obfuscation"
    # padding), and [DONE] in the same write: "usage" is some 700 bytes before the chunk's end
    upstream, url = scripted
    details = {
        **USAGE,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
    last = sse(
        {"id": "c1", "choices": [], "usage": details, "obfuscation": "q" * 400, "x": "y" * 100}
    )
    assert 600 < len(last) + len(DONE) - last.index(b'"usage"') < 1000
    upstream.chunks = [*EVENTS, last + DONE]
    gw = await make_gateway(config(url, include_usage=True))
    body = CLIENT_BODY if hide else b'{"stream":true,"stream_options":{"include_usage":true}}'
    status, got = await post(http, gw, RAW, body)
    assert status == 200
    assert got == b"".join(EVENTS) + (b"" if hide else last) + DONE
    assert tokens(gw, "raw", "alice", "-") == (17.0, 5.0)


@pytest.mark.parametrize("count", ["1" + "0" * 400, str(2**63)])
async def test_an_absurd_usage_count_is_unknown_and_the_answer_still_reaches_the_client(
    count: str,
    scripted: tuple[ScriptedUpstream, str],
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    captured_logs: pytest.LogCaptureFixture,
) -> None:
    # 10**400 made the metric raise OverflowError after the answer was built (a 500 instead of
    # the answer, no access-log line); 2**63 would fail Redis's HINCRBY and trip on_error
    upstream, url = scripted
    upstream.content_type = "application/json"
    answer = b'{"usage":{"prompt_tokens":%b,"completion_tokens":5}}' % count.encode()
    upstream.chunks = [answer]
    gw = await make_gateway(config(url))
    status, got = await post(http, gw, RAW, b"{}")
    assert status == 200 and got == answer
    assert tokens(gw, "raw", "alice", "-") == (0.0, 5.0)
    line = access_lines(captured_logs)[-1]
    assert line["prompt_tokens"] == "-" and line["completion_tokens"] == 5


async def test_a_responses_api_stream_whose_last_event_comes_in_pieces_is_counted(
    scripted: tuple[ScriptedUpstream, str],
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    # response.completed carries the whole output (here 20 kB), so it arrives in several reads
    upstream, url = scripted
    created = b'event: response.created\ndata: {"type":"response.created"}\n\n'
    response = {
        "id": "resp_1",
        "output": [{"type": "message", "content": [{"type": "output_text", "text": "w " * 10000}]}],
        "usage": {"input_tokens": 17, "output_tokens": 5, "total_tokens": 22},
    }
    data = json.dumps({"type": "response.completed", "response": response}).encode()
    last = b"event: response.completed\ndata: " + data + b"\n\n"
    upstream.chunks = [created, last[:8000], last[8000:16000], last[16000:]]
    gw = await make_gateway(config(url, include_usage=True))
    status, got = await post(http, gw, RAW, b'{"model":"m","stream":true,"input":"hi"}')
    assert status == 200 and got == created + last
    assert tokens(gw, "raw", "alice", "-") == (17.0, 5.0)


@pytest.mark.parametrize("include_usage", [True, False])
async def test_a_long_last_event_whose_final_line_end_comes_alone_is_a_clean_end(
    include_usage: bool,
    scripted: tuple[ScriptedUpstream, str],
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    captured_logs: pytest.LogCaptureFixture,
) -> None:
    # the blank line that ends a long event (longer than the watcher keeps) split "\n" | "\n":
    # the second "\n" alone ends the stream cleanly; it was taken for an unfinished event
    upstream, url = scripted
    long_event = sse({"id": "c1", "choices": [{"delta": {"content": "x" * 6000}}]})
    upstream.chunks = [*EVENTS, long_event[:-1], long_event[-1:]]
    gw = await make_gateway(config(url, include_usage=include_usage))
    status, got = await post(http, gw, RAW, CLIENT_BODY)
    assert status == 200 and got == b"".join(EVENTS) + long_event
    assert access_lines(captured_logs)[-1]["end"] == "done"
